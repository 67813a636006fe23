"""The daemon's core, and `llmuxd run`: the embedded daemon.

`DaemonCore` wires one config and one `Backends` into a running daemon:
switcher, metrics (fed by switcher events), the HTTP front end and its
listening sockets, the optional startup warm-up, and one log line per switch.
It knows nothing of where backends live, so the system-mode daemon reuses it
with the systemd runtime and adds the bus, sd_notify and the watchdog.

`run_embedded` is `llmuxd run`: backends are subprocesses of this process
(SubprocessRuntime), HTTP binds the configured address, no root and no system
bus. SIGTERM or SIGINT stop the front end, then every backend.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any, Callable

from llmuxd.http import FrontEnd, HttpServer
from llmuxd.metrics import Metrics

log = logging.getLogger("llmuxd")

#: what the startup warm-up asks each model (llmux 0.7's deterministic prompt)
WARMUP_REQUEST = {
    "messages": [{"role": "user", "content": "What is 2+2? Reply with just the number."}],
    "temperature": 0,
    "seed": 42,
    "max_tokens": 10,
}
#: seconds the warm-up inference may take per model
WARMUP_TIMEOUT = 30.0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llmux")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+unknown"


def describe_switch(event: Any) -> str | None:
    """The one log line for a finished switch (None for other events)."""
    if not hasattr(event, "ok") or not hasattr(event, "duration"):
        return None
    src = event.from_model or "(nothing)"
    dst = event.to_model or "(sleep)"
    if getattr(event, "skipped", False):
        return f"switch {src} -> {dst} skipped: its requests were served or timed out"
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in (event.phases or {}).items() if v >= 0.005)
    detail = f" ({phases})" if phases else ""
    if event.ok:
        note = "; drain timed out, requests were cut" if getattr(event, "drain_timed_out", False) else ""
        return f"switch {src} -> {dst} ok in {event.duration:.2f}s{detail}{note}"
    return f"switch {src} -> {dst} FAILED after {event.duration:.2f}s{detail}: {event.error}"


def _log_switch(event: Any) -> None:
    line = describe_switch(event)
    if line is not None:
        # structured for journald (LLMUX_EVENT=, LLMUX_MODEL=, ...); a plain line elsewhere
        from llmuxd.daemon.journal import EVENT_SWITCH_FAILED, EVENT_SWITCH_FINISHED, log_event

        log_event(log, EVENT_SWITCH_FINISHED if event.ok else EVENT_SWITCH_FAILED, "%s", line,
                  level=logging.INFO if event.ok else logging.ERROR,
                  model=event.to_model or event.from_model, from_model=event.from_model,
                  to_model=event.to_model, group=event.group, duration=f"{event.duration:.3f}",
                  error=event.error)


class DaemonCore:
    """Switcher + metrics + front end over one `Backends`, from one config."""

    def __init__(
        self,
        config: Any,
        backends: Any,
        *,
        listen: str | None = None,
        sockets: list[socket.socket] | None = None,
        switcher: Any = None,
    ):
        from llmuxd.switcher import Switcher  # late: keeps `llmuxd --help` light

        self.config = config
        self.backends = backends
        self.version = _version()
        self.switcher = switcher if switcher is not None else Switcher(config, backends)
        self.metrics = Metrics()
        self.frontend = FrontEnd(config, self.switcher, self.metrics, version=self.version)
        self.app = self.frontend.make_app()
        self.http = HttpServer(self.app, listen=listen or config.listen, sockets=sockets)
        self._unsubscribe: list[Callable[[], None]] = []

    @property
    def addresses(self) -> list[str]:
        return self.http.addresses

    async def start(self) -> None:
        """Start switching, warm up if configured, then serve HTTP."""
        self._unsubscribe.append(self.switcher.subscribe(self.metrics.on_switch_event))
        self._unsubscribe.append(self.switcher.subscribe(_log_switch))
        await self.switcher.start()
        if getattr(self.config, "warmup", False):
            await self.warmup()
        await self.http.start()
        log.info("serving %d models on %s", len(self.config.models), ", ".join(self.addresses))

    async def warmup(self) -> None:
        """Start, infer once and sleep every model in turn (llmux 0.7's
        `warmup: true`), so the first real request to each is a wake, not a
        cold start. Any failure aborts startup with the model named."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WARMUP_TIMEOUT)) as http:
            for name in self.config.models:
                log.info("warm-up: starting %s", name)
                await self.switcher.switch(name, wait=True)
                lease = await self.switcher.acquire(name, timeout=self.frontend.request_timeout)
                try:
                    url = lease.endpoint.rstrip("/") + "/v1/chat/completions"
                    async with http.post(url, json={"model": name, **WARMUP_REQUEST}) as resp:
                        if resp.status != 200:
                            text = (await resp.text())[:200]
                            raise RuntimeError(f"warm-up of '{name}' got HTTP {resp.status}: {text}")
                        await resp.read()
                finally:
                    lease.release()
                await self.switcher.sleep_model(name)
                log.info("warm-up: %s ready and asleep (%s)", name, self.switcher.eviction_for(name))

    async def reload(self, config: Any) -> None:
        """Apply a new config: the switcher first (it validates and adds or
        removes models), then the front end. The listen address is not
        re-bound; changing it needs a restart."""
        await self.switcher.reload(config)
        self.config = config
        self.frontend.reload(config)

    async def stop(self) -> None:
        """Stop serving (running requests get a short grace), then switching."""
        await self.http.stop()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        await self.switcher.close()


class EmbeddedDaemon:
    """`llmuxd run`: DaemonCore on subprocess backends."""

    def __init__(self, config: Any, *, listen: str | None = None, sockets: list[socket.socket] | None = None):
        from llmuxd.orchestrator import Orchestrator
        from llmuxd.runtime.subprocess import SubprocessRuntime

        self.config = config
        self.runtime = SubprocessRuntime()
        self.orchestrator = Orchestrator(config, self.runtime)
        self.core = DaemonCore(config, self.orchestrator, listen=listen, sockets=sockets)

    async def start(self) -> None:
        await self.runtime.connect()
        try:
            await self.core.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        try:
            await self.core.stop()
        finally:
            await self.close_backends()

    async def close_backends(self) -> None:
        """Embedded backends are our children: they always stop with us."""
        try:
            await self.orchestrator.close(stop_backends=True)
        finally:
            await self.runtime.close()


async def run_embedded(config: Any, *, listen: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT; the exit status of `llmuxd run`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = EmbeddedDaemon(config, listen=listen)
    try:
        await daemon.start()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - startup errors are for people
        log.error("llmuxd could not start: %s", exc)
        return 1
    try:
        await stop.wait()
        log.info("stopping: closing the front end and stopping %d backends", len(config.models))
    finally:
        await daemon.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
