"""The daemon's core, and `llmuxd run`: the embedded daemon.

`DaemonCore` wires one config and one `Backends` into a running daemon:
switcher, metrics (fed by switcher events), the HTTP front end and its
listening sockets, the optional startup warm-up, and one log line per switch.
It knows nothing of where backends live, so the system-mode daemon reuses it
with the systemd runtime and adds the bus, sd_notify and the watchdog.

`run_embedded` is `llmuxd run`: backends are subprocesses of this process
(SubprocessRuntime), HTTP binds the configured address, no root and no system
bus. io.llmux.LLMux1 goes on the session bus when there is one (`--bus`), so
`llmuxctl --user` and `busctl --user` work. SIGHUP or the bus's Reload()
re-read the config file (a bad one changes nothing); SIGTERM or SIGINT stop
the front end, then every backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Any, Callable, Sequence

from llmuxd.daemon import eventloop
from llmuxd.http import FrontEnd, HttpServer
from llmuxd.eviction import STOP_EVICTION
from llmuxd.lifecycle import BackendState
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
    overlap = getattr(event, "overlap", None)
    if overlap:
        detail += "; overlapped" if overlap == "overlapped" else f"; sequential: {overlap}"
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


def load_keys(config: Any) -> list:
    """The API keys `config` puts in force (none with `auth: none`), warnings
    logged; raises ConfigError, one line per bad key file entry, before anything changes."""
    from llmuxd.keys.files import keys_for_config

    keys, warnings = keys_for_config(config)
    for warning in warnings:
        log.warning("keys: %s", warning)
    if getattr(config, "auth", "auto") == "none":
        if keys:
            log.warning("auth: none: the %d API key(s) found are not checked; every caller may use every model",
                        len(keys))
        return []
    return keys


def log_config_warnings(config: Any) -> None:
    """Each config warning (unknown keys, llmux 0.7 keys without effect) in the log,
    as `check-config` shows them: the daemon loads such a file, so say what it ignored."""
    for warning in getattr(config, "warnings", None) or ():
        log.warning("config: %s", warning)


#: settings a backend is launched with: a change needs a fresh start of that backend
LAUNCH_SETTINGS = ("model_path", "command", "port", "host", "extra_args", "env", "gpus",
                   "user", "sleep_mode", "checkpoint_path", "gpu_group", "engine")
#: how a backend whose launch settings changed is put away before it starts again
RESTART_EVICTION = STOP_EVICTION


def launch_settings_changed(old: Any, new: Any) -> list[str]:
    """The launch settings that differ between two configs of one model."""
    return [key for key in LAUNCH_SETTINGS if getattr(old, key, None) != getattr(new, key, None)]


def attach_checkpoints(config: Any, orchestrator: Any, *, quarantine: dict,
                       on_change: Callable[[], None] | None = None,
                       command_prefix: Sequence[str] = ()) -> Any:
    """Install the checkpoint room on an orchestrator: cuda_suspend and CRIU
    process steps, verified eviction, the post-wake canary. Unsafe-eviction
    verdicts are kept in `quarantine` (system mode persists it in state.json;
    `on_change` is called after each new verdict). `command_prefix` goes before
    every criu / cuda-checkpoint command (system mode: into the backends' mount
    namespace). Object store transfers are reported as journal events."""
    from llmuxd.checkpoint.canary import record_unsafe, unsafe_from_quarantine
    from llmuxd.checkpoint.manager import CheckpointManager

    def on_unsafe(model: str, eviction: str, reason: str) -> None:
        record_unsafe(quarantine, model, eviction, reason)
        if on_change is not None:
            on_change()

    from llmuxd.daemon.journal import transfer_reporter

    manager = CheckpointManager(config, on_unsafe=on_unsafe, command_prefix=list(command_prefix),
                                report=transfer_reporter(logging.getLogger("llmuxd.checkpoint.store")),
                                ).install(orchestrator)
    manager.canary.load_unsafe(unsafe_from_quarantine(quarantine))
    return manager


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
        checkpoints: Any = None,
        log_source: Any = None,
    ):
        from llmuxd.daemon.logsources import CapturedOutput
        from llmuxd.switcher import Switcher  # late: keeps `llmuxd --help` light

        self.config = config
        self.backends = backends
        self.checkpoints = checkpoints
        self.version = _version()
        self.switcher = switcher if switcher is not None else Switcher(config, backends)
        self.metrics = Metrics()
        if hasattr(backends, "on_unexpected_exit"):
            backends.on_unexpected_exit(self.metrics.on_backend_exit)
        if checkpoints is not None:
            self.metrics.effectiveness_source = lambda: checkpoints.effectiveness
        from llmuxd.http.auth import KeyGate

        #: the API keys in force (loaded by start() and reload()) and their per-key limits
        self.keys = KeyGate()
        self.frontend = FrontEnd(config, self.switcher, self.metrics, version=self.version, keys=self.keys)
        self.app = self.frontend.make_app()
        self.app.on_shutdown.append(self._refuse_waiters)
        self.http = HttpServer(self.app, listen=listen or config.listen, sockets=sockets)
        #: metrics_port's server (llmux 0.7's metrics server), on the host of the listen address
        self.metrics_http: HttpServer | None = None
        self._listen = listen or config.listen
        self._sockets = sockets
        self._unsubscribe: list[Callable[[], None]] = []
        #: the console's log lines: captured backend output here, the journal in system mode
        self.log_source = log_source if log_source is not None else CapturedOutput()

    @property
    def addresses(self) -> list[str]:
        return self.http.addresses

    async def _start_metrics_port(self) -> None:
        """Serve /metrics on metrics_port too. Bound here, not through
        HttpServer's own binding, so it never takes systemd's activation sockets."""
        port = getattr(self.config, "metrics_port", None)
        if not port:
            return
        from llmuxd.http.listen import beside, bind_listen

        address = beside(self._listen, port)
        sock = bind_listen(address, hint="set another metrics_port, or null to turn it off")
        self.metrics_http = HttpServer(self.frontend.make_metrics_app(), listen=address, sockets=[sock])
        await self.metrics_http.start()
        log.info("serving /metrics on %s (metrics_port)", ", ".join(self.metrics_http.addresses))

    def _use_keys(self, keys: list) -> None:
        from llmuxd.daemon.journal import EVENT_KEYS_LOADED, log_event

        self.keys.store.replace(keys)
        ids = ",".join(k.id for k in keys)
        log_event(log, EVENT_KEYS_LOADED, "API keys: %s", f"{len(keys)} in force ({ids})" if keys else
                  "none, the front end is open", count=len(keys), keys=ids or None)

    def _check_exposure(self) -> None:
        """Refuse to serve other hosts without keys (unless `auth: none`)."""
        from llmuxd.config import ConfigError, ConfigIssue
        from llmuxd.http.auth import exposure_problem
        from llmuxd.http.listen import socket_address

        addresses = [socket_address(s) for s in self._sockets] if self._sockets else [self._listen]
        problem = exposure_problem(addresses, self.keys.store.configured, getattr(self.config, "auth", "auto"))
        if problem is not None:
            source = (getattr(self.config, "sources", None) or ["<config>"])[0]
            raise ConfigError(ConfigIssue(source, "listen", problem))

    async def start(self) -> None:
        """Load the API keys, start switching, warm up if configured, then serve HTTP."""
        log_config_warnings(self.config)
        self._use_keys(load_keys(self.config))
        self._check_exposure()
        self._unsubscribe.append(self.switcher.subscribe(self.metrics.on_switch_event))
        self._unsubscribe.append(self.switcher.subscribe(_log_switch))
        await self.log_source.start()
        self.frontend.console.attach(self.switcher, self.log_source)
        await self.switcher.start()
        if getattr(self.config, "warmup", False):
            await self.warmup()
        await self.http.start()
        try:
            await self._start_metrics_port()
        except BaseException:
            await self.http.stop()
            raise
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

    async def reload(self, config: Any, api_keys: list | None = None) -> None:
        """Apply a new, already validated config: backends whose launch
        settings changed are put away (they start again on their next
        request), then the backends, the switcher (adds models, drains and
        stops removed ones) and the front end (request_timeout,
        max_body_bytes, /v1/models) take it. The listen address is not
        re-bound; changing it needs a restart. `api_keys` (else read for `config`)
        replace the API keys last: requests admitted under a revoked key finish."""
        old = self.config
        if api_keys is None:
            api_keys = load_keys(config)  # a bad key file raises here, before any change
        log_config_warnings(config)
        for key in ("listen", "metrics_port"):
            if getattr(old, key, None) != getattr(config, key, None):
                log.warning("%s changed from %s to %s: this takes a restart of llmuxd",
                            key, getattr(old, key, None), getattr(config, key, None))
        backend_state = getattr(self.backends, "state", None)
        for name, new_model in config.models.items():
            keys = launch_settings_changed(old.models[name], new_model) if name in old.models else []
            if not keys:
                continue
            log.info("model %s: %s changed; its backend restarts on its next request", name, ", ".join(keys))
            if self.switcher.status().models[name].state != "asleep":
                await self.switcher.sleep_model(name, RESTART_EVICTION)
            elif backend_state is not None and backend_state(name) not in (BackendState.NOT_STARTED,
                                                                           BackendState.STOPPED):
                await self.backends.stop(name)
        backends_reload = getattr(self.backends, "reload", None)
        if backends_reload is not None:  # the orchestrator learns new models before the switcher asks
            await backends_reload(config)
        await self.switcher.reload(config)
        if self.checkpoints is not None:
            for name in self.checkpoints.reload(config):
                log.info("model %s is no longer configured: its checkpoint images were deleted", name)
        self.config = config
        self.frontend.reload(config)
        self._use_keys(api_keys)

    async def _refuse_waiters(self, app: Any) -> None:
        """HTTP's drain is over with requests still waiting for a model: they
        get 503 (ShuttingDown, OpenAI envelope) instead of a dropped connection."""
        await self.switcher.close()

    async def stop(self) -> None:
        """Stop serving (what was accepted is served within the server's
        `shutdown_timeout`; see llmuxd/http/listen.py), then switching."""
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        self.frontend.console.detach()  # event streams end now rather than hold the drain
        await self.http.stop()
        await self.log_source.stop()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        await self.switcher.close()


#: `llmuxd run --bus`: where io.llmux.LLMux1 goes
BUS_AUTO, BUS_SESSION, BUS_NONE = "auto", "session", "none"
BUS_CHOICES = (BUS_AUTO, BUS_SESSION, BUS_NONE)
#: seconds to reach the session bus before giving up on it
BUS_CONNECT_TIMEOUT = 10.0


class BusUnavailable(RuntimeError):
    """`--bus session` was asked for and the session bus cannot be used."""


class EmbeddedDaemon:
    """`llmuxd run`: DaemonCore on subprocess backends, optionally on the session bus.

    `config_path` (with `dropin_dir`) is what reload() reads again; without
    it, reload is refused. `bus` is one of BUS_CHOICES: "auto" exports on the
    session bus when DBUS_SESSION_BUS_ADDRESS is set and reachable (and the
    name is free) and carries on without it otherwise; "session" insists."""

    def __init__(
        self,
        config: Any,
        *,
        listen: str | None = None,
        sockets: list[socket.socket] | None = None,
        config_path: str | None = None,
        dropin_dir: str | None = None,
        bus: str = BUS_NONE,
    ):
        from llmuxd.orchestrator import Orchestrator
        from llmuxd.runtime.subprocess import SubprocessRuntime

        if bus not in BUS_CHOICES:
            raise ValueError(f"bus must be one of {', '.join(BUS_CHOICES)}, not {bus!r}")
        self.config = config
        self.config_path = config_path
        self.dropin_dir = dropin_dir
        self.bus_mode = bus
        self.bus: Any = None
        self.service: Any = None
        self.runtime = SubprocessRuntime()
        self.orchestrator = Orchestrator(config, self.runtime)
        # verified eviction and the post-wake canary; verdicts live as long as the process
        self.checkpoints = attach_checkpoints(config, self.orchestrator, quarantine={})
        self.core = DaemonCore(config, self.orchestrator, listen=listen, sockets=sockets,
                               checkpoints=self.checkpoints)
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.runtime.connect()
        for problem in await self.checkpoints.preflight():
            log.warning("%s", problem)
        from llmuxd.checkpoint.manager import embedded_checkpoint_problem
        from llmuxd.eviction import ProcessStrategy

        for name, mc in self.config.models.items():
            if mc.eviction.process is ProcessStrategy.CHECKPOINT:
                log.warning("%s", embedded_checkpoint_problem(name, mc.eviction))
        try:
            await self._export_bus()
            await self.core.start()
        except BaseException:
            await self.stop()
            raise

    # -- the session bus ------------------------------------------------------

    async def _export_bus(self) -> None:
        """Own io.llmux.LLMux1 on the session bus, per `bus_mode`."""
        if self.bus_mode == BUS_NONE:
            return
        insist = self.bus_mode == BUS_SESSION
        if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            self._no_bus(insist, "DBUS_SESSION_BUS_ADDRESS is not set")
            return
        from llmuxd.bus.auth import AllowAll
        from llmuxd.bus.connection import open_bus
        from llmuxd.bus.service import export_service

        try:
            self.bus = await asyncio.wait_for(open_bus(system=False), BUS_CONNECT_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, bad address
            self._no_bus(insist, f"cannot connect to it ({_one_line(exc)})")
            return
        # The session bus admits only the user who owns it (its policy), so
        # every caller is this daemon's own user: no polkit, nothing to ask.
        self.service = await export_service(self.bus, self.core.switcher, reload=self.reload,
                                            version=self.core.version, authorizer=AllowAll(),
                                            unit_names=False, key_usage=self.core.keys.usage)
        try:
            await self.service.request_name()
        except RuntimeError as exc:
            await self._close_bus()
            self._no_bus(insist, str(exc))
            return
        from llmuxd.names import BUS_NAME

        log.info("on the session bus as %s (llmuxctl --user, busctl --user)", BUS_NAME)

    @staticmethod
    def _no_bus(insist: bool, why: str) -> None:
        if insist:
            raise BusUnavailable(f"--bus session: the session bus cannot be used: {why}; "
                                 "run inside a desktop/login session or with dbus-run-session, "
                                 "or pass --bus none")
        log.info("not on D-Bus (no usable session bus: %s); llmuxctl --user will not reach this daemon", why)

    async def _close_bus(self) -> None:
        service, bus = self.service, self.bus
        self.service = self.bus = None
        if service is not None:
            await service.close()
        if bus is not None:
            bus.disconnect()

    # -- reload ---------------------------------------------------------------

    async def reload(self) -> None:
        """Read the config file again and apply it (SIGHUP, bus Reload()).
        A config that does not validate raises ConfigError and changes nothing."""
        from llmuxd.config import ConfigError, ConfigIssue, load_config

        if self.config_path is None:
            raise ConfigError(ConfigIssue("<embedded>", "", "this daemon was started without a config "
                                          "file to read again; restart it to change the configuration"))
        async with self._reload_lock:
            try:
                new = load_config(self.config_path, self.dropin_dir)  # validates; raises before any change
                keys = load_keys(new)
            except ConfigError as exc:
                log.error("reload refused, the running configuration and API keys stay:\n%s", exc)
                raise
            old = self.config
            await self.core.reload(new, keys)
            self.config = new
            added = [m for m in new.models if m not in old.models]
            removed = [m for m in old.models if m not in new.models]
            log.info("reloaded %s: %d models (added: %s; removed: %s)", self.config_path, len(new.models),
                     ", ".join(added) or "none", ", ".join(removed) or "none")

    # -- stop -----------------------------------------------------------------

    async def stop(self) -> None:
        try:
            await self._close_bus()
            await self.core.stop()
        finally:
            await self.close_backends()

    async def close_backends(self) -> None:
        """Embedded backends are our children: they always stop with us."""
        try:
            await self.orchestrator.close(stop_backends=True)
        finally:
            await self.runtime.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def run_embedded(
    config: Any,
    *,
    listen: str | None = None,
    config_path: str | None = None,
    dropin_dir: str | None = None,
    bus: str = BUS_AUTO,
) -> int:
    """Serve until SIGTERM or SIGINT, reloading on SIGHUP; the exit status of `llmuxd run`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = EmbeddedDaemon(config, listen=listen, config_path=config_path, dropin_dir=dropin_dir, bus=bus)
    reloads: set[asyncio.Task] = set()
    ready = False

    def on_sighup() -> None:
        if not ready:  # SIGHUP's default would kill us mid-start; the file is read at start anyway
            log.info("SIGHUP during startup ignored: the config file was just read")
            return
        task = loop.create_task(_reload_logged(daemon))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        try:
            await daemon.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - startup errors are for people
            log.error("llmuxd could not start: %s", exc)
            return 1
        ready = True
        eventloop.freeze_startup_heap()
        try:
            await stop.wait()
            log.info("stopping: closing the front end and stopping %d backends", len(daemon.config.models))
        finally:
            for task in list(reloads):
                task.cancel()
            await asyncio.gather(*reloads, return_exceptions=True)
            await daemon.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


async def _reload_logged(daemon: EmbeddedDaemon) -> None:
    """SIGHUP: reload; a refused config was logged already, nothing else to do."""
    from llmuxd.config import ConfigError

    try:
        await daemon.reload()
    except ConfigError:
        pass
    except Exception:  # noqa: BLE001 - a failed reload must not end the daemon
        log.exception("reload on SIGHUP failed")
