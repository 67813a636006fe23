"""SystemdRuntime against a mocked systemd on a private system bus (no root needed).

The template (tests/dbusmock_templates/llmux_systemd.py) checks property names
and types like systemd 252 does and records every call, so these tests pin
exactly what llmuxd sends.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import dbus
import pytest
from dbusmock import MOCK_IFACE, DBusTestCase

from dbusmock_templates.llmux_systemd import signature_of
from llmuxd.errors import NotSupported
from llmuxd.runtime.base import ExitStatus, ForeignUnit, LaunchSpec, RunState, RuntimeUnavailable
from llmuxd.runtime.systemd import SystemdRuntime

TEMPLATE = str(Path(__file__).parent / "dbusmock_templates" / "llmux_systemd.py")


@pytest.fixture(scope="module")
def private_bus():
    """A private dbus-daemon standing in for the system bus; the host's bus is never touched.

    (Started here rather than with DBusTestCase.start_system_bus, whose teardown
    differs between python-dbusmock 0.28 and 0.38.)"""
    saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"], stdout=subprocess.PIPE, text=True
    )
    address = daemon.stdout.readline().strip()
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address  # where dbusmock's system_bus=True connects
    yield address
    daemon.terminate()
    daemon.wait()
    if saved is None:
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    else:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = saved


@pytest.fixture
def mock_systemd(private_bus):
    server, _obj = DBusTestCase.spawn_server_template(TEMPLATE, {}, stdout=subprocess.DEVNULL, system_bus=True)
    bus = dbus.bus.BusConnection(private_bus)
    mock = dbus.Interface(bus.get_object("org.freedesktop.systemd1", "/org/freedesktop/systemd1"), MOCK_IFACE)
    yield mock
    server.terminate()
    server.wait()
    bus.close()


@pytest.fixture
async def runtime(private_bus, mock_systemd):
    rt = SystemdRuntime(bus_address=private_bus)
    await rt.connect()
    rt.exits = []
    rt.on_exit(lambda handle, status: rt.exits.append((handle.model, status)))
    yield rt
    await rt.close()


def calls(mock, method: str) -> list:
    return [args for _ts, args in mock.GetMethodCalls(method)]


SPEC = LaunchSpec(
    model="llama-3.1:8b",
    argv=("/usr/bin/env", "echo", "cost=$5"),
    env={"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "0,1", "PRICE": "$HOME"},
    working_directory="/",  # one every user can enter (an unreachable one is dropped: test_service_backend_user)
    user="llmux",
    group="llmux",
    gpus=(0, 1),
    stop_timeout=30.0,
    description="llama-3.1:8b",
)


async def test_start_transient_unit_sends_exactly_these_properties(runtime, mock_systemd):
    handle = await asyncio.wait_for(runtime.start(SPEC), 30)
    unit = "llmux-model-llama\\x2d3.1:8b.service"  # systemd-escape: '-' in a name is \x2d
    assert handle.name == unit and handle.state is RunState.RUNNING

    (name, mode, props, aux), = calls(mock_systemd, "StartTransientUnit")
    assert (name, mode, list(aux)) == (unit, "fail", [])
    sent = {str(key): (signature_of(value), _plain(value)) for key, value in props}
    assert sent == {
        "Description": ("s", "llmux backend: llama-3.1:8b"),
        "Slice": ("s", "llmux.slice"),
        "Type": ("s", "exec"),
        "ExecStart": ("a(sasb)", [["/usr/bin/env", ["/usr/bin/env", "echo", "cost=$$5"], False]]),
        "Environment": ("as", [
            "LLMUX_MODEL=llama-3.1:8b", "VLLM_SERVER_DEV_MODE=1", "CUDA_VISIBLE_DEVICES=0,1", "PRICE=$HOME",
        ]),
        "KillMode": ("s", "mixed"),
        "TimeoutStopUSec": ("t", 30_000_000),
        "SyslogIdentifier": ("s", "llmux-llama-3.1:8b"),
        "LogExtraFields": ("aay", [b"LLMUX_MODEL=llama-3.1:8b"]),
        "CollectMode": ("s", "inactive-or-failed"),
        "User": ("s", "llmux"),
        "Group": ("s", "llmux"),
        "WorkingDirectory": ("s", "/"),
        "DevicePolicy": ("s", "closed"),
        # nvidiactl, nvidia-modeset, the model's two GPUs (no driver table here: minor = index),
        # then the dynamic majors of nvidia-uvm(-tools) and the MIG capability nodes
        "DeviceAllow": ("a(ss)", [
            ["/dev/char/195:255", "rw"], ["/dev/char/195:254", "rw"],
            ["/dev/char/195:0", "rw"], ["/dev/char/195:1", "rw"],
            ["char-nvidia-uvm", "rw"], ["char-nvidia-caps", "rw"],
        ]),
    }


@pytest.mark.parametrize(
    "spec_change, absent",
    [
        ({"gpus": ()}, {"DevicePolicy", "DeviceAllow"}),
        ({"user": None, "group": None}, {"User", "Group"}),
        ({"working_directory": None}, {"WorkingDirectory"}),
    ],
)
async def test_optional_properties_are_left_out(runtime, mock_systemd, spec_change, absent):
    await runtime.start(LaunchSpec(**{**SPEC.__dict__, **spec_change}))
    (_, _, props, _), = calls(mock_systemd, "StartTransientUnit")
    assert absent.isdisjoint(str(key) for key, _ in props)


async def test_an_exit_nobody_asked_for_is_reported_with_its_status(runtime, mock_systemd):
    handle = await runtime.start(SPEC)
    mock_systemd.SetUnitExited(handle.name, "exit-code", 1, 3)
    await asyncio.wait_for(handle.exited.wait(), 30)
    assert runtime.exits == [("llama-3.1:8b", ExitStatus(code=3, result="exit-code"))]


async def test_stop_stops_the_unit_and_is_not_reported_as_a_crash(runtime, mock_systemd):
    handle = await runtime.start(SPEC)
    status = await asyncio.wait_for(runtime.stop(handle), 30)
    assert [list(c) for c in calls(mock_systemd, "StopUnit")] == [[handle.name, "replace"]]
    assert status is not None and handle.state is RunState.EXITED and runtime.exits == []


async def test_freeze_and_thaw_call_systemd(runtime, mock_systemd):
    handle = await runtime.start(SPEC)
    await runtime.freeze(handle)
    assert handle.state is RunState.FROZEN
    await runtime.thaw(handle)
    assert handle.state is RunState.RUNNING
    assert calls(mock_systemd, "FreezeUnit") == calls(mock_systemd, "ThawUnit") == [[handle.name]]


async def test_freeze_without_the_cgroup_v2_freezer_is_a_clear_error(runtime, mock_systemd):
    handle = await runtime.start(SPEC)
    mock_systemd.SetFreezerSupported(False)
    with pytest.raises(NotSupported) as err:
        await runtime.freeze(handle)
    assert "cgroup-v2 freezer" in str(err.value) and "llama-3.1:8b" in str(err.value)
    assert handle.state is RunState.RUNNING


async def test_adopt_skips_and_never_stops_a_foreign_unit(runtime, mock_systemd, private_bus):
    # a unit with our name pattern, created by someone else (no LLMUX_MODEL marker)
    bus = dbus.bus.BusConnection(private_bus)
    manager = dbus.Interface(bus.get_object("org.freedesktop.systemd1", "/org/freedesktop/systemd1"),
                             "org.freedesktop.systemd1.Manager")
    manager.StartTransientUnit("llmux-model-theirs.service", "fail",
                               dbus.Array([("Description", dbus.String("not ours"))], signature="(sv)"),
                               dbus.Array([], signature="(sa(sv))"))
    ours = await runtime.start(SPEC)

    other = SystemdRuntime(bus_address=private_bus)
    await other.connect()
    adopted = await other.adopt()
    assert [h.name for h in adopted] == [ours.name] and adopted[0].adopted
    with pytest.raises(ForeignUnit) as err:
        await other.start(LaunchSpec(model="theirs", argv=("/bin/true",)))
    assert "llmux-model-theirs.service" in str(err.value) and "not created by llmux" in str(err.value)
    assert calls(mock_systemd, "StopUnit") == []
    await other.close()


async def test_a_bus_without_systemd_is_a_clear_startup_error(private_bus):
    with pytest.raises(RuntimeUnavailable) as err:
        await SystemdRuntime(bus_address=private_bus).connect()
    assert "systemd does not answer" in str(err.value) and "embedded mode" in str(err.value)


def _plain(value):
    """dbus-python values as plain Python, for readable comparisons."""
    if isinstance(value, (dbus.Array, dbus.Struct, list, tuple)):
        if isinstance(value, dbus.Array) and value.signature == "y":
            return bytes(value)
        return [_plain(v) for v in value]
    if isinstance(value, dbus.ByteArray):
        return bytes(value)
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.String, dbus.ObjectPath)):
        return str(value)
    if isinstance(value, (int,)):
        return int(value)
    return value


async def test_a_restore_unit_is_forking_with_a_pid_file(runtime, mock_systemd):
    await runtime.start(LaunchSpec(**{**SPEC.__dict__, "service_type": "forking", "pid_file": "/run/llmux/m.pid"}))
    (_, _, props, _), = calls(mock_systemd, "StartTransientUnit")
    sent = {str(key): (signature_of(value), _plain(value)) for key, value in props}
    assert sent["Type"] == ("s", "forking") and sent["PIDFile"] == ("s", "/run/llmux/m.pid")
