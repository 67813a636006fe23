"""Test hook: `llmuxd run` whose requests take their priority from a header.

Why a hook, and why this one: in the product a request's priority comes from
its API key (issue #23's keys, built on another branch), and the stress
harness runs the daemon as a real process, with no in-process mode. So the
harness starts the daemon through this launcher, which wraps the front end's
inference handler to read `X-LLMux-Test-Priority` into a context variable and
the switcher's `acquire` to pass it on — the same `acquire(..., priority=…)`
call the key store makes. Everything below the HTTP handler (switcher,
policies, backends, the simulators) is the real thing. Tests only: the
product never reads this header.

    python tests/stress/priority_hook.py run --config FILE [--log-level L]
"""

from __future__ import annotations

import contextvars
import sys
from typing import Any, Optional

from llmuxd.http.app import FrontEnd
from llmuxd.priority import Priority
from llmuxd.switcher import Switcher

HEADER = "X-LLMux-Test-Priority"

_request_priority: "contextvars.ContextVar[Optional[Priority]]" = contextvars.ContextVar(
    "llmux_test_priority", default=None)
_infer = FrontEnd.infer
_acquire = Switcher.acquire


async def infer(self: FrontEnd, request: Any) -> Any:
    value = request.headers.get(HEADER)
    if value:
        _request_priority.set(Priority(value))  # this request's task only (aiohttp copies the context)
    return await _infer(self, request)


async def acquire(self: Switcher, model: str, timeout: Optional[float] = None, **kw: Any) -> Any:
    hooked = _request_priority.get()
    if hooked is not None:
        kw["priority"] = hooked
    return await _acquire(self, model, timeout, **kw)


def main() -> int:
    FrontEnd.infer = infer  # type: ignore[method-assign]
    Switcher.acquire = acquire  # type: ignore[method-assign]
    from llmuxd.daemon.main import main as daemon_main

    return daemon_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
