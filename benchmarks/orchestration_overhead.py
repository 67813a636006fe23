"""What the orchestrator adds on top of the backend's own time, per runtime.

    python benchmarks/orchestration_overhead.py [--iterations 5]

For each runtime (subprocess always; systemd when root, on a test systemd
booted from tests/sysd) it runs the simulator and reports medians in ms:

- start-to-ready: Orchestrator.ensure_awake on a stopped model, minus the
  simulator's configured load time; beside it the same simulator started bare
  (subprocess + /health poll every 10 ms), so the difference is ours
- sleep / wake (offload+keep_running): the orchestrator call minus the same
  engine call made directly against the same backend
- freeze / thaw (retain+freeze): the orchestrator's sleep and wake

No thresholds: numbers are side-by-side ratios on one machine, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from llmuxd.config import Config  # noqa: E402
from llmuxd.engine.vllm import VllmClient  # noqa: E402
from llmuxd.eviction import Eviction  # noqa: E402
from llmuxd.orchestrator import Orchestrator  # noqa: E402
from llmuxd.runtime.subprocess import SubprocessRuntime  # noqa: E402
from llmuxd.runtime.systemd import SystemdRuntime  # noqa: E402
from sysd.helpers import free_port  # noqa: E402
from sysd.testbed import TestSystemd, unavailable_reason  # noqa: E402

LOAD_TIME = 0.5  # LLMUX_SIM_LOAD_TIME: the simulator's own "model load"
SIM = [sys.executable, "-m", "llmuxd.sim.server", "serve"]
OFFLOAD = Eviction.parse("offload+keep_running")
FREEZE = Eviction.parse("retain+freeze")
METRICS = [
    ("bare simulator start (no llmux)", "bare_start"),
    ("start-to-ready - load time", "start"),
    ("  overhead vs bare start", "start_overhead"),
    ("sleep offload (direct engine call)", "sleep_direct"),
    ("sleep offload via orchestrator", "sleep"),
    ("wake offload (direct engine call)", "wake_direct"),
    ("wake offload via orchestrator", "wake"),
    ("freeze (retain+freeze sleep)", "freeze"),
    ("thaw (wake + health)", "thaw"),
]


async def timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    await fn()
    return (time.perf_counter() - t0) * 1000


def model(name: str, eviction: str) -> dict:
    return {
        "model_path": f"/models/{name}", "command": SIM, "port": free_port(), "eviction": eviction,
        "env": {"LLMUX_SIM_LOAD_TIME": str(LOAD_TIME)}, "startup_timeout": 120,
    }


async def bare_start_ms() -> float:
    """The simulator started without llmux: exec to first 200 on /health."""
    port = free_port()
    env = {**os.environ, "LLMUX_SIM_LOAD_TIME": str(LOAD_TIME), "VLLM_SERVER_DEV_MODE": "1"}
    client = VllmClient(f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    proc = subprocess.Popen([*SIM, "/models/bare", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                await client.health(timeout=1)
                break
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.01)
        return (time.perf_counter() - t0) * 1000 - LOAD_TIME * 1000
    finally:
        proc.terminate()
        proc.wait()
        await client.close()


async def measure(runtime_factory: Callable, iterations: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {key: [] for _, key in METRICS}
    runtime = runtime_factory()
    await runtime.connect()
    config = Config.from_dict({"user": "root", "models": {
        "bench-offload": model("bench-offload", "offload+keep_running"),
        "bench-freeze": model("bench-freeze", "retain+freeze"),
    }})
    orch = Orchestrator(config, runtime, stop_timeout=10)
    direct = VllmClient(orch.endpoint("bench-offload"))
    try:
        for _ in range(iterations):
            samples["bare_start"].append(await bare_start_ms())
            start = await timed(lambda: orch.ensure_awake("bench-offload")) - LOAD_TIME * 1000
            samples["start"].append(start)
            samples["start_overhead"].append(start - samples["bare_start"][-1])
            await direct.is_sleeping()  # connection set up outside the timing
            samples["sleep_direct"].append(await timed(lambda: direct.sleep(1)))
            samples["wake_direct"].append(await timed(direct.wake_up))
            samples["sleep"].append(await timed(lambda: orch.sleep("bench-offload", OFFLOAD)))
            samples["wake"].append(await timed(lambda: orch.ensure_awake("bench-offload")))
            await orch.stop("bench-offload")

            await orch.ensure_awake("bench-freeze")
            samples["freeze"].append(await timed(lambda: orch.sleep("bench-freeze", FREEZE)))
            samples["thaw"].append(await timed(lambda: orch.ensure_awake("bench-freeze")))
    finally:
        await direct.close()
        await orch.close()
        await runtime.close()
    return {key: statistics.median(values) for key, values in samples.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()

    columns: dict[str, dict[str, float] | str] = {}
    columns["subprocess"] = await measure(SubprocessRuntime, args.iterations)
    reason = unavailable_reason()
    if reason:
        columns["systemd"] = f"skipped: {reason}"
    else:
        bed = TestSystemd.boot()
        try:
            columns["systemd"] = await measure(lambda: SystemdRuntime(bus_address=bed.bus_address), args.iterations)
        finally:
            bed.down()

    print(f"orchestration overhead, medians of {args.iterations} runs (ms; simulator load time {LOAD_TIME}s removed)")
    print(f"{'':38} {'subprocess':>12} {'systemd':>12}")
    for label, key in METRICS:
        cells = [f"{col[key]:12.1f}" if isinstance(col, dict) else f"{'n/a':>12}" for col in columns.values()]
        print(f"{label:38} {' '.join(cells)}")
    for name, col in columns.items():
        if isinstance(col, str):
            print(f"{name}: {col}")


if __name__ == "__main__":
    asyncio.run(main())
