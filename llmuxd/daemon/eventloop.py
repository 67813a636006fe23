"""Which asyncio event loop the daemon runs on.

uvloop (libuv under asyncio's API) relays a proxied request with less CPU
than the standard loop (benchmarks/proxy_overhead.py), so the daemon uses it
whenever it is importable. `--event-loop asyncio` (or LLMUXD_EVENT_LOOP=asyncio
in the service's environment) turns it off, for debugging or to rule it out;
`--event-loop uvloop` insists on it and fails with the fix when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
from typing import Any, Callable, Coroutine, Optional

#: environment variable that sets the default of --event-loop
ENV_VAR = "LLMUXD_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

log = logging.getLogger(__name__)


class EventLoopUnavailable(RuntimeError):
    """The event loop asked for cannot be used; says why and what to do."""


def default_choice(environ: Optional[dict[str, str]] = None) -> str:
    """The --event-loop default: $LLMUXD_EVENT_LOOP, else auto."""
    env = os.environ if environ is None else environ
    return env.get(ENV_VAR, "").strip().lower() or "auto"


def add_option(parser: argparse.ArgumentParser) -> None:
    """--event-loop, defaulting to $LLMUXD_EVENT_LOOP (checked when the daemon starts)."""
    parser.add_argument("--event-loop", default=default_choice(), choices=CHOICES, type=str.lower,
                        help=f"asyncio event loop: auto (the default: uvloop when installed), uvloop "
                             f"or asyncio; ${ENV_VAR} sets the default")


def loop_factory(choice: str) -> tuple[Optional[LoopFactory], str]:
    """(factory for asyncio.Runner, the loop's name) for an --event-loop choice.

    auto: uvloop when importable, else the standard loop. The factory is None
    for the standard loop (asyncio's own default)."""
    if choice not in CHOICES:
        raise EventLoopUnavailable(
            f"event loop {choice!r} is unknown; choose one of {', '.join(CHOICES)} "
            f"(--event-loop or ${ENV_VAR})"
        )
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EventLoopUnavailable(
                "event loop 'uvloop' asked for but uvloop is not installed; "
                "install python3-uvloop (or pip install uvloop), or use --event-loop asyncio"
            ) from None
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def run(main: Coroutine[Any, Any, Any], choice: str) -> int:
    """Run a daemon's main coroutine on the chosen loop: its exit status, or 2
    (after logging why and what to do) when that loop cannot be had."""
    try:
        factory, name = loop_factory(choice)
    except EventLoopUnavailable as exc:
        main.close()  # never awaited: do not leave a warning behind
        log.error("%s", exc)
        return 2
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(main) or 0)


def freeze_startup_heap() -> None:
    """Once the daemon serves: collect, then move every object alive (modules,
    config, the app: ~50,000, all living as long as the process) out of the
    cyclic GC's reach (gc.freeze), so that a full collection walks only what
    requests made since. Before, each full collection took ~60 ms on the proxy
    benchmark's loaded 2-core machine, a few every second under load: about
    a tenth of a proxied request's CPU (benchmarks/README.md)."""
    gc.collect()
    gc.freeze()
