"""Where a backend process lives: the protocol every runtime implements.

The orchestrator decides *what* happens to a model (start, sleep, wake);
a runtime decides *how* a process is run: as a transient systemd unit
(`SystemdRuntime`, system mode) or as a child process group
(`SubprocessRuntime`, embedded mode). Both give the same guarantees:
stop is SIGTERM, a grace period, then SIGKILL of the whole tree; freeze stops
every process of the backend; an exit nobody asked for is reported once.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable, Protocol

from llmuxd.errors import BackendError, LLMuxError

#: seconds between SIGTERM and SIGKILL when a spec does not say
DEFAULT_STOP_TIMEOUT = 30.0


class RunState(str, enum.Enum):
    """What a runtime knows about a backend process (not about the model)."""

    STARTING = "starting"  # exec in progress
    RUNNING = "running"
    FROZEN = "frozen"  # cgroup freezer / SIGSTOP: no CPU, memory kept
    EXITED = "exited"  # gone; see Handle.exit_status

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ExitStatus:
    """How a backend ended: an exit code, a signal, or a runtime verdict."""

    code: int | None = None
    signal: int | None = None
    #: systemd's Result (success, exit-code, signal, timeout, ...) or "exited"
    result: str = "exited"

    @property
    def ok(self) -> bool:
        return self.code == 0 or self.result == "success"

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.code is not None:
            return f"exited with status {self.code}"
        return self.result


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a runtime needs to run one backend.

    The orchestrator builds it from a `ModelConfig`; runtimes never read the
    configuration themselves, so they are tested with plain commands.
    """

    model: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    working_directory: str | None = None
    user: str | None = None
    group: str | None = None
    gpus: tuple[int, ...] = ()
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    description: str = ""
    #: systemd Type= of the unit; "forking" + pid_file for a CRIU restore (criu restore -d)
    service_type: str = "exec"
    pid_file: str | None = None


ExitCallback = Callable[["Handle", ExitStatus], None]


@dataclass(eq=False)
class Handle:
    """One running (or finished) backend, as a runtime tracks it."""

    model: str
    #: unit name (systemd) or "pid N" (subprocess): what a person looks for
    name: str
    main_pid: int | None = None
    state: RunState = RunState.STARTING
    exit_status: ExitStatus | None = None
    #: True when found by `adopt()` rather than started by us
    adopted: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: set while *we* stop it, so the exit is not reported as unexpected
    stopping: bool = False

    def mark_exited(self, status: ExitStatus) -> bool:
        """Record the end once; returns False when it was already recorded."""
        if self.exited.is_set():
            return False
        self.state = RunState.EXITED
        self.exit_status = status
        self.main_pid = None
        self.exited.set()
        return True


class RuntimeUnavailable(LLMuxError):
    """The runtime itself cannot work (no systemd on the bus, ...)."""

    bus_name = "RuntimeUnavailable"
    http_status = 503


class ForeignUnit(BackendError):
    """A unit with our name exists and llmux did not create it: never touched."""


class Runtime(Protocol):
    """How backends are run. Every method is safe to call on an exited handle."""

    async def connect(self) -> None:
        """Reach whatever runs the processes; raise RuntimeUnavailable with the fix."""

    async def close(self) -> None: ...

    async def start(self, spec: LaunchSpec) -> Handle:
        """Exec the backend; raise BackendError(phase="start") when exec fails."""

    async def stop(self, handle: Handle, timeout: float | None = None) -> ExitStatus | None:
        """SIGTERM, `timeout` (default the spec's) grace, then SIGKILL of every process."""

    async def freeze(self, handle: Handle) -> None:
        """Stop scheduling every process of the backend; memory stays."""

    async def thaw(self, handle: Handle) -> None: ...

    async def pids(self, handle: Handle) -> list[int]:
        """Main PID first, then the rest of the tree (cgroup or process group)."""

    async def adopt(self) -> list[Handle]:
        """Backends that outlived a previous daemon (system mode only)."""

    def on_exit(self, callback: ExitCallback) -> None:
        """callback(handle, status) when a backend ends without `stop()`."""


def check_port_free(model: str, host: str, port: int) -> None:
    """Fail before spawning when another process already listens on host:port.

    A backend that cannot bind exits after its (long) model load; worse, health
    checks would pass against the other process. Binding with SO_REUSEADDR
    ignores TIME_WAIT leftovers and refuses only a live listener.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BackendError(
                    model,
                    "start",
                    f"port {port} on {host} is already in use by another process; "
                    f"stop that process or give the model another port",
                ) from None
            raise BackendError(model, "start", f"cannot use {host}:{port}: {exc.strerror}") from None
