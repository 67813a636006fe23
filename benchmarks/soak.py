#!/usr/bin/env python3
"""Soak: many mixed requests over three models, with periodic switches and
faults, through a real `llmuxd run` on `llmux-vllm-sim` backends.

What it reports, and what must hold:

- lost (no answer before request_timeout + grace) and misrouted (a 200 from a
  model other than the one asked for, by the simulator's stamp): must be 0;
- cut (a 200 whose generation was aborted, garbage, or a stream without
  [DONE] that was not hit by an injected crash) and invariant violations
  (the stress watcher: GPU ledger, /v1/models, requests held in a sleeping
  engine): must be 0;
- statuses: 502/504 are expected only from the faults it injects;
- queue wait p50/p99 (from the daemon's llmux_request_queue_wait_seconds
  histogram, interpolated like Prometheus' histogram_quantile) and client
  latency p50/p99;
- daemon RSS at the start (after warm-up) and at the end: it should be flat.

Load: batches of 200 requests, at most 64 in flight; each batch favours one
model (70 %), so the active model changes batch to batch; 30 % streams.
Every 5th batch arms one fault in a random simulator: a failed wake, a
failed sleep, a failed reload_weights, or a crash.

    .venv/bin/python benchmarks/soak.py                    # 10,000 requests, several minutes
    .venv/bin/python benchmarks/soak.py --requests 2000    # a shorter run

Exit status 1 when anything is lost, misrouted, cut or violated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests" / "stress"))

from harness import (  # noqa: E402  (the stress suite's harness: same daemon, client and watcher)
    LOST_GRACE, REQUEST_TIMEOUT, Daemon, Outcome, Req, SimModel, Watcher, send, write_config,
)

MODELS = ["alpha", "beta", "gamma"]
BATCH = 200
CONCURRENCY = 64
FAULTS = ("fail_wake", "fail_sleep", "fail_reload", "crash")
#: statuses an injected fault may cause (502: a failed wake/start; 504: waiting past the timeout)
FAULT_STATUSES = frozenset({502, 504})


def sim_models() -> list[SimModel]:
    return [SimModel("alpha", eviction="offload+keep_running", tokens_per_s=400),
            SimModel("beta", eviction="discard+keep_running", tokens_per_s=400),
            SimModel("gamma", eviction="offload+freeze", tokens_per_s=400)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def histogram_quantile(q: float, text: str, name: str) -> float:
    """Prometheus' histogram_quantile over every label set of `name`."""
    buckets: dict[float, float] = {}
    for le, value in re.findall(r'%s_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)' % re.escape(name), text):
        bound = math.inf if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + float(value)
    if not buckets:
        return float("nan")
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return float("nan")
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_bound, prev_count = bound, count
    return bounds[-1]


def batch_requests(rng: random.Random, n: int) -> list[Req]:
    favourite = rng.choice(MODELS)
    reqs = []
    for _ in range(n):
        model = favourite if rng.random() < 0.7 else rng.choice(MODELS)
        reqs.append(Req(model, stream=rng.random() < 0.3, max_tokens=rng.randint(1, 16),
                        kind="completion" if rng.random() < 0.1 else "chat"))
    return reqs


async def soak(total: int, seed: int, workdir: Path) -> dict:
    rng = random.Random(seed)
    daemon = Daemon(write_config(workdir, sim_models(), policy={"failure_backoff": 0.2}),
                    workdir / "llmuxd.log", log_level="warning").start()
    outcomes: list[Outcome] = []
    faults: list[tuple[int, str, str]] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for model in MODELS:  # warm-up: every backend started once
                await send(session, daemon.base, Req(model), REQUEST_TIMEOUT + LOST_GRACE)
            rss_start = rss_mb(daemon.pid)
            watcher = Watcher(daemon, session, interval=0.2)
            watcher.start()
            gate = asyncio.Semaphore(CONCURRENCY)
            t0 = time.monotonic()

            async def one(r: Req) -> Outcome:
                async with gate:
                    return await send(session, daemon.base, r, REQUEST_TIMEOUT + LOST_GRACE)

            batch_no = 0
            while len(outcomes) < total:
                n = min(BATCH, total - len(outcomes))
                if batch_no % 5 == 4:
                    model, kind = rng.choice(MODELS), rng.choice(FAULTS)
                    try:
                        await asyncio.to_thread(daemon.fault, model, kind)
                        faults.append((len(outcomes), model, kind))
                    except (AssertionError, OSError):
                        pass  # that backend is not running right now: nothing to arm
                outcomes.extend(await asyncio.gather(*(one(r) for r in batch_requests(rng, n))))
                batch_no += 1
                done = len(outcomes)
                print(f"  {done}/{total} requests, {time.monotonic() - t0:.0f}s, "
                      f"rss {rss_mb(daemon.pid):.0f} MB", file=sys.stderr, flush=True)
            wall = time.monotonic() - t0
            await asyncio.to_thread(daemon.wait_for, "leases back",
                                    lambda m: all(not s["in_flight"] and not s["queue_depth"] for s in m.values()))
            await watcher.stop()
            metrics = await (await session.get(daemon.base + "/metrics")).text()
            rss_end = rss_mb(daemon.pid)
    finally:
        rc = daemon.stop()

    crashed = {model for _, model, kind in faults if kind == "crash"}
    allowed = frozenset({200}) | FAULT_STATUSES
    kinds: dict[str, int] = {}
    examples: list[str] = []
    for o in outcomes:
        for p in o.problems(allowed):
            kind = p.split(":", 1)[0]
            if kind == "cut" and o.req.model in crashed:
                kind = "cut by an injected crash"
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind in ("lost", "misrouted", "cut", "unexpected", "garbage") and len(examples) < 10:
                examples.append(p)
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = "abandoned" if o.abandoned else ("lost" if o.lost else str(o.status))
        statuses[key] = statuses.get(key, 0) + 1
    latencies = sorted(o.elapsed for o in outcomes if o.status == 200)
    switches = sum(float(v) for v in re.findall(r'llmux_switch_total\{[^}]*result="ok"[^}]*\} (\S+)', metrics))
    failed = sum(float(v) for v in re.findall(r'llmux_switch_total\{[^}]*result="failed"[^}]*\} (\S+)', metrics))
    return {
        "requests": len(outcomes),
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(outcomes) / wall, 1),
        "lost": kinds.get("lost", 0),
        "misrouted": kinds.get("misrouted", 0),
        "cut": kinds.get("cut", 0) + kinds.get("garbage", 0),
        "cut_by_injected_crash": kinds.get("cut by an injected crash", 0),
        "unexpected_status": kinds.get("unexpected", 0),
        "invariant_violations": watcher.violations,
        "statuses": dict(sorted(statuses.items())),
        "faults_injected": [f"{model}:{kind}@{at}" for at, model, kind in faults],
        "switches_ok": int(switches),
        "switches_failed": int(failed),
        "queue_wait_p50_s": round(histogram_quantile(0.5, metrics, "llmux_request_queue_wait_seconds"), 3),
        "queue_wait_p99_s": round(histogram_quantile(0.99, metrics, "llmux_request_queue_wait_seconds"), 3),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "daemon_rss_start_mb": round(rss_start, 1),
        "daemon_rss_end_mb": round(rss_end, 1),
        "daemon_exit": rc,
        "examples": examples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmux-soak-") as tmp:
        result = asyncio.run(soak(args.requests, args.seed, Path(tmp)))
    print(json.dumps(result, indent=2))
    bad = (result["lost"] or result["misrouted"] or result["cut"] or result["unexpected_status"]
           or result["invariant_violations"] or result["daemon_exit"] != 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
