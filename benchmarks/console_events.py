#!/usr/bin/env python3
"""What the console's event stream costs llmuxd: CPU µs per log line and per switch.

The console's real routes (`llmuxd.http.console`) are served by aiohttp in this process;
0, 1 and 10 readers follow `/llmux/v1/events` with `curl -N` (separate processes, not
counted). Then, at a steady rate:

  log line   a backend line through the `llmuxd.backend` logger, as the subprocess
             runtime emits it; the cost is the CPU of the run with the console's log
             source attached minus the same run without it (logging itself is paid either way)
  switch     the events of one switch (SwitchStarted, five state changes,
             SwitchFinished with its phases) handed to the hub as the switcher does,
             with a status frame from a realistic status; the cost is the run's CPU minus
             an idle run of the same length

CPU is this process's (time.process_time: the hub, the SSE writes, the event loop).
Each figure is the median of --rounds runs.

    python benchmarks/console_events.py              # ~1 minute
    python benchmarks/console_events.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from aiohttp import web  # noqa: E402
from ports import free_port  # noqa: E402

from llmuxd.daemon.logsources import CapturedOutput  # noqa: E402
from llmuxd.events import ModelStateChanged, SwitchFinished, SwitchStarted  # noqa: E402
from llmuxd.http.console import Console  # noqa: E402

#: a status as two models' console shows it
STATUS = {
    "version": "0.1.0", "mode": "auto", "pinned": None, "state": "active:a", "policy": "fifo",
    "models": {name: {"state": "active", "process_state": "running", "eviction": "offload+keep_running",
                      "group": "default", "in_flight": 3, "queue_depth": 0, "wait_estimate": 0.0,
                      "last_error": None, "last_switch_s": 1.2, "gpu_memory_gib": None, "pinned": False}
               for name in ("a", "b")},
    "groups": {"default": {"budget_gib": None, "used_gib": None, "used_ratio": 1.0, "awake": ["a"], "state": "active"}},
}
LINE = 'INFO 12-06 03:52:04 [llmux-sim] "POST /v1/chat/completions" 200 0.003s'


def one_switch(n: int) -> list:
    a, b = ("a", "b") if n % 2 else ("b", "a")
    return [SwitchStarted("default", a, b, "fifo: 1 request(s) waiting"),
            ModelStateChanged(a, "draining"), ModelStateChanged(a, "evicting"), ModelStateChanged(a, "asleep"),
            ModelStateChanged(b, "waking"), ModelStateChanged(b, "active"),
            SwitchFinished("default", a, b, ok=True, duration=1.5, phases={"drain": 0.1, "sleep": 0.4, "wake": 1.0},
                           reason="fifo: 1 request(s) waiting")]


async def paced(total: int, rate: float, act) -> float:
    """CPU seconds of doing `act(i)` for i < total at `rate` per second, plus a flush."""
    burst = max(1, int(rate / 100))
    start = time.process_time()
    for i in range(0, total, burst):
        for j in range(i, min(total, i + burst)):
            act(j)
        await asyncio.sleep(burst / rate)
    await asyncio.sleep(0.3)  # the readers' last batch
    return time.process_time() - start


async def measure(readers: int, args: argparse.Namespace) -> dict[str, float]:
    console = Console(None)
    console.hub.status_fn = lambda: STATUS
    source = CapturedOutput()
    app = web.Application()
    console.register(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    curls = [subprocess.Popen(["curl", "-sN", "-o", "/dev/null", f"http://127.0.0.1:{port}/llmux/v1/events"])
             for _ in range(readers)]
    backend = logging.getLogger("llmuxd.backend")
    backend.setLevel(logging.INFO)
    logging.getLogger("llmuxd").propagate = False  # to the console's source, not to stderr
    try:
        while console.hub.readers < readers:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)

        def log_line(i: int) -> None:
            backend.info("[a] %s", LINE, extra={"llmux_model": "a"})

        without = await paced(args.lines, args.rate, log_line)
        await source.start()
        source.follow(console.hub.on_event)
        seq = console.hub.seq
        with_source = await paced(args.lines, args.rate, log_line)
        await source.stop()
        if console.hub.seq - seq < args.lines:  # a verdict must fail when it measured nothing
            sys.exit(f"console_events: the hub saw {console.hub.seq - seq} of {args.lines} log lines")

        idle = await paced(args.switches, args.switch_rate, lambda i: None)

        def switch(i: int) -> None:
            for event in one_switch(i):
                console.hub.on_event(event)

        switching = await paced(args.switches, args.switch_rate, switch)
    finally:
        console.detach()
        for c in curls:
            c.terminate()
            c.wait(10)
        await runner.cleanup()
    return {"log_us": (with_source - without) / args.lines * 1e6,
            "switch_us": (switching - idle) / args.switches * 1e6}


async def main_async(args: argparse.Namespace) -> None:
    rows = {}
    for readers in args.readers:
        runs = [await measure(readers, args) for _ in range(args.rounds)]
        rows[readers] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    import aiohttp
    print(f"console event stream: python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
          f"{args.rounds} rounds, {args.lines} log lines at {args.rate:.0f}/s, "
          f"{args.switches} switches at {args.switch_rate:.0f}/s; medians\n")
    print("| readers | CPU µs per log line | CPU µs per switch |")
    print("|---|---|---|")
    for readers, row in rows.items():
        print(f"| {readers} | {row['log_us']:.1f} | {row['switch_us']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=4000.0, help="log lines per second")
    parser.add_argument("--switches", type=int, default=400)
    parser.add_argument("--switch-rate", type=float, default=100.0, help="switches per second")
    parser.add_argument("--readers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 10])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.lines, args.switches = 1, 4000, 100
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
