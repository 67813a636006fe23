"""System mode: `llmuxd [--config FILE]`, the daemon systemd runs.

Root, the system bus (or $DBUS_SYSTEM_BUS_ADDRESS), backends as transient
units through PID 1, HTTP on the sockets llmux.socket passes (or the
configured address without activation), io.llmux.LLMux1 on the bus. On top
of the embedded core (`DaemonCore`) this adds what a system service owes its
service manager and its operator:

- sd_notify: READY=1 once the bus name is owned, running units are adopted
  and HTTP is served; STATUS= kept current; WATCHDOG=1 from the event loop;
  RELOADING=1 / READY=1 around reloads; STOPPING=1 on SIGTERM.
- Reload (bus Reload(), which ExecReload= calls, or SIGHUP): the new config
  is validated first, a bad one changes nothing and fails the reload.
- Restart without loss: run-time overrides, mode, pin and learned switch
  costs live in state.json; backends keep running and are adopted.
- journald: structured events (LLMUX_EVENT=, LLMUX_MODEL=, MESSAGE_ID=).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
from typing import Any, Callable

from llmuxd.config import ConfigError, load_config
from llmuxd.daemon import eventloop, journal
from llmuxd.daemon.journal import log_event
from llmuxd.daemon.notify import Notifier, format_status
from llmuxd.daemon.state import DaemonState, StateStore
from llmuxd.daemon.embedded import launch_settings_changed, load_keys
from llmuxd.lifecycle import BackendState

log = logging.getLogger("llmuxd")

DEFAULT_CONFIG = "/etc/llmux/llmux.yaml"
#: sysexits.h EX_CONFIG: systemd does not restart it (RestartPreventExitStatus=78)
EXIT_CONFIG = 78
#: sysexits.h EX_UNAVAILABLE: no system bus / no systemd / bus name taken
EXIT_UNAVAILABLE = 69
#: seconds in-flight requests get to finish at shutdown: TimeoutStopSec= (90 s)
#: leaves room for the end grace (llmuxd/http/listen.py END_GRACE) and the rest
SHUTDOWN_DRAIN = 60.0
#: seconds between STATUS= refreshes and state.json checks
HOUSEKEEPING_INTERVAL = 1.0
#: the name of the task that sends WATCHDOG=1
WATCHDOG_TASK = "llmuxd-watchdog"
#: the activation socket llmux.socket names (FileDescriptorName=)
HTTP_FD_NAME = "http"
def status_line(status: Any, backend_state: Callable[[str], BackendState]) -> str:
    """STATUS= from the switcher's picture: 'active: qwen · 2 sleeping · 0 queued'."""
    sleeping = sum(
        1 for name, ms in status.models.items()
        if ms.state == "asleep" and backend_state(name) in (BackendState.SLEEPING, BackendState.CHECKPOINTED)
    )
    queued = sum(ms.queue_depth for ms in status.models.values())
    switching = status.state.split(":", 1)[1] if status.state.startswith("switching:") else None
    return format_status(list(status.active_models), sleeping, queued,
                         switching=switching.replace("->", " -> ") if switching else None,
                         pinned=status.pinned)


def backend_mount_prefix(nsenter: str | None = None) -> list[str]:
    """What runs criu and cuda-checkpoint in the backends' mount namespace.

    The unit's sandbox (ProtectSystem=, PrivateTmp=, ...) gives llmuxd a mount
    namespace of its own, while the backends' units share PID 1's. Dumped from
    ours, criu would take the backend's whole mount namespace into the image
    and fail to restore it; from PID 1's it sees the host's, as it should.
    Empty when we already are in PID 1's (no sandbox, or not under systemd)."""
    try:
        ours, theirs = os.stat("/proc/self/ns/mnt"), os.stat("/proc/1/ns/mnt")
    except OSError:
        return []
    if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino):
        return []
    path = nsenter or shutil.which("nsenter")
    if path is None:
        log.warning("nsenter (util-linux) not found: criu runs in llmuxd's own mount namespace, "
                    "where checkpointed models cannot be restored; install util-linux")
        return []
    return [path, "--mount=/proc/1/ns/mnt", "--"]


class SystemDaemon:
    """One system-mode daemon: start(), serve until stop(), reload() in between."""

    def __init__(self, config_path: str = DEFAULT_CONFIG, *, notifier: Notifier | None = None,
                 bus_address: str | None = None):
        self.config_path = config_path
        self.notifier = notifier if notifier is not None else Notifier()
        self.bus_address = bus_address
        self.config: Any = None
        self.store: StateStore | None = None
        self.runtime: Any = None
        self.orchestrator: Any = None
        self.core: Any = None
        self.bus: Any = None
        self.service: Any = None
        self.checkpoints: Any = None
        self._quarantine: dict[str, dict[str, Any]] = {}
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._ready = False
        self._stopping = False
        self._state_applied = False
        #: set when the daemon must exit with an error (lost its bus); run_system stops it
        self.failed = False
        self.on_fatal: Callable[[], None] | None = None

    # -- start ------------------------------------------------------------------

    async def start(self) -> None:
        """Everything up to READY=1. Raises ConfigError or RuntimeError-like
        errors whose message says what to fix."""
        from llmuxd.daemon.embedded import DaemonCore, attach_checkpoints
        from llmuxd.http.listen import activation_sockets
        from llmuxd.orchestrator import Orchestrator
        from llmuxd.runtime.systemd import SystemdRuntime

        # pings from the loop from the start: harmless before READY=1, and
        # nothing can forget to start them after
        self._tasks.append(asyncio.get_running_loop().create_task(self.notifier.run_watchdog(),
                                                                  name=WATCHDOG_TASK))
        self.notifier.status("reading configuration")
        self.config = load_config(self.config_path)
        for note in self.config.notes:
            log.info("config: %s", note)

        self.store = StateStore(self.config.state_dir)
        self.store.ensure_directory(owner=self.config.user)  # also the backends' working directory
        saved = self.store.load()
        self._quarantine = dict(saved.quarantine)

        self.notifier.status("connecting to systemd")
        self.runtime = SystemdRuntime(bus_address=self.bus_address)
        await self.runtime.connect()
        self.orchestrator = Orchestrator(self.config, self.runtime)
        self.checkpoints = attach_checkpoints(self.config, self.orchestrator, quarantine=self._quarantine,
                                              on_change=self._save_state, command_prefix=backend_mount_prefix())
        for problem in await self.checkpoints.preflight():
            log.warning("%s", problem)

        self.notifier.status("adopting running backends")
        adopted = await self.orchestrator.adopt()
        if adopted:
            log_event(log, journal.EVENT_UNITS_ADOPTED, "adopted %d running backend unit(s): %s",
                      len(adopted), ", ".join(f"{m} ({s.value})" for m, s in sorted(adopted.items())),
                      models=",".join(sorted(adopted)))

        self.checkpoints.mark_lazy(self.orchestrator)  # images on disk: first request restores
        if self.checkpoints.store is not None:
            self.notifier.status("looking up checkpoint images in the object store")
            await self.checkpoints.mark_lazy_from_store(self.orchestrator)  # first request downloads

        sockets = self._activation_sockets(activation_sockets())
        self._say_which_address_serves(sockets)
        from llmuxd.daemon.logsources import JournalFollower

        self.core = DaemonCore(self.config, self.orchestrator, sockets=sockets or None,
                               checkpoints=self.checkpoints, log_source=JournalFollower())
        self.core.http.shutdown_timeout = SHUTDOWN_DRAIN
        switcher = self.core.switcher
        self._unsubscribe = switcher.subscribe(self._on_event)
        await switcher.start()  # reconcile adopted states (e.g. two awake after a crash)
        await self._apply_saved_state(saved)
        self._state_applied = True  # from here on, saving keeps what was saved

        self.notifier.status("registering on the bus")
        await self._export_bus()

        if self.config.warmup:  # each model starts once: allow for it beyond TimeoutStartSec=
            self.notifier.extend_timeout(sum(mc.startup_timeout + 60 for mc in self.config.models.values()))
        await self.core.start()  # warm-up if configured, then HTTP
        self._save_state()
        self._ready = True
        status = self._status()
        self.notifier.ready(status)
        log_event(log, journal.EVENT_DAEMON_READY, "ready: %s; serving on %s", status,
                  ", ".join(self.core.addresses), addresses=" ".join(self.core.addresses))
        self._tasks.append(asyncio.get_running_loop().create_task(self._housekeeping(),
                                                                  name="llmuxd-housekeeping"))

    @staticmethod
    def _activation_sockets(found: list[Any]) -> list[Any]:
        from llmuxd.http.listen import socket_address

        named = [a.sock for a in found if a.name == HTTP_FD_NAME]
        if found and not named:
            log.warning("socket activation passed no socket named %r; serving on all %d passed",
                        HTTP_FD_NAME, len(found))
        chosen = named or [a.sock for a in found]
        if chosen:
            log.info("socket activation: serving on %s (the socket stays systemd's across restarts)",
                     ", ".join(socket_address(s) for s in chosen))
        return chosen

    def _say_which_address_serves(self, sockets: list[Any]) -> None:
        """`listen` (or 0.7's `port`) that llmux.socket overrides: say so in the journal, and how to move it."""
        from llmuxd.daemon.socket_unit import listen_not_served, served_elsewhere
        from llmuxd.http.listen import socket_address

        served = [socket_address(s) for s in sockets]
        if served_elsewhere(self.config.listen, served):
            log_event(log, journal.EVENT_LISTEN_MOVED, "config: listen: %s",
                      listen_not_served(self.config.listen, served), level=logging.WARNING,
                      listen=self.config.listen, served=" ".join(served))

    async def _export_bus(self) -> None:
        from dbus_fast import BusType
        from dbus_fast.aio import MessageBus

        from llmuxd.bus.auth import PolkitAuthorizer
        from llmuxd.bus.service import LLMuxService

        address = self.bus_address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        self.bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        self.service = LLMuxService(self.bus, self.core.switcher, reload=self.reload,
                                    version=self.core.version, authorizer=PolkitAuthorizer(self.bus),
                                    key_usage=self.core.keys.usage)
        await self.service.start()
        await self.service.request_name()
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_bus(), name="llmuxd-bus-watch"))

    async def _watch_bus(self) -> None:
        """Without its bus connection llmuxd can no longer be reloaded or
        controlled, and its name is gone: stop (exit status 1) so that
        Restart=on-failure brings it back; the backends are adopted again."""
        try:
            await self.bus.wait_for_disconnect()
        except Exception as exc:  # noqa: BLE001 - the reason is what we log
            reason = str(exc) or type(exc).__name__
        else:
            reason = "closed by the bus"
        if self._stopping:
            return
        log.error("lost the system bus connection (%s); exiting so that systemd restarts llmuxd", reason)
        self.failed = True
        if self.on_fatal is not None:
            self.on_fatal()

    async def _apply_saved_state(self, saved: DaemonState) -> None:
        """Put back what an operator changed at run time; entries for models no
        longer configured are dropped (and logged)."""
        switcher = self.core.switcher
        models = self.config.models
        if saved.switch_costs:
            switcher.load_costs(saved.switch_costs)
        for model, eviction in saved.evictions.items():
            if model not in models:
                log.info("state.json: dropping the eviction override of '%s', no longer configured", model)
                continue
            try:
                switcher.set_eviction(model, eviction)
            except Exception as exc:  # noqa: BLE001 - a stale override must not stop the daemon
                log.warning("state.json: eviction override %s of '%s' no longer applies: %s",
                            eviction, model, exc)
        if saved.pinned is not None and saved.pinned not in models:
            log.warning("state.json: pinned model '%s' is no longer configured; back to auto mode",
                        saved.pinned)
        elif saved.pinned is not None:
            try:
                await switcher.pin(saved.pinned)
            except Exception as exc:  # noqa: BLE001
                log.warning("state.json: could not pin '%s' again: %s; back to auto mode", saved.pinned, exc)
        elif saved.mode == "manual":
            await switcher.set_mode("manual")

    # -- events, status, state ------------------------------------------------

    def _on_event(self, event: Any) -> None:
        from llmuxd.events import ModelIdle, ModelStateChanged, PreloadProgress, SwitchStarted

        if isinstance(event, SwitchStarted):
            log_event(log, journal.EVENT_SWITCH_STARTED, "switch %s -> %s started",
                      event.from_model or "(nothing)", event.to_model or "(sleep)",
                      model=event.to_model or event.from_model, from_model=event.from_model,
                      to_model=event.to_model, group=event.group)
        elif isinstance(event, ModelIdle):
            log_event(log, journal.EVENT_MODEL_IDLE, "model %s idle for %.0fs (idle_timeout %gs): putting it to "
                      "sleep with %s", event.model, event.idle_for, event.timeout, event.eviction,
                      model=event.model, idle_timeout=f"{event.timeout:g}", eviction=event.eviction)
        elif isinstance(event, PreloadProgress):
            log_event(log, journal.EVENT_PRELOAD, "preload: model %s %s", event.model, event.progress,
                      level=logging.WARNING if event.progress.startswith("failed") else logging.INFO,
                      model=event.model, preload=event.progress)
        elif isinstance(event, ModelStateChanged):
            log_event(log, journal.EVENT_MODEL_STATE_CHANGED, "model %s is %s", event.model, event.state,
                      level=logging.DEBUG, model=event.model, state=event.state)
        if self._ready:
            self.notifier.status(self._status())

    def _status(self) -> str:
        if self.core is None:
            return "starting"
        return status_line(self.core.switcher.status(), self.orchestrator.state)

    def snapshot(self) -> DaemonState:
        switcher = self.core.switcher
        overrides = {}
        for name, model in self.config.models.items():
            effective = switcher.eviction_for(name)
            if effective != model.eviction:
                overrides[name] = str(effective)
        return DaemonState(mode=switcher.mode, pinned=switcher.pinned, evictions=overrides,
                           switch_costs=dict(switcher.switch_costs), quarantine=dict(self._quarantine))

    def _save_state(self) -> None:
        if self.store is not None and self.core is not None and self._state_applied:
            self.store.save(self.snapshot())  # logs and carries on when the disk is full

    async def _housekeeping(self) -> None:
        """STATUS= and state.json follow changes that raise no switch event
        (SetEviction, SetMode); both skip work when nothing changed."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                self.notifier.status(self._status())
                self._save_state()
            except Exception:  # noqa: BLE001 - never let bookkeeping kill the loop
                log.exception("housekeeping failed")

    # -- reload -----------------------------------------------------------------

    async def reload(self) -> None:
        """Apply the config file again. A config that does not validate raises
        ConfigError (the bus caller and `systemctl reload` see it) and changes
        nothing."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                try:
                    new = load_config(self.config_path)
                    keys = load_keys(new)
                except ConfigError as exc:
                    log_event(log, journal.EVENT_RELOAD_FAILED,
                              "reload refused, the running configuration and API keys stay:\n%s", exc,
                              level=logging.ERROR, path=self.config_path)
                    raise
                await self._apply_config(new, keys)
            finally:
                self.notifier.ready(self._status())

    async def _apply_config(self, new: Any, keys: list) -> None:
        old = self.config
        if old.state_dir != new.state_dir:
            log.warning("state_dir changed from %s to %s: this takes a restart of llmuxd",
                        old.state_dir, new.state_dir)
        added = [m for m in new.models if m not in old.models]
        removed = [m for m in old.models if m not in new.models]
        changed = {m: launch_settings_changed(old.models[m], new.models[m])
                   for m in new.models if m in old.models}
        changed = {m: keys for m, keys in changed.items() if keys}
        # the same reload as embedded mode: changed backends restart on demand,
        # removed ones are drained and stopped, the front end takes new limits
        await self.core.reload(new, keys)
        self.config = new
        self._save_state()
        log_event(log, journal.EVENT_RELOAD_FINISHED, "reloaded %s: %d models (added: %s; removed: %s; "
                  "restart on next request: %s)", self.config_path, len(new.models),
                  ", ".join(added) or "none", ", ".join(removed) or "none", ", ".join(changed) or "none",
                  added=",".join(added) or None, removed=",".join(removed) or None)

    # -- stop -------------------------------------------------------------------

    async def stop(self, *, after_failed_start: bool = False) -> None:
        """Stop accepting, drain in-flight requests (bounded), save state;
        backend units keep running unless stop_backends_on_exit. After a
        failed start it only releases what was acquired, and leaves the
        STATUS= that says why."""
        self._stopping = True
        stop_backends = bool(self.config and self.config.stop_backends_on_exit)
        if not after_failed_start:
            self.notifier.stopping()
            log_event(log, journal.EVENT_DAEMON_STOPPING, "stopping: draining requests for up to %.0fs; "
                      "backends %s", SHUTDOWN_DRAIN, "are stopped" if stop_backends else "keep running")
        # the watchdog keeps pinging while HTTP drains (a drain may outlast WatchdogSec)
        watchdog = [t for t in self._tasks if t.get_name() == WATCHDOG_TASK]
        await self._cancel([t for t in self._tasks if t not in watchdog])
        if self.core is not None:
            self._save_state()
            await self.core.stop()
        await self._cancel(watchdog)
        self._tasks.clear()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.service is not None:
            await self.service.close()
        if self.bus is not None:
            self.bus.disconnect()
        if self.checkpoints is not None:
            await self.checkpoints.close()  # background uploads stop; published images stay
        if self.orchestrator is not None:
            await self.orchestrator.close(stop_backends=stop_backends)
        if self.runtime is not None:
            await self.runtime.close()
        self.notifier.close()


    @staticmethod
    async def _cancel(tasks: list[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _config_path(args: Any) -> str:
    return getattr(args, "config", None) or DEFAULT_CONFIG


async def run_system(args: Any) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. The process exit status."""
    notifier = Notifier()
    daemon = SystemDaemon(_config_path(args), notifier=notifier)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        if not daemon._ready:
            return
        task = loop.create_task(_reload_logged(daemon))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    daemon.on_fatal = stop.set
    try:
        try:
            await daemon.start()
        except ConfigError as exc:
            log_event(log, journal.EVENT_CONFIG_INVALID, "cannot start, the configuration is invalid:\n%s",
                      exc, level=logging.ERROR, path=daemon.config_path)
            notifier.send(f"STATUS=invalid configuration: {_first_line(exc)}", "ERRNO=22")
            await daemon.stop(after_failed_start=True)
            return EXIT_CONFIG
        except Exception as exc:  # noqa: BLE001 - startup errors are for people
            log.error("llmuxd could not start: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            notifier.send(f"STATUS=could not start: {_first_line(exc)}")
            await daemon.stop(after_failed_start=True)
            return EXIT_UNAVAILABLE
        eventloop.freeze_startup_heap()
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    for task in list(reloads):
        task.cancel()
    await daemon.stop()
    log.info("stopped")
    return 1 if daemon.failed else 0


async def _reload_logged(daemon: SystemDaemon) -> None:
    try:
        await daemon.reload()
    except ConfigError:
        pass  # logged as reload_failed
    except Exception:  # noqa: BLE001
        log.exception("reload on SIGHUP failed")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(args: Any = None) -> int:
    """Entry for `llmuxd` without a subcommand (main.py calls it lazily)."""
    if args is None or isinstance(args, list):
        parser = argparse.ArgumentParser(prog="llmuxd", description="llmux daemon, system mode")
        parser.add_argument("--config", default=DEFAULT_CONFIG, help="main config file (default %(default)s)")
        parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        eventloop.add_option(parser)
        args = parser.parse_args(args)
    level = getattr(logging, str(getattr(args, "log_level", "info") or "info").upper(), logging.INFO)
    journal.setup_logging(level)
    return eventloop.run(run_system(args), getattr(args, "event_loop", None) or eventloop.default_choice())


if __name__ == "__main__":
    raise SystemExit(main())
