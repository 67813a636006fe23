"""Authorization: reads are public, changes ask polkit (dbusmock's polkitd on a
private system bus), root passes, and nothing is exported without a decision.

The unprivileged caller is a real process running as 'nobody' (setpriv), so
the daemon's GetConnectionUnixUser and polkit's subject are the real thing.
"""

from __future__ import annotations

import os
import shutil

import pytest
from dbus_fast.service import method

from llmuxd.bus.auth import (
    ACTION_ACQUIRE,
    ACTION_CONTROL,
    ACTION_RELOAD,
    SecureInterface,
    bus_method,
)
from llmuxd.bus.service import ManagerInterface, ModelInterface
from test_bus_support import (
    NOBODY,
    PrivateBus,
    call,
    call_as,
    connect,
    disconnect,
    error_of,
    start_service,
    system_bus,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root to run a caller as another user",
)

DENIED = "org.freedesktop.DBus.Error.AccessDenied"
CHALLENGE = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


@pytest.fixture
async def running(system_bus):
    system_bus.mock_call("SetAllowed", "as", [[]])
    system_bus.mock_call("SetChallenge", "asb", [[], False])
    r = await start_service(system_bus.address)
    yield r
    await r.close()


def test_every_method_has_a_decision_and_changes_need_an_action():
    table = ManagerInterface.authorization_table()
    assert table == {
        "Switch": ACTION_CONTROL,
        "SwitchAndWait": ACTION_CONTROL,
        "SwitchWithOptions": ACTION_CONTROL,
        "Pin": ACTION_CONTROL,
        "Unpin": ACTION_CONTROL,
        "SetMode": ACTION_CONTROL,
        "Sleep": ACTION_CONTROL,
        "Wake": ACTION_CONTROL,
        "SetEviction": ACTION_CONTROL,
        "Reload": ACTION_RELOAD,
        "Acquire": ACTION_ACQUIRE,
        "Release": ACTION_ACQUIRE,
        "GetStatus": None,
    }
    assert ModelInterface.authorization_table() == {}


def test_an_export_without_a_decision_fails_at_class_creation():
    with pytest.raises(TypeError, match="Leaky.Oops is exported on the bus without an authorization decision"):

        class Leaky(SecureInterface):  # noqa: F841
            @method()
            async def Oops(self) -> "s":
                return "no check"

    with pytest.raises(TypeError, match="exactly one of"):
        bus_method()
    with pytest.raises(TypeError, match="exactly one of"):
        bus_method(action=ACTION_CONTROL, public=True)
    with pytest.raises(TypeError, match="unknown polkit action"):
        bus_method(action="io.llmux.LLMux1.everything")


async def test_reads_are_public(system_bus, running):
    before = len(system_bus.mock_call("Seen", "", []))
    got = await call_as(NOBODY, system_bus.address, "GetStatus")
    assert got["ok"][0]["state"] == "idle"
    # public: answered without asking polkit at all (it would have said no)
    assert system_bus.mock_call("Seen", "", [])[before:] == []


# (polkit answer, interactive flag, member, sig, body) -> expected
CASES = [
    ("deny", False, "Pin", "s", ["llama"], (DENIED, "not authorized for io.llmux.LLMux1.control")),
    ("allow-control", False, "Pin", "s", ["llama"], None),
    ("allow-control", False, "Reload", "", [], (DENIED, "not authorized for io.llmux.LLMux1.reload")),
    ("allow-control", False, "Acquire", "st", ["llama", 0], (DENIED, "io.llmux.LLMux1.acquire")),
    ("challenge", False, "SwitchAndWait", "st", ["llama", 0], (CHALLENGE, "needs authentication")),
    ("challenge", True, "SwitchAndWait", "st", ["llama", 0], (DENIED, "not authorized")),
    ("challenge-agent-yes", True, "SetMode", "s", ["manual"], None),
    ("challenge-agent-yes", False, "SetMode", "s", ["manual"], (CHALLENGE, "io.llmux.LLMux1.control")),
]


@pytest.mark.parametrize("polkit,interactive,member,sig,body,expected", CASES)
async def test_polkit_decides_for_ordinary_users(system_bus, running, polkit, interactive, member, sig, body, expected):
    if polkit == "allow-control":
        system_bus.mock_call("SetAllowed", "as", [[ACTION_CONTROL]])
    elif polkit.startswith("challenge"):
        system_bus.mock_call("SetChallenge", "asb", [[ACTION_CONTROL], polkit.endswith("yes")])
    before = len(system_bus.mock_call("Seen", "", []))
    got = await call_as(NOBODY, system_bus.address, member, sig, body, interactive=interactive)
    if expected is None:
        assert "ok" in got, got
    else:
        assert got["error"] == expected[0]
        assert expected[1] in got["message"]
        assert "\n" not in got["message"]
    # polkit was asked once, with AllowUserInteraction exactly when the caller allowed it
    seen = system_bus.mock_call("Seen", "", [])[before:]
    action = "io.llmux.LLMux1." + ("reload" if member == "Reload" else
                                   "acquire" if member == "Acquire" else "control")
    assert [(str(a), int(f)) for a, f in seen] == [(action, 1 if interactive else 0)]


async def test_root_passes_without_asking_polkit(system_bus, running):
    client = await connect(system_bus.address)  # this test runs as root
    try:
        before = len(system_bus.mock_call("Seen", "", []))
        reply = await call(client, "Pin", "s", ["llama"])
        assert reply.message_type.name == "METHOD_RETURN", reply.body
        assert len(system_bus.mock_call("Seen", "", [])) == before
    finally:
        await disconnect(client)


async def test_without_polkitd_only_root_may_change_things():
    bus = PrivateBus("system")  # no polkit on this one
    try:
        r = await start_service(bus.address)
        try:
            got = await call_as(NOBODY, bus.address, "Pin", "s", ["llama"])
            assert got["error"] == DENIED
            assert "polkit is not running, so only root may do this" in got["message"]
            assert "ok" in await call_as(NOBODY, bus.address, "GetStatus")
            client = await connect(bus.address)
            try:
                reply = await call(client, "Pin", "s", ["llama"])
                assert reply.message_type.name == "METHOD_RETURN", reply.body
                name, _ = error_of(await call(client, "Pin", "s", ["nope"]))
                assert name == "io.llmux.LLMux1.Error.NoSuchModel"
            finally:
                await disconnect(client)
        finally:
            await r.close()
    finally:
        bus.close()
