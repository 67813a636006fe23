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
"""

from __future__ import annotations

import argparse
import logging
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fakes import FakeBackends, make_config, run_virtual  # noqa: E402

from llmuxd.events import SwitchFinished  # noqa: E402
from llmuxd.lifecycle import BackendState  # noqa: E402
from llmuxd.switcher import Switcher  # noqa: E402

POLICIES = ("fifo", "cost_aware", "time_slice")
SWITCH_COSTS = (2.0, 5.0, 10.0, 20.0)
SENSITIVITY_SERVICE = (0.1, 1.0, 2.0)
#: no request may time out in the benchmark: losing one would be the bug it looks for
NO_TIMEOUT = 1e9

Workload = List[Tuple[float, str]]  # (arrival s, model)


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

    @property
    def gpu_percent(self) -> float:
        busy = self.served * self.service
        return 100.0 * (1 - self.switch_time / (busy + self.switch_time)) if busy + self.switch_time else 100.0


def simulate(profile: str, policy: str, switch_cost: float, service: float, **policy_overrides: float) -> Result:
    workload = PROFILES[profile]
    models = sorted({m for _, m in workload})
    policy_cfg = {"type": policy, "request_timeout": NO_TIMEOUT, "drain_timeout": NO_TIMEOUT, **policy_overrides}
    config = make_config(models, policy=policy_cfg)

    async def main() -> Result:
        loop = asyncio.get_running_loop()
        backends = FakeBackends(config, wake_delay=switch_cost, start_delay=switch_cost)
        backends.set_delay("start", 0.0, model=workload[0][1])  # the first activation is free
        switcher = Switcher(config, backends, clock=loop.time)
        switches: List[SwitchFinished] = []
        switcher.subscribe(lambda e: switches.append(e) if isinstance(e, SwitchFinished) else None)
        await switcher.start()
        gpu = asyncio.Lock()  # FIFO: the GPU serves one request at a time
        waits: List[float] = []
        served_asleep: List[str] = []  # I2: must stay empty

        async def request(arrival: float, model: str) -> None:
            await asyncio.sleep(arrival)
            lease = await switcher.acquire(model)
            with lease:
                async with gpu:
                    waits.append(max(0.0, loop.time() - arrival))
                    if backends.state(model) is not BackendState.READY:
                        served_asleep.append(model)
                    await asyncio.sleep(service)

        await asyncio.gather(*(request(t, m) for t, m in workload))
        await switcher.close()
        if served_asleep:
            raise AssertionError(f"{profile}/{policy}: {len(served_asleep)} requests served by a sleeping model")
        if backends.violations:
            raise AssertionError(f"{profile}/{policy}: budget violated: {backends.violations}")
        real = [s for s in switches if s.ok and s.from_model and s.to_model]
        switch_time = sum(s.phases.get("sleep", 0.0) + s.phases.get("wake", 0.0) for s in real)
        return Result(
            profile, policy, switch_cost, service, len(workload), len(waits), len(real), switch_time,
            statistics.fmean(waits) if waits else 0.0, max(waits, default=0.0),
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.overhead:
        print(overhead())
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
