"""System mode: each backend is a transient systemd unit in llmux.slice.

Spoken over D-Bus (dbus-fast, low-level messages, so dbus-fast 1.84 and 2.x+
behave the same). The unit, not llmuxd, owns the process tree: a daemon
restart leaves the models running and `adopt()` picks them up again.

Rules followed here (reference: system-conventions §3.3-3.5):
- `Subscribe` once and keep one JobRemoved handler; results of jobs nobody
  awaits yet are kept, because the signal can arrive before the method reply
  is processed.
- A unit's state is followed through PropertiesChanged on its object path,
  matched *before* the unit is created so nothing is missed, not by polling.
- Units llmux creates carry a marker (Environment LLMUX_MODEL=<model> and a
  Description prefix); a unit with our name but without the marker belongs to
  someone else and is never stopped, frozen or adopted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
from collections import OrderedDict
from typing import Any, Iterable, Sequence

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from llmuxd.errors import BackendError, NotSupported
from llmuxd.names import (
    JOURNAL_MODEL_FIELD,
    SLICE,
    SYSLOG_PREFIX,
    UNIT_PATTERN,
    bus_path_escape,
    model_from_unit,
    unit_name,
)
from llmuxd.runtime.base import (
    ExitCallback,
    ExitStatus,
    ForeignUnit,
    DEFAULT_STOP_TIMEOUT,
    Handle,
    LaunchSpec,
    RunState,
    RuntimeUnavailable,
)
from llmuxd.runtime.unit_setup import explain_setup_failure, user_can_enter

log = logging.getLogger("llmuxd.runtime.systemd")

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"

#: the Description every unit llmux creates starts with (a marker people see)
DESCRIPTION_PREFIX = "llmux backend: "
#: the Environment entry that marks a unit as llmux's (checked on adopt)
MARKER_VAR = JOURNAL_MODEL_FIELD
#: NVIDIA's fixed character major: /dev/nvidiaN is 195:<the GPU's minor>, /dev/nvidiactl
#: 195:255, /dev/nvidia-modeset 195:254. Allowed as /dev/char/MAJ:MIN, which systemd
#: parses without the node: NVIDIA nodes are often created lazily (nvidia-modprobe),
#: and a DeviceAllow= path that does not exist when the unit starts is silently dropped.
NVIDIA_MAJOR = 195
NVIDIA_CONTROL_MINORS = (255, 254)  # nvidiactl, nvidia-modeset
#: drivers with a dynamic major, allowed by their /proc/devices name: nvidia-uvm
#: (/dev/nvidia-uvm, /dev/nvidia-uvm-tools) and nvidia-caps (/dev/nvidia-caps/*, MIG)
NVIDIA_DYNAMIC_MAJORS = ("char-nvidia-uvm", "char-nvidia-caps")
#: the driver's table of GPUs: one directory per PCI address, "Device Minor: N" inside
NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"
#: ExecMainCode values (waitid si_code)
CLD_EXITED = 1
#: how many finished-but-unclaimed job results are kept
JOB_RESULTS_KEPT = 256
#: a job (start/stop) that does not finish in this much more than its own timeout is lost
JOB_SLACK = 30.0
_GONE_ERRORS = ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject")


class SystemdError(Exception):
    """A D-Bus error reply from systemd (name + message), mapped by callers."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def unit_object_path(unit: str) -> str:
    """systemd's object path of a unit (bus label escaping; our names start with a letter)."""
    return f"{SYSTEMD_PATH}/unit/{bus_path_escape(unit)}"


def escape_exec_arg(arg: str) -> str:
    """systemd expands $VAR in ExecStart argv at exec time; '$$' is a literal '$'."""
    return arg.replace("$", "$$")


def marker_env(model: str) -> str:
    return f"{MARKER_VAR}={model}"


def transient_unit_properties(spec: LaunchSpec, exec_path: str) -> list[list[Any]]:
    """The StartTransientUnit properties (a(sv)) of one backend unit.

    Only properties systemd 252 knows: an unknown name fails the whole call.
    """
    env = [marker_env(spec.model)] + [f"{key}={value}" for key, value in spec.env.items()]
    props: list[list[Any]] = [
        ["Description", Variant("s", DESCRIPTION_PREFIX + (spec.description or spec.model))],
        ["Slice", Variant("s", SLICE)],
        ["Type", Variant("s", spec.service_type)],
        [
            "ExecStart",
            Variant("a(sasb)", [[exec_path, [escape_exec_arg(a) for a in spec.argv], False]]),
        ],
        ["Environment", Variant("as", env)],
        ["KillMode", Variant("s", "mixed")],
        ["TimeoutStopUSec", Variant("t", int(spec.stop_timeout * 1_000_000))],
        ["SyslogIdentifier", Variant("s", SYSLOG_PREFIX + spec.model)],
        ["LogExtraFields", Variant("aay", [marker_env(spec.model).encode()])],
        ["CollectMode", Variant("s", "inactive-or-failed")],
    ]
    if spec.pid_file:
        props.append(["PIDFile", Variant("s", spec.pid_file)])
    if spec.user:
        props.append(["User", Variant("s", spec.user)])
    if spec.group:
        props.append(["Group", Variant("s", spec.group)])
    if spec.working_directory:
        props.append(["WorkingDirectory", Variant("s", spec.working_directory)])
    if spec.gpus:
        # a model that names its GPUs may open those and the driver's shared nodes,
        # nothing else; one that names none may use every GPU (no device policy)
        props.append(["DevicePolicy", Variant("s", "closed")])
        props.append(["DeviceAllow", Variant("a(ss)", nvidia_device_allow(gpu_minors(spec.gpus)))])
    return props


def nvidia_device_allow(minors: Sequence[int]) -> list[list[str]]:
    """DeviceAllow= entries for a CUDA process on the GPUs with these minor numbers."""
    nodes = [f"/dev/char/{NVIDIA_MAJOR}:{minor}" for minor in (*NVIDIA_CONTROL_MINORS, *minors)]
    return [[node, "rw"] for node in (*nodes, *NVIDIA_DYNAMIC_MAJORS)]


def gpu_minors(indices: Sequence[int], proc_gpus: str = NVIDIA_PROC_GPUS) -> list[int]:
    """The /dev/nvidiaN minor of each GPU index. Indices count in PCI bus order (llmux
    sets CUDA_DEVICE_ORDER=PCI_BUS_ID, the order nvidia-smi and NVML show), which is
    the order of the driver's table; without the table (no driver loaded yet) the
    minor is taken to be the index, as on most machines."""
    try:
        addresses = sorted(os.listdir(proc_gpus))
    except OSError:
        return list(indices)
    minors = []
    for index in indices:
        minor = _device_minor(os.path.join(proc_gpus, addresses[index])) if index < len(addresses) else None
        minors.append(index if minor is None else minor)
    return minors


def _device_minor(gpu_dir: str) -> int | None:
    try:
        with open(os.path.join(gpu_dir, "information")) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "Device Minor":
                    return int(value.strip())
    except (OSError, ValueError):
        pass
    return None


class _UnitHandle(Handle):
    """A Handle plus the unit's last known D-Bus properties."""

    unit: str
    path: str
    spec: LaunchSpec | None
    props: dict[str, Any]
    seen_active: bool


def _new_handle(model: str, unit: str, spec: LaunchSpec | None, adopted: bool = False) -> _UnitHandle:
    handle = _UnitHandle(model=model, name=unit, adopted=adopted)
    handle.unit = unit
    handle.path = unit_object_path(unit)
    handle.spec = spec
    handle.props = {}
    handle.seen_active = False
    return handle


def _exit_status(props: dict[str, Any]) -> ExitStatus:
    result = props.get("Result", "exited")
    code = props.get("ExecMainCode")
    status = props.get("ExecMainStatus")
    if code == CLD_EXITED:
        return ExitStatus(code=status, result=result)
    if code and status:  # killed or dumped
        return ExitStatus(signal=status, result=result)
    return ExitStatus(result=result)


class SystemdRuntime:
    """Runtime for system mode: transient units driven over the system bus."""

    def __init__(self, *, bus_address: str | None = None, job_timeout: float = 90.0):
        self._bus_address = bus_address
        self._job_timeout = job_timeout
        self._bus: MessageBus | None = None
        self._callbacks: list[ExitCallback] = []
        self._by_path: dict[str, _UnitHandle] = {}
        self._job_waiters: dict[str, asyncio.Future] = {}
        self._job_results: OrderedDict[str, str] = OrderedDict()
        #: units found with our naming pattern but without our marker
        self.foreign_units: set[str] = set()
        self.systemd_version = ""
        #: systemd's unique bus name: signals from anyone else are ignored
        #: (any local user may broadcast a forged PropertiesChanged)
        self._systemd_owner: str | None = None
        #: fire-and-forget bus calls (RemoveMatch, re-Subscribe), cancelled on close
        self._background: set[asyncio.Task] = set()
        #: (user, directory) pairs already warned about (see _reachable_directory)
        self._unreachable_warned: set[tuple[str | None, str]] = set()

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        address = self._bus_address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or (
            "unix:path=/run/dbus/system_bus_socket"
        )
        fix = (
            "llmuxd in system mode needs systemd on the system bus; start it on a systemd host, "
            "set DBUS_SYSTEM_BUS_ADDRESS, or use embedded mode (llmuxd run)"
        )
        try:
            bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
            await bus.connect()
        except Exception as exc:  # noqa: BLE001 - every connect failure reads the same to a person
            raise RuntimeUnavailable(f"cannot connect to the system bus at {address}: {exc}; {fix}") from None
        self._bus = bus
        bus.add_message_handler(self._on_message)
        try:
            await self._add_match(
                f"type='signal',sender='{SYSTEMD_BUS_NAME}',path='{SYSTEMD_PATH}',"
                f"interface='{MANAGER_IFACE}'"
            )
            await self._add_match(
                f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_NAME}',"
                f"member='NameOwnerChanged',arg0='{SYSTEMD_BUS_NAME}'"
            )
            (self._systemd_owner,) = await self._call(
                "GetNameOwner", "s", [SYSTEMD_BUS_NAME], path=DBUS_PATH, interface=DBUS_NAME, destination=DBUS_NAME
            )
            await self._call("Subscribe")
            (version,) = await self._call(
                "Get", "ss", [MANAGER_IFACE, "Version"], interface=PROPERTIES_IFACE
            )
            self.systemd_version = version.value
        except SystemdError as exc:
            bus.disconnect()
            self._bus = None
            raise RuntimeUnavailable(f"systemd does not answer on the bus at {address} ({exc.message}); {fix}") from None
        log.info("connected to systemd %s at %s", self.systemd_version, address)

    async def close(self) -> None:
        """Disconnect; the units keep running (a daemon restart must not kill models)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
        for future in self._job_waiters.values():
            if not future.done():
                future.cancel()

    def on_exit(self, callback: ExitCallback) -> None:
        self._callbacks.append(callback)

    async def _call(
        self,
        member: str,
        signature: str = "",
        body: Iterable[Any] = (),
        *,
        path: str = SYSTEMD_PATH,
        interface: str = MANAGER_IFACE,
        destination: str = SYSTEMD_BUS_NAME,
    ) -> list[Any]:
        if self._bus is None:
            raise RuntimeUnavailable("not connected to systemd; call connect() first")
        reply = await self._bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                flags=MessageFlag.NO_AUTOSTART,
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise SystemdError(reply.error_name or "", str(reply.body[0]) if reply.body else "")
        return list(reply.body)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resubscribe(self) -> None:
        try:
            await self._call("Subscribe")
        except (SystemdError, RuntimeUnavailable):
            pass  # already subscribed (systemd keeps subscribers across re-exec) or gone

    async def _add_match(self, rule: str) -> None:
        await self._call("AddMatch", "s", [rule], path=DBUS_PATH, interface=DBUS_NAME, destination=DBUS_NAME)

    async def _remove_match(self, rule: str) -> None:
        try:
            await self._call("RemoveMatch", "s", [rule], path=DBUS_PATH, interface=DBUS_NAME, destination=DBUS_NAME)
        except (SystemdError, RuntimeUnavailable):
            pass

    @staticmethod
    def _unit_match(path: str) -> str:
        return (
            f"type='signal',sender='{SYSTEMD_BUS_NAME}',path='{path}',"
            f"interface='{PROPERTIES_IFACE}',member='PropertiesChanged'"
        )

    # -- signals ------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        if message.message_type != MessageType.SIGNAL:
            return None
        if message.interface == DBUS_NAME and message.member == "NameOwnerChanged":
            name, _old, new = message.body
            if name == SYSTEMD_BUS_NAME and new:
                # systemd re-executed (daemon-reexec): follow its new connection
                self._systemd_owner = new
                self._spawn(self._resubscribe())
            return None
        if message.sender != self._systemd_owner:
            return None
        if message.interface == MANAGER_IFACE and message.member == "JobRemoved":
            _job_id, job_path, _unit, result = message.body
            self._job_finished(job_path, result)
        elif message.interface == MANAGER_IFACE and message.member == "UnitRemoved":
            handle = self._by_path.get(message.body[1])
            # a handle not yet seen active: the removal is of the unit's previous run (the
            # same name, stopped just before this start), and a re-read now would mix the
            # two runs' properties; this run's start job says how it goes
            if handle is not None and handle.seen_active:
                # not proof that it is gone: `systemctl daemon-reload` sends
                # UnitRemoved for every unit, running ones too (then UnitNew)
                self._spawn(self._recheck(handle))
        elif message.interface == PROPERTIES_IFACE and message.member == "PropertiesChanged":
            handle = self._by_path.get(message.path)
            if handle is not None:
                _iface, changed, _invalidated = message.body
                self._update(handle, {key: variant.value for key, variant in changed.items()})
        return None

    def _job_finished(self, job_path: str, result: str) -> None:
        future = self._job_waiters.pop(job_path, None)
        if future is not None and not future.done():
            future.set_result(result)
            return
        self._job_results[job_path] = result
        while len(self._job_results) > JOB_RESULTS_KEPT:
            self._job_results.popitem(last=False)

    async def _wait_job(self, job_path: str, timeout: float) -> str:
        if job_path in self._job_results:
            return self._job_results.pop(job_path)
        future = asyncio.get_running_loop().create_future()
        self._job_waiters[job_path] = future
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._job_waiters.pop(job_path, None)

    def _update(self, handle: _UnitHandle, changed: dict[str, Any]) -> None:
        handle.props.update(changed)
        if "MainPID" in changed:
            handle.main_pid = changed["MainPID"] or None
        if handle.exited.is_set():
            return
        active = handle.props.get("ActiveState")
        if active in ("activating", "active", "reloading", "deactivating"):
            handle.seen_active = True
            frozen = handle.props.get("FreezerState") in ("frozen", "freezing")
            if active != "activating":
                handle.state = RunState.FROZEN if frozen else RunState.RUNNING
        elif active in ("inactive", "failed") and handle.seen_active:
            self._finish(handle, _exit_status(handle.props))

    async def _recheck(self, handle: _UnitHandle) -> None:
        """After UnitRemoved: ask systemd. During a reload the call is answered
        once the reload is done, by the reloaded unit; a unit really gone (it
        exited and was collected) reads as not found."""
        try:
            present = await self._refresh(handle)
        except (SystemdError, RuntimeUnavailable) as exc:
            log.warning("model %s: cannot re-read unit %s after UnitRemoved: %s", handle.model, handle.unit, exc)
            return
        if not present:
            self._unit_gone(handle)

    def _unit_gone(self, handle: _UnitHandle) -> None:
        if not handle.exited.is_set():
            self._finish(handle, _exit_status(handle.props))
        self._forget(handle)

    def _finish(self, handle: _UnitHandle, status: ExitStatus) -> None:
        if not handle.mark_exited(status):
            return
        if handle.stopping:
            return
        log.warning("model %s: unit %s %s", handle.model, handle.unit, status)
        for callback in self._callbacks:
            callback(handle, status)

    def _forget(self, handle: _UnitHandle) -> None:
        if self._by_path.get(handle.path) is handle:
            del self._by_path[handle.path]
            if self._bus is not None:
                self._spawn(self._remove_match(self._unit_match(handle.path)))

    async def _track(self, handle: _UnitHandle) -> None:
        self._by_path[handle.path] = handle
        await self._add_match(self._unit_match(handle.path))

    async def _refresh(self, handle: _UnitHandle) -> bool:
        """Read the unit's properties now; False when the unit is gone."""
        props: dict[str, Any] = {}
        for iface in (UNIT_IFACE, SERVICE_IFACE):
            try:
                (values,) = await self._call("GetAll", "s", [iface], path=handle.path, interface=PROPERTIES_IFACE)
            except SystemdError as exc:
                if exc.name in _GONE_ERRORS or "UnknownInterface" in exc.name:
                    return False
                raise
            props.update({key: variant.value for key, variant in values.items()})
        if props.get("LoadState") == "not-found":
            return False
        self._update(handle, props)
        return True

    # -- operations ---------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> Handle:
        unit = unit_name(spec.model)
        exec_path = shutil.which(spec.argv[0]) if spec.argv else None
        if exec_path is None:
            raise BackendError(
                spec.model, "start", f"cannot run {spec.argv[0]!r}: command not found; check the model's command"
            )
        if unit in self.foreign_units or await self._unit_is_foreign(unit):
            raise self._foreign_error(spec.model, unit)
        spec = self._reachable_directory(spec)
        handle = _new_handle(spec.model, unit, spec)
        await self._track(handle)
        try:
            (job,) = await self._call(
                "StartTransientUnit",
                "ssa(sv)a(sa(sv))",
                [unit, "fail", transient_unit_properties(spec, os.path.abspath(exec_path)), []],
            )
        except SystemdError as exc:
            self._forget(handle)
            if exc.name == "org.freedesktop.systemd1.UnitExists":
                if await self._unit_is_foreign(unit):
                    raise self._foreign_error(spec.model, unit) from None
                raise BackendError(
                    spec.model,
                    "start",
                    f"unit {unit} already exists (left by an earlier llmuxd?); restart llmuxd to "
                    f"adopt it or run 'systemctl stop {unit}'",
                ) from None
            raise BackendError(spec.model, "start", f"systemd refused to create {unit}: {exc.message}") from None
        result = await self._wait_job(job, self._job_timeout)
        await self._refresh(handle)
        if result != "done":
            self._forget(handle)
            handle.stopping = True  # reported here, not as an unexpected exit
            handle.mark_exited(_exit_status(handle.props))
            # Type=exec: exec failed (203/EXEC, 217/USER, ...), or the process
            # ended before systemd saw the exec succeed
            status = handle.exit_status
            meaning = explain_setup_failure(
                status.code if status is not None and status.result == "exit-code" else None,
                unit=unit, user=spec.user, group=spec.group, directory=spec.working_directory,
                command=os.path.abspath(exec_path))
            reason = (f"{unit} did not start: {meaning}" if meaning else
                      f"{unit} did not start: {status} (start job {result}); see 'journalctl -u {unit}'")
            log.error("model %s: %s", spec.model, reason)
            raise BackendError(spec.model, "start", reason)
        if handle.state is RunState.STARTING and not handle.exited.is_set():
            handle.state = RunState.RUNNING
        log.info("model %s: started unit %s (main pid %s)", spec.model, unit, handle.main_pid)
        return handle

    def _reachable_directory(self, spec: LaunchSpec) -> LaunchSpec:
        """The spec, without its working directory when the unit's user cannot
        enter it (systemd would fail the start with 200/CHDIR): the backend
        runs in / instead, and the operator is told once how to fix it."""
        directory = spec.working_directory
        if not directory or user_can_enter(directory, spec.user) is not False:
            return spec  # reachable, or a user that does not exist (217/USER says so)
        if (spec.user, directory) not in self._unreachable_warned:
            self._unreachable_warned.add((spec.user, directory))
            log.warning("user '%s' cannot enter %s, so backends running as it start in / instead; to give "
                        "them that directory: chown %s: %s (what the package's tmpfiles rule does)",
                        spec.user or "root", directory, spec.user or "root", directory)
        return dataclasses.replace(spec, working_directory=None)

    async def _unit_is_foreign(self, unit: str) -> bool:
        """True when a loaded unit has our name but not our marker."""
        try:
            (path,) = await self._call("GetUnit", "s", [unit])
            (env,) = await self._call("Get", "ss", [SERVICE_IFACE, "Environment"], path=path, interface=PROPERTIES_IFACE)
        except SystemdError:
            return False
        model = model_from_unit(unit) or ""
        return marker_env(model) not in env.value

    @staticmethod
    def _foreign_error(model: str, unit: str) -> ForeignUnit:
        return ForeignUnit(
            model,
            "start",
            f"unit {unit} exists and was not created by llmux; llmux will not touch it — "
            f"stop or rename that unit, or rename the model",
        )

    async def stop(self, handle: Handle, timeout: float | None = None) -> ExitStatus | None:
        assert isinstance(handle, _UnitHandle)
        if handle.exited.is_set():
            return handle.exit_status
        handle.stopping = True
        # the unit's TimeoutStopUSec does SIGTERM -> grace -> SIGKILL; a shorter
        # `timeout` (systemd 252 cannot change TimeoutStopUSec of a running
        # service) is enforced here with KillUnit(all, SIGKILL)
        unit_grace = handle.spec.stop_timeout if handle.spec else DEFAULT_STOP_TIMEOUT
        grace = unit_grace if timeout is None else min(timeout, unit_grace)
        try:
            if handle.state is RunState.FROZEN:
                # SIGTERM stays pending in a frozen cgroup until the SIGKILL timeout
                await self._call("ThawUnit", "s", [handle.unit])
            (job,) = await self._call("StopUnit", "ss", [handle.unit, "replace"])
        except SystemdError as exc:
            if exc.name in _GONE_ERRORS:
                self._unit_gone(handle)
                return handle.exit_status
            raise BackendError(handle.model, "stop", f"systemd refused to stop {handle.unit}: {exc.message}") from None
        try:
            await asyncio.wait_for(asyncio.shield(self._wait_job(job, unit_grace + JOB_SLACK)), grace + 1.0)
        except asyncio.TimeoutError:
            log.warning("model %s: unit %s still running %.0fs after SIGTERM, sending SIGKILL", handle.model, handle.unit, grace)
            try:
                await self._call("KillUnit", "ssi", [handle.unit, "all", signal.SIGKILL])
            except SystemdError:
                pass  # gone meanwhile
            await self._wait_job(job, JOB_SLACK)
        try:
            await asyncio.wait_for(handle.exited.wait(), 5.0)
        except asyncio.TimeoutError:
            if not await self._refresh(handle) or not handle.exited.is_set():
                self._finish(handle, _exit_status(handle.props))
        self._forget(handle)
        log.info("model %s: stopped unit %s (%s)", handle.model, handle.unit, handle.exit_status)
        return handle.exit_status

    async def freeze(self, handle: Handle) -> None:
        await self._freezer(handle, "FreezeUnit", RunState.FROZEN)

    async def thaw(self, handle: Handle) -> None:
        await self._freezer(handle, "ThawUnit", RunState.RUNNING)

    async def _freezer(self, handle: Handle, method: str, new_state: RunState) -> None:
        assert isinstance(handle, _UnitHandle)
        action = "freeze" if method == "FreezeUnit" else "thaw"
        if handle.exited.is_set():
            raise BackendError(handle.model, action, f"unit {handle.unit} is not running ({handle.exit_status})")
        try:
            await self._call(method, "s", [handle.unit])
        except SystemdError as exc:
            if exc.name == "org.freedesktop.DBus.Error.NotSupported" or "freez" in exc.message.lower():
                raise NotSupported(
                    f"model '{handle.model}': unit {handle.unit} cannot {action} ({exc.message}); "
                    "freeze needs the cgroup-v2 freezer (unified cgroup hierarchy) — choose an "
                    "eviction without 'freeze'"
                ) from None
            raise BackendError(handle.model, action, f"systemd {method} failed: {exc.message}") from None
        handle.state = new_state

    async def pids(self, handle: Handle) -> list[int]:
        assert isinstance(handle, _UnitHandle)
        if handle.exited.is_set():
            return []
        try:
            (processes,) = await self._call("GetUnitProcesses", "s", [handle.unit])
        except SystemdError:
            return []
        pids = [pid for _cgroup, pid, _cmdline in processes]
        if handle.main_pid in pids:
            pids.remove(handle.main_pid)
            pids.insert(0, handle.main_pid)
        return pids

    async def adopt(self) -> list[Handle]:
        (units,) = await self._call("ListUnitsByPatterns", "asas", [[], [UNIT_PATTERN]])
        adopted: list[Handle] = []
        for unit, _desc, _load, active, *_rest in units:
            model = model_from_unit(unit)
            if model is None or active not in ("active", "activating", "reloading"):
                continue
            if await self._unit_is_foreign(unit):
                log.warning("unit %s matches llmux's names but was not created by llmux; leaving it alone", unit)
                self.foreign_units.add(unit)
                continue
            handle = _new_handle(model, unit, None, adopted=True)
            await self._track(handle)
            if not await self._refresh(handle):
                self._forget(handle)
                continue
            adopted.append(handle)
            log.info("model %s: adopted unit %s (%s, main pid %s)", model, unit, handle.state, handle.main_pid)
        return adopted
