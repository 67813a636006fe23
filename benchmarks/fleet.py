#!/usr/bin/env python3
"""Fleet benchmark: LiteLLM's default routing against llmux's hook, on a fleet of llmux hosts.

Two parts, each a side-by-side comparison in one run:

1. **Real** (needs the LiteLLM venv, `scripts/litellm-setup`): three `llmuxd run` hosts on
   127.0.0.2-4 (the three simulated models each, one GPU each: one model awake at a time)
   behind two real LiteLLM proxies from PyPI, one with LiteLLM's default routing
   (simple-shuffle) and one with llmux's hook (`llmuxd.fleet.litellm`), configured from
   `llmuxctl fleet`. The same seeded workload (several clients, the three models mixed, each
   model's demand well within one host) goes through each, in alternating rounds so that
   drifting machine load hits both. Switches and GPU time come from the hosts' own
   /metrics; latency is the client's.
2. **Simulated** (no processes): 16 and 32 hosts on a virtual clock, each the **real
   `Switcher`** on `tests/fakes.FakeBackends` with a fixed switch cost, the signal built by
   the daemon's own `host_signal` from each switcher's status. Routings (SIM_ROUTINGS):
   LiteLLM's simple-shuffle, least-busy and usage-based strategies, an operator's static
   assignment that knows the popularity, and llmux's `FleetView` + ranking (the code the
   hook runs) in front of shuffle or least-busy, reading signals at most a second old.
   Workloads (WORKLOADS): uniform (N or 2N models on N hosts), Zipf-skewed over 2N models
   (a hot model needs more than one host), and Zipf whose popularity shifts at half time.

Reported per routing: switches per 1,000 requests (every wake of a model, cold starts
included), latency p50/p99 (arrival to last byte), GPU-serving % (llmux 0.7's definition:
1 − switch time / (serving time + switch time), switch time = sleep + wake phases), and
lost/misrouted (must be 0).

    .venv/bin/python benchmarks/fleet.py               # both parts (the real one: a few minutes)
    .venv/bin/python benchmarks/fleet.py --sim-only    # the simulation only
    .venv/bin/python benchmarks/fleet.py --markdown    # tables for benchmarks/README.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "fleet"))

from fakes import FakeBackends, make_config, run_virtual  # noqa: E402

from llmuxd.events import SwitchFinished  # noqa: E402
from llmuxd.fleet.view import FleetView, HostRecord, host_key  # noqa: E402
from llmuxd.http.fleet import host_signal  # noqa: E402
from llmuxd.lifecycle import BackendState  # noqa: E402
from llmuxd.switcher import Switcher  # noqa: E402

ROUTINGS = ("default", "llmux")


@dataclass
class Tally:
    """One routing's totals over a run."""

    routing: str
    requests: int = 0
    served: int = 0
    switches: int = 0
    switch_s: float = 0.0
    serving_s: float = 0.0
    latencies: List[float] = field(default_factory=list)
    lost: int = 0
    misrouted: int = 0
    other: int = 0  # answered, but not 200

    @property
    def per_1000(self) -> float:
        return 1000.0 * self.switches / self.requests if self.requests else 0.0

    @property
    def gpu_percent(self) -> float:
        total = self.serving_s + self.switch_s
        return 100.0 * (1 - self.switch_s / total) if total else 100.0

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def table(rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def ratio(a: float, b: float) -> str:
    if b == 0:
        return "∞" if a > 0 else "1.0x"
    return f"{a / b:.1f}x"


def tally_rows(label: str, default: Tally, llmux: Tally) -> List[List[str]]:
    rows = []
    for t in (default, llmux):
        rows.append([label, t.routing, str(t.requests), str(t.switches), f"{t.per_1000:.1f}",
                     f"{t.quantile(0.5):.2f}", f"{t.quantile(0.99):.2f}", f"{t.gpu_percent:.1f}",
                     f"{t.lost}/{t.misrouted}"])
    rows.append([label, "default / llmux", "", "", ratio(default.per_1000, llmux.per_1000),
                 ratio(default.quantile(0.5), llmux.quantile(0.5)), ratio(default.quantile(0.99), llmux.quantile(0.99)),
                 "", ""])
    return rows


HEAD = ["fleet", "routing", "requests", "switches", "switches/1000", "p50 s", "p99 s", "GPU-serving %", "lost/misrouted"]


# ============================================================================ 1. real


def real_part(args: argparse.Namespace) -> Optional[List[List[str]]]:
    from prometheus_client.parser import text_string_to_metric_families

    from fleet_harness import (  # the fleet tests' hosts, proxy and client
        MODELS, LiteLLMProxy, Req, litellm_bin, litellm_config, problems, run_clients, start_hosts,
    )

    exe, why = litellm_bin()
    if exe is None:
        print(f"real part skipped: {why}", file=sys.stderr)
        return None
    tmp = Path(tempfile.mkdtemp(prefix="llmux-fleet-bench-"))
    hosts = start_hosts(tmp)
    proxies: Dict[str, LiteLLMProxy] = {}
    try:
        proxies = {
            "default": LiteLLMProxy(exe, tmp, litellm_config(hosts, llmux_routing=False), name="litellm-default").start(),
            "llmux": LiteLLMProxy(exe, tmp, litellm_config(hosts, llmux_routing=True), name="litellm-llmux",
                                  refresh_s=args.refresh).start(),
        }
        for p in proxies.values():
            p.wait_ready()
        print(f"real: 3 hosts and 2 LiteLLM proxies up (logs in {tmp})", file=sys.stderr)

        def workload(seed: int) -> List[List[Req]]:
            rng = random.Random(seed)
            return [[Req(rng.choice(MODELS), max_tokens=rng.randint(4, 16)) for _ in range(args.per_client)]
                    for _ in range(args.clients)]

        def scrape() -> Dict[str, float]:
            totals = {"switches": 0.0, "switch_s": 0.0, "serving_s": 0.0}
            for h in hosts:
                for family in text_string_to_metric_families(h.daemon.metrics()):
                    for sample in family.samples:
                        name, labels, value = sample.name, sample.labels, sample.value
                        if name == "llmux_switch_total":
                            totals["switches"] += value
                        elif name == "llmux_switch_phase_seconds_sum" and labels.get("phase") in ("sleep", "wake"):
                            totals["switch_s"] += value
                        elif name == "llmux_request_duration_seconds_sum":
                            totals["serving_s"] += value
                        elif name == "llmux_request_queue_wait_seconds_sum":
                            totals["serving_s"] -= value
            return totals

        # every model started once on every host, so that neither routing pays the cold starts
        asyncio.run(run_clients(proxies["default"].base, proxies["default"].key,
                                [[Req(m, max_tokens=2) for m in MODELS * 4] for _ in range(3)]))
        tallies = {r: Tally(r) for r in ROUTINGS}
        for rnd in range(args.rounds):
            order = ROUTINGS if rnd % 2 == 0 else tuple(reversed(ROUTINGS))
            for routing in order:
                proxy = proxies[routing]
                before = scrape()
                t0 = time.monotonic()
                outcomes = asyncio.run(run_clients(proxy.base, proxy.key, workload(1000 + rnd)))
                after = scrape()
                t = tallies[routing]
                t.requests += len(outcomes)
                t.switches += int(after["switches"] - before["switches"])
                t.switch_s += after["switch_s"] - before["switch_s"]
                t.serving_s += after["serving_s"] - before["serving_s"]
                found = problems(outcomes)
                t.lost += sum(1 for p in found if p.startswith("lost"))
                t.misrouted += sum(1 for p in found if p.startswith("misrouted"))
                t.other += sum(1 for o in outcomes if o.status not in (200, None))
                t.latencies += [o.elapsed for o in outcomes if o.status == 200]
                print(f"  round {rnd + 1} {routing}: {len(outcomes)} requests, "
                      f"{int(after['switches'] - before['switches'])} switches, {time.monotonic() - t0:.0f}s",
                      file=sys.stderr)
        rows = tally_rows("3 hosts (real, LiteLLM)", tallies["default"], tallies["llmux"])
    finally:
        for p in proxies.values():
            p.stop()
        for h in hosts:
            h.stop()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ============================================================================ 2. simulated


class InProcessView(FleetView):
    """llmux's FleetView reading each host's signal from its switcher directly (the same
    `host_signal` the daemon serves) instead of over HTTP, on the virtual clock. A signal is
    re-read when a request needs it and it is a refresh interval old: what polling gives a
    router (a view at most `refresh_s` old), without polling idle hosts every virtual second."""

    def __init__(self, hosts: Dict[str, Tuple[Switcher, Any]], **kw: Any):
        super().__init__(**kw)
        self.sources = {host_key(base): pair for base, pair in hosts.items()}

    def _ensure_polling(self, key: str) -> None:
        pass  # read on demand in signal()

    def signal(self, base: str):  # type: ignore[override]
        key = host_key(base)
        rec = self.hosts.setdefault(key, HostRecord(key))
        if self.clock() - rec.fetched_at >= self.refresh_s:
            switcher, config = self.sources[key]
            rec.signal, rec.fetched_at, rec.down = host_signal(config, switcher.status()), self.clock(), False
        return super().signal(base)


#: the routings of the simulation: LiteLLM's strategies, an operator's static assignment,
#: and llmux's hook in front of LiteLLM's default and of its least-busy strategy
SIM_ROUTINGS = ("shuffle", "static", "least-busy", "usage", "llmux", "llmux+least-busy")
BASELINES = ("shuffle", "static", "least-busy", "usage")
WORKLOADS = ("uniform", "zipf", "shift")
#: a fleet's share of its capacity that the skewed workloads ask for
ZIPF_LOAD = 0.6
#: Zipf exponent of the skewed workloads: the top model of 32 asks for ~2.4 hosts of 16
ZIPF_S = 1.0
#: a static assignment keeps each host this busy at most (a model asking more gets more hosts)
STATIC_FILL = 0.8


@dataclass(frozen=True)
class SimProfile:
    hosts: int
    workload: str
    #: models per host: 1 or 2 for `uniform`, 2 for the skewed ones
    models_per_host: int = 2

    @property
    def models(self) -> int:
        return self.hosts * self.models_per_host

    @property
    def label(self) -> str:
        return f"{self.hosts} hosts, {self.models} models, {self.workload} (sim)"

    def demand(self, late: bool) -> List[float]:
        """Each model's demand in hosts (arrival rate x service time), in model order;
        `late` is the second half of the run (where `shift` moves popularity)."""
        n = self.models
        if self.workload == "uniform":
            return [0.5 / self.models_per_host] * n
        weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(n)]
        total = sum(weights)
        shares = [ZIPF_LOAD * self.hosts * w / total for w in weights]
        if self.workload == "shift" and late:
            # the popular half and the unpopular half trade places: yesterday's hot model is cold
            shares = shares[n // 2:] + shares[: n // 2]
        return shares


def arrivals_for(profile: SimProfile, names: Sequence[str], service: float, duration: float,
                 seed: int) -> List[Tuple[float, str]]:
    """Poisson arrivals per model, with each model's rate from the profile (per half)."""
    rng = random.Random(seed)
    out: List[Tuple[float, str]] = []
    half = duration / 2
    for late, (lo, hi) in ((False, (0.0, half)), (True, (half, duration))):
        for name, demand in zip(names, profile.demand(late)):
            rate = demand / service
            t = lo + rng.expovariate(rate)
            while t < hi:
                out.append((t, name))
                t += rng.expovariate(rate)
    out.sort()
    return out


def static_assignment(profile: SimProfile, names: Sequence[str], hosts: Sequence[str]) -> Dict[str, List[str]]:
    """What an operator who knows the (first half's) popularity writes: each model on
    ceil(demand / STATIC_FILL) hosts, the largest demands first, each onto the least
    filled hosts (longest-processing-time bin packing)."""
    fill = {h: 0.0 for h in hosts}
    where: Dict[str, List[str]] = {}
    for name, demand in sorted(zip(names, profile.demand(False)), key=lambda nd: -nd[1]):
        copies = max(1, min(len(hosts), math.ceil(demand / STATIC_FILL)))
        chosen = sorted(hosts, key=lambda h: (fill[h], h))[:copies]
        for h in chosen:
            fill[h] += demand / copies
        where[name] = chosen
    return where


def simulate(profile: SimProfile, routing: str, *, service: float, switch_cost: float, start_cost: float,
             duration: float, refresh: float, seed: int, fault: Optional[str] = None) -> Tally:
    """One routing over one profile on the virtual clock. Every request's outcome is
    recorded: `lost` counts arrivals that ended with no answer at all, `misrouted`
    answers served under a lease for another model or by a backend that was not awake
    with the requested model. `fault` makes the negative controls: "misroute" (one
    host hands out leases for the wrong model) and "drop" (one host never answers)
    must be counted."""
    names = [f"m{i:03d}" for i in range(profile.models)]
    arrivals = arrivals_for(profile, names, service, duration, seed)
    config = make_config(names, policy={"request_timeout": 1e9, "drain_timeout": 1e9, "queue_limit": 100000})
    tally = Tally(routing)
    outcomes: Dict[int, str] = {}

    async def main() -> Tally:
        loop = asyncio.get_running_loop()
        bases = [f"http://h{i:03d}" for i in range(profile.hosts)]
        switchers: Dict[str, Switcher] = {}
        backends: Dict[str, FakeBackends] = {}
        gpus: Dict[str, asyncio.Lock] = {}
        finished: List[SwitchFinished] = []
        for base in bases:
            backends[base] = FakeBackends(config, wake_delay=switch_cost, start_delay=start_cost)
            sw = Switcher(config, backends[base], clock=loop.time)
            sw.subscribe(lambda e: finished.append(e) if isinstance(e, SwitchFinished) else None)
            await sw.start()
            switchers[base], gpus[base] = sw, asyncio.Lock()
        view = InProcessView({b: (switchers[b], config) for b in bases}, refresh_s=refresh, clock=loop.time)
        pick = random.Random(seed + 1)
        in_flight = {b: 0 for b in bases}  # what LiteLLM's least-busy counts: its own open requests
        window: Dict[str, List[float]] = {b: [] for b in bases}  # usage-based: requests this minute
        static = static_assignment(profile, names, bases)

        def least_busy(among: Sequence[str]) -> str:
            low = min(in_flight[b] for b in among)
            return pick.choice([b for b in among if in_flight[b] == low])

        def least_used(among: Sequence[str]) -> str:
            now = loop.time()
            for b in among:
                window[b] = [t for t in window[b] if now - t < 60.0]
            low = min(len(window[b]) for b in among)
            return pick.choice([b for b in among if len(window[b]) == low])

        def route(model: str) -> str:
            if routing == "static":
                return pick.choice(static[model])
            if routing == "least-busy":
                return least_busy(bases)
            if routing == "usage":
                return least_used(bases)
            if routing.startswith("llmux"):
                chosen = view.choose([(b, b, model) for b in bases]) or list(bases)
                return least_busy(chosen) if routing == "llmux+least-busy" else pick.choice(chosen)
            return pick.choice(bases)

        async def request(i: int, arrival: float, model: str) -> None:
            await asyncio.sleep(arrival - loop.time())
            base = route(model)
            if fault == "drop" and base == bases[0]:
                return  # the negative control of `lost`: no answer at all
            in_flight[base] += 1
            window[base].append(loop.time())
            try:
                asked = names[(names.index(model) + 1) % len(names)] if fault == "misroute" and base == bases[0] else model
                lease = await switchers[base].acquire(asked)
                with lease:
                    awake = backends[base].states.get(model) == BackendState.READY
                    async with gpus[base]:
                        await asyncio.sleep(service)
                    awake = awake and backends[base].states.get(model) == BackendState.READY
                outcomes[i] = "ok" if lease.model == model and awake else "misrouted"
            except Exception as exc:  # noqa: BLE001 - an error answer, counted, not lost
                outcomes[i] = f"error: {exc}"
            finally:
                in_flight[base] -= 1
            if outcomes[i] == "ok":
                tally.served += 1
                tally.latencies.append(loop.time() - arrival)

        await asyncio.gather(*(request(i, t, m) for i, (t, m) in enumerate(arrivals)), return_exceptions=True)
        await view.close()
        for sw in switchers.values():
            await sw.close()
        done = [e for e in finished if e.ok and e.to_model and not getattr(e, "skipped", False)]
        tally.switches = len(done)
        tally.switch_s = sum(e.phases.get("sleep", 0.0) + e.phases.get("wake", 0.0) for e in done)
        return tally

    run_virtual(main)
    tally.requests = len(arrivals)
    tally.serving_s = tally.served * service
    tally.lost = tally.requests - len(outcomes)
    tally.misrouted = sum(1 for o in outcomes.values() if o == "misrouted")
    tally.other = sum(1 for o in outcomes.values() if o.startswith("error"))
    return tally


def sim_rows(label: str, tallies: Dict[str, Tally]) -> List[List[str]]:
    """One row per routing, then the best baseline against llmux's best (on each column)."""
    rows = []
    for t in tallies.values():
        rows.append([label, t.routing, str(t.requests), str(t.switches), f"{t.per_1000:.1f}",
                     f"{t.quantile(0.5):.2f}", f"{t.quantile(0.99):.2f}", f"{t.gpu_percent:.1f}",
                     f"{t.lost}/{t.misrouted}"])
    base = [tallies[r] for r in BASELINES if r in tallies]
    ours = [t for r, t in tallies.items() if r.startswith("llmux")]
    if base and ours:
        b_sw = min(base, key=lambda t: t.per_1000)
        b_p99 = min(base, key=lambda t: t.quantile(0.99))
        o_sw = min(ours, key=lambda t: t.per_1000)
        o_p99 = min(ours, key=lambda t: t.quantile(0.99))
        rows.append([label, f"best baseline / llmux ({b_sw.routing}, {b_p99.routing})", "", "",
                     ratio(b_sw.per_1000, o_sw.per_1000), "", ratio(b_p99.quantile(0.99), o_p99.quantile(0.99)),
                     "", ""])
    return rows


def sim_part(args: argparse.Namespace) -> List[List[str]]:
    rows: List[List[str]] = []
    profiles = []
    for hosts in args.sim_hosts:
        for workload in args.workloads:
            for per_host in ((1, 2) if workload == "uniform" else (2,)):
                profiles.append(SimProfile(hosts, workload, per_host))
    for profile in profiles:
        t0 = time.perf_counter()
        result = {r: simulate(profile, r, service=args.service, switch_cost=args.switch_cost,
                              start_cost=args.start_cost, duration=args.duration, refresh=1.0, seed=7)
                  for r in args.routings}
        print(f"  sim {profile.label}: {time.perf_counter() - t0:.1f}s wall", file=sys.stderr)
        rows += sim_rows(profile.label, result)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sim-only", action="store_true", help="the virtual-time simulation only")
    which.add_argument("--real-only", action="store_true", help="the real LiteLLM fleet only")
    p.add_argument("--clients", type=int, default=6, help="real: concurrent clients (default 6)")
    p.add_argument("--per-client", type=int, default=50, help="real: requests per client per round (default 50)")
    p.add_argument("--rounds", type=int, default=2, help="real: rounds per routing, alternating (default 2)")
    p.add_argument("--refresh", type=float, default=0.5, help="real: the hook's poll interval, s (default 0.5)")
    p.add_argument("--keep", action="store_true", help="real: keep the hosts' and proxies' logs (printed path)")
    p.add_argument("--sim-hosts", type=int, nargs="+", default=[16, 32], help="sim: fleet sizes")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, help="sim: workloads")
    p.add_argument("--routings", nargs="+", default=list(SIM_ROUTINGS), choices=SIM_ROUTINGS,
                   help="sim: routings (default: all)")
    p.add_argument("--duration", type=float, default=600.0, help="sim: seconds of arrivals (default 600)")
    p.add_argument("--service", type=float, default=0.5, help="sim: seconds per request (default 0.5)")
    p.add_argument("--switch-cost", type=float, default=5.0, help="sim: seconds per wake from sleep (default 5)")
    p.add_argument("--start-cost", type=float, default=20.0, help="sim: seconds per cold start (default 20)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows: List[List[str]] = [HEAD]
    t0 = time.perf_counter()
    if not args.sim_only:
        real = real_part(args)
        if real is None and args.real_only:
            return 2
        rows += real or []
    if not args.real_only:
        rows += sim_part(args)
    print(table(rows, args.markdown))
    bad = [r for r in rows[1:] if r[-1] not in ("", "0/0")]
    print(f"\n({time.perf_counter() - t0:.0f}s wall; lost or misrouted anywhere: {len(bad)})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
