"""Embedded mode: each backend is a child process group of llmuxd.

No root and no systemd needed. The process group stands in for the unit's
cgroup: freeze is SIGSTOP of the group, stop is SIGTERM of the group, a grace,
then SIGKILL of the group (what KillMode=mixed + TimeoutStopSec do for a unit).
Backend output is forwarded line by line to the `llmuxd.backend` logger with
the model name, where systemd would have sent it to the journal.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
from pathlib import Path

from llmuxd.errors import BackendError
from llmuxd.runtime.base import (
    ExitCallback,
    ExitStatus,
    Handle,
    LaunchSpec,
    RunState,
)

log = logging.getLogger("llmuxd.runtime.subprocess")
backend_log = logging.getLogger("llmuxd.backend")

#: seconds freeze() waits for every process of the group to show as stopped
FREEZE_SETTLE_TIMEOUT = 10.0


#: prctl(2) option: the signal this process gets when its parent dies (Linux)
_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not import
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _die_with_parent(parent: int) -> None:
    """preexec_fn of every backend: SIGKILL it when llmuxd dies, even by
    SIGKILL, so that an embedded backend never outlives its daemon (embedded
    mode adopts nothing after a restart; an orphan would keep the GPU and the
    port). Runs in the child between fork and exec: libc calls only."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the daemon died before prctl took effect
        os._exit(1)


class _ProcessHandle(Handle):
    """A Handle plus the asyncio process and the tasks that follow it."""

    process: asyncio.subprocess.Process
    spec: LaunchSpec
    tasks: list[asyncio.Task]


def _status_from_returncode(returncode: int) -> ExitStatus:
    if returncode < 0:
        return ExitStatus(signal=-returncode, result="signal")
    return ExitStatus(code=returncode, result="success" if returncode == 0 else "exit-code")


def _proc_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ('T' stopped, 'Z' zombie), 'Z' when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is `pgid` (ours: the backend's session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # fields after the ")" of comm: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants, by parent PID (children that left its process group too;
    scripts/gpu-check measures a backend's memory over the same tree)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


class SubprocessRuntime:
    """Runtime for embedded mode: backends are process groups of this daemon."""

    def __init__(self, *, inherit_env: bool = True):
        self._inherit_env = inherit_env
        self._callbacks: list[ExitCallback] = []
        self._handles: set[_ProcessHandle] = set()

    async def connect(self) -> None:
        """Nothing to reach: processes are ours."""

    async def close(self) -> None:
        """Stop what is still running; embedded mode never leaves orphans."""
        for handle in list(self._handles):
            await self.stop(handle, timeout=5.0)

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    async def start(self, spec: LaunchSpec) -> Handle:
        env = dict(os.environ) if self._inherit_env else {}
        env.update(spec.env)
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=spec.working_directory,
                start_new_session=True,  # own process group = the whole tree
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        except OSError as exc:
            raise BackendError(
                spec.model,
                "start",
                f"cannot run {spec.argv[0]!r}: {exc.strerror or exc}; check the model's command",
            ) from None
        handle = _ProcessHandle(model=spec.model, name=f"pid {process.pid}", main_pid=process.pid)
        handle.process = process
        handle.spec = spec
        handle.state = RunState.RUNNING
        handle.tasks = [
            asyncio.ensure_future(self._forward_output(handle)),
            asyncio.ensure_future(self._watch(handle)),
        ]
        self._handles.add(handle)
        log.info("model %s: started %s (pid %d)", spec.model, spec.argv[0], process.pid)
        return handle

    async def _forward_output(self, handle: _ProcessHandle) -> None:
        stream = handle.process.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the stream limit
                line = await stream.read(65536)
            if not line:
                return
            backend_log.info(
                "[%s] %s",
                handle.model,
                line.decode("utf-8", "replace").rstrip(),
                extra={"llmux_model": handle.model},
            )

    async def _watch(self, handle: _ProcessHandle) -> None:
        returncode = await handle.process.wait()
        # KillMode=mixed: what the main process left behind in its group goes too
        self._signal_group(handle, signal.SIGKILL)
        status = _status_from_returncode(returncode)
        if not handle.mark_exited(status):
            return
        self._handles.discard(handle)
        if handle.stopping:
            return
        log.warning("model %s: backend %s", handle.model, status)
        for callback in self._callbacks:
            callback(handle, status)

    def _signal_group(self, handle: _ProcessHandle, sig: int) -> bool:
        try:
            os.killpg(handle.process.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    async def stop(self, handle: Handle, timeout: float | None = None) -> ExitStatus | None:
        assert isinstance(handle, _ProcessHandle)
        if handle.exited.is_set():
            return handle.exit_status
        grace = handle.spec.stop_timeout if timeout is None else timeout
        handle.stopping = True
        self._signal_group(handle, signal.SIGTERM)
        # a stopped (frozen) group would hold SIGTERM pending until thawed
        self._signal_group(handle, signal.SIGCONT)
        try:
            await asyncio.wait_for(handle.exited.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("model %s: no exit %.0fs after SIGTERM, sending SIGKILL", handle.model, grace)
            self._signal_group(handle, signal.SIGKILL)
            await handle.exited.wait()
        for task in handle.tasks:
            await asyncio.gather(task, return_exceptions=True)
        return handle.exit_status

    async def freeze(self, handle: Handle) -> None:
        assert isinstance(handle, _ProcessHandle)
        self._require_alive(handle, "freeze")
        self._signal_group(handle, signal.SIGSTOP)
        # SIGSTOP lands asynchronously; like the cgroup freezer, answer once it is effective
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FREEZE_SETTLE_TIMEOUT
        group = handle.process.pid  # SIGSTOP reaches its process group: wait for that
        while loop.time() < deadline and any(_proc_state(pid) not in "TtZ" for pid in _group_pids(group)):
            await asyncio.sleep(0.01)
        handle.state = RunState.FROZEN

    async def thaw(self, handle: Handle) -> None:
        assert isinstance(handle, _ProcessHandle)
        self._require_alive(handle, "thaw")
        self._signal_group(handle, signal.SIGCONT)
        handle.state = RunState.RUNNING

    async def pids(self, handle: Handle) -> list[int]:
        assert isinstance(handle, _ProcessHandle)
        if handle.exited.is_set():
            return []
        # its process group, and its process tree: a child in a group of its own still holds
        # the backend's memory (verified eviction measures all of them)
        pgid = handle.process.pid
        rest = sorted((set(_group_pids(pgid)) | set(process_tree(pgid))) - {pgid})
        return [pgid, *rest]

    async def adopt(self) -> list[Handle]:
        """Embedded mode stops its backends when it exits: nothing survives to adopt."""
        return []

    @staticmethod
    def _require_alive(handle: Handle, action: str) -> None:
        if handle.exited.is_set():
            raise BackendError(handle.model, action, f"the backend is not running ({handle.exit_status})")
