#!/usr/bin/env python3
"""Policy benchmark: llmux 0.7's simulator workloads, run through OUR switcher.

Not a re-implementation of the policies: each simulated request calls the real
`Switcher.acquire`, the real policies decide, and `tests/fakes.FakeBackends`
stands in for vLLM with a fixed switch cost, all on a virtual-time event loop
(`tests/fakes.VirtualTimeLoop`), so a 20-minute workload takes milliseconds.

The GPU serves one request at a time for `service` seconds (a FIFO lock held
with the lease); a switch costs `switch_cost` seconds during which nothing is
served; the very first activation is free. GPU % is llmux 0.7's definition:
1 − switch_time / (served × service + switch_time). Waits are measured
honestly, from arrival to the start of service (no 300 s straggler offset, see
reference/llmux-policy-sim.md). The only assertion is that no request is lost.

    python benchmarks/policy_sim.py              # the full table (main sweep + sensitivity)
    python benchmarks/policy_sim.py --markdown   # the same as markdown (benchmarks/README.md)
    python benchmarks/policy_sim.py --overhead   # fast-path acquire+release cost in µs
    python benchmarks/policy_sim.py --priority   # mixed interactive/batch profiles (issue #23)
    python benchmarks/policy_sim.py --overlap    # GPU % when a switch costs its larger half (issue #26)

Switch cost model: a switch is sleep(A) then wake(B). By default the whole
cost is the wake (the sum of the halves, as llmux 0.7's simulator had it).
`--overlap` compares that sequential model with the overlapped one, where the
halves run at once and the switch costs the larger: the cost is split as
vLLM's published 8B numbers (level 1: sleep 10.6 s, wake 2.2 s; level 2:
sleep 0.3 s, wake 6.5 s) scaled so that sleep + wake = the switch cost.
"""

from __future__ import annotations

import argparse
import logging
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fakes import FakeBackends, make_config, run_virtual  # noqa: E402

from llmuxd.events import SwitchFinished  # noqa: E402
from llmuxd.lifecycle import BackendState  # noqa: E402
from llmuxd.priority import Priority  # noqa: E402
from llmuxd.switcher import Switcher  # noqa: E402

POLICIES = ("fifo", "cost_aware", "time_slice")
SWITCH_COSTS = (2.0, 5.0, 10.0, 20.0)
SENSITIVITY_SERVICE = (0.1, 1.0, 2.0)
#: no request may time out in the benchmark: losing one would be the bug it looks for
NO_TIMEOUT = 1e9

Workload = List[Tuple[float, str]]  # (arrival s, model); mixed profiles add a Priority: (s, model, priority)

#: vLLM's published sleep/wake halves for an 8B model on an A100 (s), by sleep level (issue #26)
VLLM_8B_HALVES: Dict[str, Tuple[float, float]] = {"l1": (10.6, 2.2), "l2": (0.3, 6.5)}
#: how a switch's cost is spent: "sequential" (sleep + wake) or overlapped at level 1 or 2 (the larger half)
COST_MODELS = ("sequential", "overlap-l1", "overlap-l2")


def switch_delays(switch_cost: float, cost_model: str = "sequential") -> Tuple[float, float]:
    """(sleep s, wake s) of one switch. Sequential: all of it in the wake, as llmux 0.7's
    simulator had it. Overlapped: the halves run at once, so the GPU is unavailable for the
    larger half of vLLM's split scaled to `switch_cost` (modelled as a wake of that length)."""
    if cost_model == "sequential":
        return 0.0, switch_cost
    sleep, wake = VLLM_8B_HALVES[cost_model.split("-", 1)[1]]
    return 0.0, switch_cost * max(sleep, wake) / (sleep + wake)


# ---------------------------------------------------------------------------- workloads (§B.3)


def single_model(n: int) -> Workload:
    return [(i * 0.1, "A") for i in range(n)]


def balanced(n: int) -> Workload:
    return [(i * 0.1, "A" if i % 2 == 0 else "B") for i in range(2 * n)]


def bursty(size: int, bursts: int) -> Workload:
    return [(b * 5.0 + i * 0.01, "A" if b % 2 == 0 else "B") for b in range(bursts) for i in range(size)]


def dominant(n: int, share: float) -> Workload:
    every = round(1 / (1 - share))  # 0.8 → every 5th is B, 0.95 → every 20th
    return [(i * 0.05, "B" if i % every == every - 1 else "A") for i in range(n)]


def interleave(n: int) -> Workload:
    out: Workload = []
    for i in range(n):
        out += [(i * 0.01, "A"), (i * 0.01 + 0.001, "B")]
    return out


def surge(rate: float, n_b: int) -> Workload:
    a = [(i / rate, "A") for i in range(int(10 * rate))]
    b = [(5.0 + i * 0.01, "B") for i in range(n_b)]
    return sorted(a + b)


def three_model(n: int) -> Workload:
    return [(slot * 3.0 + i * 0.1, "ABC"[slot % 3]) for slot in range(6) for i in range(n)]


def random_mixed(n: int, seed: int) -> Workload:
    """An LCG picks A or B and a gap of 0-0.2 s (the generator differs from llmux's)."""
    state = seed
    t = 0.0
    out: Workload = []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        model = "A" if (state >> 33) % 2 == 0 else "B"
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        t += ((state >> 33) % 1000) / 1000 * 0.2
        out.append((t, model))
    return out


PROFILES: Dict[str, Workload] = {
    "single_model": single_model(40),
    "balanced": balanced(20),
    "bursty": bursty(10, 4),
    "dominant": dominant(50, 0.8),
    "interleave": interleave(30),
    "surge": surge(2, 20),
    "three_model": three_model(10),
    "random_50": random_mixed(50, 42),
    "random_100": random_mixed(100, 123),
    "random_200": random_mixed(200, 456),
    "dominant_95": dominant(80, 0.95),
    "heavy_burst": bursty(50, 6),
}

def _lcg(seed: int):
    state = seed
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        yield (state >> 33) / 2**31


def chat_with_batch(seed: int, duration: float, chat_gap: float, batch_at: Sequence[float]) -> Workload:
    """Interactive chat on A and B (each a request every `chat_gap` s on average: gaps drawn
    uniformly from 0 to twice that) and batch requests for C at `batch_at` (issue #23)."""
    rand = _lcg(seed)
    out: List[Tuple[float, str, Priority]] = []
    for model in ("A", "B"):
        t = next(rand) * chat_gap
        while t < duration:
            out.append((t, model, Priority.INTERACTIVE))
            t += next(rand) * 2 * chat_gap
    out += [(t, "C", Priority.BATCH) for t in batch_at]
    return sorted(out, key=lambda w: (w[0], w[1]))  # type: ignore[return-value]


#: mixed-priority profiles (issue #23): light interactive chat on two models (a request
#: every 10 s per model on average, for 300 s) and batch work on a third
PRIORITY_PROFILES: Dict[str, Workload] = {
    # a flood of 100 batch requests at t = 10 s
    "chat+flood": chat_with_batch(7, 300.0, 10.0, [10.0 + i * 0.01 for i in range(100)]),
    # a batch request every second for 280 s: more than the GPU can serve beside the chat
    "chat+stream": chat_with_batch(11, 300.0, 10.0, [i * 1.0 for i in range(280)]),
    # waves of 30 batch requests every 60 s
    "chat+waves": chat_with_batch(13, 300.0, 10.0, [w * 60.0 + i * 0.01 for w in range(5) for i in range(30)]),
}

#: llmux 0.7's best GPU % per (profile, switch cost), service 0.5 s (reference/llmux-policy-sim.md)
LLMUX_BEST_GPU: Dict[str, Tuple[float, float, float, float]] = {
    "single_model": (100.0, 100.0, 100.0, 100.0),
    "balanced": (90.9, 80.0, 66.7, 50.0),
    "bursty": (76.9, 66.7, 50.0, 33.3),
    "dominant": (92.6, 83.3, 71.4, 55.6),
    "interleave": (93.8, 85.7, 75.0, 60.0),
    "surge": (90.9, 80.0, 66.7, 50.0),
    "three_model": (83.3, 66.7, 50.0, 33.3),
    "random_50": (92.6, 83.3, 71.4, 55.6),
    "random_100": (96.2, 90.9, 83.3, 71.4),
    "random_200": (96.2, 90.9, 83.3, 71.4),
    "dominant_95": (95.2, 88.9, 80.0, 66.7),
    "heavy_burst": (97.4, 93.8, 88.2, 78.9),
}

#: llmux 0.7's TimeSlice max wait (s) per (profile, switch cost): its only max waits without
#: the simulator's 300 s straggler artefact, so the fair comparison for our waits
LLMUX_TIMESLICE_MAX_WAIT: Dict[str, Tuple[float, float, float, float]] = {
    "single_model": (15.7, 15.7, 15.7, 15.7),
    "balanced": (17.8, 20.8, 25.8, 35.8),
    "bursty": (10.4, 19.4, 29.4, 49.4),
    "dominant": (24.1, 27.1, 32.1, 42.1),
    "interleave": (31.2, 34.2, 39.2, 49.2),
    "surge": (16.8, 19.8, 24.8, 34.8),
    "three_model": (25.7, 34.7, 49.7, 79.7),
    "random_50": (22.0, 25.0, 30.0, 40.0),
    "random_100": (42.4, 45.4, 50.4, 60.4),
    "random_200": (83.6, 89.6, 99.6, 119.6),
    "dominant_95": (39.1, 42.1, 47.1, 57.1),
    "heavy_burst": (133.0, 139.0, 149.0, 169.0),
}


# ---------------------------------------------------------------------------- one run


@dataclass
class Result:
    profile: str
    policy: str
    switch_cost: float
    service: float
    requests: int
    served: int
    switches: int
    switch_time: float
    mean_wait: float
    max_wait: float
    cost_model: str = "sequential"
    #: waits (s) per priority ("interactive", "batch"), and when the last batch request finished
    waits: Dict[str, List[float]] = field(default_factory=dict)
    batch_done_at: float = 0.0

    @property
    def gpu_percent(self) -> float:
        busy = self.served * self.service
        return 100.0 * (1 - self.switch_time / (busy + self.switch_time)) if busy + self.switch_time else 100.0

    def p99(self, priority: str) -> float:
        waits = sorted(self.waits.get(priority, []))
        return waits[min(len(waits) - 1, int(0.99 * len(waits)))] if waits else 0.0


def simulate(
    profile: str,
    policy: str,
    switch_cost: float,
    service: float,
    *,
    cost_model: str = "sequential",
    priorities: bool = True,
    **policy_overrides: float,
) -> Result:
    """One run. `priorities=False` sends every request of a mixed profile as interactive."""
    workload = PROFILES.get(profile) or PRIORITY_PROFILES[profile]
    models = sorted({w[1] for w in workload})
    policy_cfg = {"type": policy, "request_timeout": NO_TIMEOUT, "drain_timeout": NO_TIMEOUT, **policy_overrides}
    config = make_config(models, policy=policy_cfg)
    sleep_s, wake_s = switch_delays(switch_cost, cost_model)

    async def main() -> Result:
        loop = asyncio.get_running_loop()
        backends = FakeBackends(config, wake_delay=wake_s, start_delay=wake_s, sleep_delay=sleep_s)
        backends.set_delay("start", 0.0, model=workload[0][1])  # the first activation is free
        switcher = Switcher(config, backends, clock=loop.time)
        switches: List[SwitchFinished] = []
        switcher.subscribe(lambda e: switches.append(e) if isinstance(e, SwitchFinished) else None)
        await switcher.start()
        gpu = asyncio.Lock()  # FIFO: the GPU serves one request at a time
        waits: Dict[str, List[float]] = {}
        batch_done = [0.0]
        served_asleep: List[str] = []  # I2: must stay empty

        async def request(arrival: float, model: str, priority: Priority) -> None:
            await asyncio.sleep(arrival)
            lease = await switcher.acquire(model, priority=priority if priorities else Priority.INTERACTIVE)
            with lease:
                async with gpu:
                    waits.setdefault(priority.value, []).append(max(0.0, loop.time() - arrival))
                    if backends.state(model) is not BackendState.READY:
                        served_asleep.append(model)
                    await asyncio.sleep(service)
            if priority is Priority.BATCH:
                batch_done[0] = max(batch_done[0], loop.time())

        await asyncio.gather(*(request(w[0], w[1], w[2] if len(w) > 2 else Priority.INTERACTIVE) for w in workload))
        await switcher.close()
        if served_asleep:
            raise AssertionError(f"{profile}/{policy}: {len(served_asleep)} requests served by a sleeping model")
        if backends.violations:
            raise AssertionError(f"{profile}/{policy}: budget violated: {backends.violations}")
        real = [s for s in switches if s.ok and s.from_model and s.to_model]
        switch_time = sum(s.phases.get("sleep", 0.0) + s.phases.get("wake", 0.0) for s in real)
        every = [w for ws in waits.values() for w in ws]
        return Result(
            profile, policy, switch_cost, service, len(workload), len(every), len(real), switch_time,
            statistics.fmean(every) if every else 0.0, max(every, default=0.0),
            cost_model, waits, batch_done[0],
        )

    result = run_virtual(main)
    assert result.served == result.requests, f"{profile}/{policy}: lost {result.requests - result.served} requests"
    return result


def sweep(service: float, costs: Sequence[float]) -> List[Result]:
    return [simulate(p, pol, sc, service) for p in PROFILES for sc in costs for pol in POLICIES]


# ---------------------------------------------------------------------------- output


def table(results: List[Result], markdown: bool, compare: bool) -> str:
    by_key: Dict[Tuple[str, float, float], Dict[str, Result]] = {}
    for r in results:
        by_key.setdefault((r.profile, r.switch_cost, r.service), {})[r.policy] = r
    head = ["profile", "sc", "svc"]
    for pol in POLICIES:
        head += [f"{pol} sw", f"{pol} GPU%", f"{pol} mean/max wait"]
    if compare:
        head += ["llmux best GPU%", "ours ≥", "llmux TS max wait"]
    rows = [head]
    shortfalls = 0
    for (profile, sc, svc), per in by_key.items():
        row = [profile, f"{sc:g}", f"{svc:g}"]
        for pol in POLICIES:
            r = per[pol]
            row += [str(r.switches), f"{r.gpu_percent:.1f}", f"{r.mean_wait:.1f}/{r.max_wait:.1f}"]
        if compare:
            ref = LLMUX_BEST_GPU[profile][SWITCH_COSTS.index(sc)]
            ours = max(per[p].gpu_percent for p in POLICIES)
            ok = ours + 0.05 >= ref
            shortfalls += not ok
            ts_wait = LLMUX_TIMESLICE_MAX_WAIT[profile][SWITCH_COSTS.index(sc)]
            row += [f"{ref:.1f}", "yes" if ok else f"NO ({ours:.1f})", f"{ts_wait:.1f}"]
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if compare:
        lines.append("")
        lines.append(f"profiles where our best GPU % is below llmux 0.7's best: {shortfalls}")
    return "\n".join(lines)


def aggregate(results: List[Result]) -> str:
    lines = ["aggregate (all profiles but single_model): GPU % and max wait per policy"]
    for sc in sorted({r.switch_cost for r in results}):
        parts = []
        for pol in POLICIES:
            rs = [r for r in results if r.policy == pol and r.switch_cost == sc and r.profile != "single_model"]
            busy = sum(r.served * r.service for r in rs)
            sw = sum(r.switch_time for r in rs)
            parts.append(f"{pol} {100 * (1 - sw / (busy + sw)):.1f}% / {max(r.max_wait for r in rs):.1f}s")
        lines.append(f"  sc={sc:g}s: " + ", ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- priority, overlap


def priority_table(costs: Sequence[float], markdown: bool) -> str:
    """Mixed-priority profiles, each run with priorities and without (every request interactive)."""
    head = ["profile", "sc", "policy", "interactive p99 wait: with / without", "interactive median wait: with / without",
            "batch mean wait: with / without", "batch done at: with / without", "GPU %: with / without", "lost"]
    rows = [head]
    for profile in PRIORITY_PROFILES:
        for sc in costs:
            for pol in POLICIES:
                on = simulate(profile, pol, sc, 0.5)
                off = simulate(profile, pol, sc, 0.5, priorities=False)
                lost = (on.requests - on.served) + (off.requests - off.served)
                rows.append([
                    profile, f"{sc:g}", pol,
                    f"{on.p99('interactive'):.1f} / {off.p99('interactive'):.1f}",
                    f"{statistics.median(on.waits['interactive']):.1f} / {statistics.median(off.waits['interactive']):.1f}",
                    f"{statistics.fmean(on.waits['batch']):.1f} / {statistics.fmean(off.waits['batch']):.1f}",
                    f"{on.batch_done_at:.0f} / {off.batch_done_at:.0f}",
                    f"{on.gpu_percent:.1f} / {off.gpu_percent:.1f}",
                    str(lost),
                ])
    return _render(rows, markdown)


def overlap_table(costs: Sequence[float], markdown: bool) -> str:
    """Aggregate GPU % (all profiles but single_model) per cost model, and the gain over sequential."""
    head = ["sc", "policy"] + [f"{m} GPU %" for m in COST_MODELS] + ["gain L1 (pp)", "gain L2 (pp)"]
    rows = [head]
    for sc in costs:
        for pol in POLICIES:
            gpu = []
            for model in COST_MODELS:
                rs = [simulate(p, pol, sc, 0.5, cost_model=model) for p in PROFILES if p != "single_model"]
                busy = sum(r.served * r.service for r in rs)
                sw = sum(r.switch_time for r in rs)
                gpu.append(100 * (1 - sw / (busy + sw)))
            rows.append([f"{sc:g}", pol] + [f"{g:.1f}" for g in gpu] +
                        [f"{gpu[1] - gpu[0]:+.1f}", f"{gpu[2] - gpu[0]:+.1f}"])
    return _render(rows, markdown)


def _render(rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


# ---------------------------------------------------------------------------- overhead


def overhead(iterations: int = 200_000) -> str:
    """Cost of the fast path (model awake): acquire + release, against a bare await."""
    config = make_config(["A"], policy={"type": "fifo"})

    async def main() -> Tuple[float, float]:
        backends = FakeBackends(config)
        switcher = Switcher(config, backends)
        await switcher.start()
        (await switcher.acquire("A")).release()

        async def bare() -> None:
            return None

        t0 = time.perf_counter()
        for _ in range(iterations):
            await bare()
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(iterations):
            lease = await switcher.acquire("A")
            lease.release()
        fast = time.perf_counter() - t0
        await switcher.close()
        return fast, base

    fast, base = asyncio.run(main())
    per = fast / iterations * 1e6
    per_base = base / iterations * 1e6
    return (
        f"fast-path acquire+release: {per:.2f} µs per request ({iterations} iterations); "
        f"a bare coroutine await: {per_base:.2f} µs; ratio {per / per_base:.1f}x"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--overhead", action="store_true", help="measure the fast-path overhead only")
    parser.add_argument("--priority", action="store_true",
                        help="mixed interactive/batch profiles, with priorities and without")
    parser.add_argument("--overlap", action="store_true",
                        help="aggregate GPU %% with the switch's halves overlapped vs sequential")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.overhead:
        print(overhead())
        return 0
    if args.priority or args.overlap:
        t0 = time.perf_counter()
        if args.priority:
            print("Mixed priority: service 0.5 s, waits in s (with priorities / every request interactive)\n")
            print(priority_table(SWITCH_COSTS, args.markdown))
        if args.overlap:
            print("\nOverlap cost model: aggregate GPU % over the main sweep's profiles (service 0.5 s)\n")
            print(overlap_table(SWITCH_COSTS, args.markdown))
        print(f"\n(no request lost, {time.perf_counter() - t0:.1f}s wall)")
        return 0
    t0 = time.perf_counter()
    main_sweep = sweep(0.5, SWITCH_COSTS)
    print("Main sweep: service 0.5 s, switch cost 2/5/10/20 s (sw = switches, waits in s)\n")
    print(table(main_sweep, args.markdown, compare=True))
    print()
    print(aggregate(main_sweep))
    print("\nSensitivity: switch cost 10 s, service 0.1/1/2 s\n")
    sens = [r for svc in SENSITIVITY_SERVICE for r in sweep(svc, (10.0,))]
    print(table(sens, args.markdown, compare=False))
    print(f"\n({len(main_sweep) + len(sens)} runs, no request lost, {time.perf_counter() - t0:.1f}s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
