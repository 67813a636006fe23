"""The io.llmux.LLMux1 service on a private system bus, called the way busctl
and llmuxctl call it (as root here; polkit cases are in test_bus_auth.py)."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import pytest
from dbus_fast import MessageType, Variant

from llmuxd.eviction import Eviction
from llmuxd.names import MANAGER_IFACE, MANAGER_PATH, MODEL_IFACE, model_object_path
from test_bus_support import (
    SignalLog,
    call,
    changed_props,
    connect,
    disconnect,
    error_of,
    poll_until,
    start_service,
    system_bus,  # noqa: F401  (fixture)
)

E = "io.llmux.LLMux1.Error."
LLAMA = model_object_path("llama")
QWEN = model_object_path("qwen-7b")
PROPS = "org.freedesktop.DBus.Properties"


@pytest.fixture
async def running(system_bus):
    r = await start_service(system_bus.address)
    yield r
    await r.close()


@pytest.fixture
async def client(system_bus, running):
    bus = await connect(system_bus.address)
    yield bus
    await disconnect(bus)


async def get(bus, path, iface, prop):
    reply = await call(bus, "Get", "ss", [iface, prop], path=path, interface=PROPS)
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body[0].value


async def ok(bus, member, signature="", body=None, **kw):
    reply = await call(bus, member, signature, body, **kw)
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return reply.body


async def introspect(bus, path):
    body = await ok(bus, "Introspect", path=path, interface="org.freedesktop.DBus.Introspectable")
    return ET.fromstring(body[0])


# -- what busctl tree / introspect / get-property see ---------------------------


async def test_tree_shows_models_under_the_manager(client):
    root = await introspect(client, MANAGER_PATH)
    assert [n.get("name") for n in root.findall("node")] == ["model"]
    names = {i.get("name") for i in root.findall("interface")}
    assert {MANAGER_IFACE, "org.freedesktop.DBus.ObjectManager", PROPS} <= names
    models = await introspect(client, MANAGER_PATH + "/model")
    assert sorted(n.get("name") for n in models.findall("node")) == ["llama", "qwen_2d7b"]
    leaf = await introspect(client, LLAMA)
    assert leaf.findall("node") == []  # 'llama' is not a parent of 'llama2'-like names
    assert MODEL_IFACE in {i.get("name") for i in leaf.findall("interface")}


async def test_introspection_names_arguments_and_marks_volatile_properties(client):
    root = await introspect(client, MANAGER_PATH)
    manager = next(i for i in root.findall("interface") if i.get("name") == MANAGER_IFACE)
    acquire = next(m for m in manager.findall("method") if m.get("name") == "Acquire")
    assert [(a.get("name"), a.get("type"), a.get("direction")) for a in acquire.findall("arg")] == [
        ("model", "s", "in"),
        ("timeout_usec", "t", "in"),
        ("endpoint", "s", "out"),
        ("lease", "t", "out"),
    ]
    leaf = await introspect(client, LLAMA)
    model = next(i for i in leaf.findall("interface") if i.get("name") == MODEL_IFACE)
    in_flight = next(p for p in model.findall("property") if p.get("name") == "InFlight")
    assert in_flight.find("annotation").get("value") == "false"


async def test_properties_of_manager_and_model(client):
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "Version") == "0.1.0-test"
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "APIVersion") == 2
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "Models") == [LLAMA, QWEN]
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "State") == "idle"
    assert await get(client, QWEN, MODEL_IFACE, "Name") == "qwen-7b"
    assert await get(client, QWEN, MODEL_IFACE, "Unit") == "llmux-model-qwen\\x2d7b.service"
    assert await get(client, QWEN, MODEL_IFACE, "Eviction") == "offload+keep_running"
    assert await get(client, QWEN, MODEL_IFACE, "Endpoint") == "http://127.0.0.1:9001"


async def test_get_managed_objects_lists_every_model(client):
    (objects,) = await ok(client, "GetManagedObjects", path=MANAGER_PATH,
                          interface="org.freedesktop.DBus.ObjectManager")
    assert {LLAMA, QWEN} <= set(objects)
    assert objects[LLAMA][MODEL_IFACE]["State"].value == "not_started"


# -- switching, signals, PropertiesChanged --------------------------------------


async def test_switch_and_wait_signals_and_property_changes(client):
    log = await SignalLog(client).watch()
    await ok(client, "SwitchAndWait", "st", ["llama", 0])
    finished = await log.wait_for(lambda: log.matching("SwitchFinished"))
    assert [m.body for m in log.matching("SwitchStarted")] == [["", "llama"]]
    assert finished[0].body == ["", "llama", True, 250_000, ""]
    await log.wait_for(lambda: any(c.get("State") == "active:llama" for c in changed_props(log, MANAGER_PATH)))
    assert any(c.get("ActiveModels") == ["llama"] for c in changed_props(log, MANAGER_PATH))
    await log.wait_for(lambda: any(c.get("State") == "ready" for c in changed_props(log, LLAMA)))
    assert await get(client, LLAMA, MODEL_IFACE, "LastSwitchUSec") == 250_000


async def test_switch_returns_once_queued_and_finishes_by_signal(client, running):
    running.switcher.proceed.clear()
    log = await SignalLog(client).watch()
    await ok(client, "Switch", "s", ["qwen-7b"])  # returns with the switch half-way
    await running.switcher.started.wait()
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "State") == "switching:none->qwen-7b"
    assert not log.matching("SwitchFinished")
    running.switcher.proceed.set()
    finished = await log.wait_for(lambda: log.matching("SwitchFinished"))
    assert finished[0].body[:3] == ["", "qwen-7b", True]


async def test_failed_switch_is_signalled_with_its_error(client, running):
    running.switcher.fail_next = "CUDA out of memory"
    log = await SignalLog(client).watch()
    name, message = error_of(await call(client, "SwitchAndWait", "st", ["llama", 0]))
    assert (name, message) == (E + "SwitchFailed", "model 'llama' failed to wake: CUDA out of memory")
    finished = await log.wait_for(lambda: log.matching("SwitchFinished"))
    assert finished[0].body[2:] == [False, 250_000, "CUDA out of memory"]
    await log.wait_for(lambda: any(c.get("LastError") == "CUDA out of memory" for c in changed_props(log, LLAMA)))


async def test_mode_pin_unpin_and_eviction_show_in_properties(client, running):
    await ok(client, "Pin", "s", ["llama"])
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "Mode") == "manual"
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "PinnedModel") == "llama"
    await ok(client, "Unpin")
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "PinnedModel") == ""
    await ok(client, "SetMode", "s", ["manual"])
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "Mode") == "manual"
    await ok(client, "SetEviction", "ss", ["llama", "discard+stop"])
    assert await get(client, LLAMA, MODEL_IFACE, "Eviction") == "discard+stop"
    await ok(client, "SetEviction", "ss", ["llama", ""])
    assert await get(client, LLAMA, MODEL_IFACE, "Eviction") == "offload+keep_running"
    await ok(client, "Sleep", "ss", ["llama", ""])
    await ok(client, "Sleep", "ss", ["llama", "3"])  # a llmux 0.7 level
    await ok(client, "Wake", "s", ["qwen-7b"])
    assert ("sleep", "llama", None) in running.switcher.calls
    assert ("sleep", "llama", Eviction.parse("retain+cuda_suspend")) in running.switcher.calls


async def test_get_status_has_everything(client, running):
    await ok(client, "SwitchAndWait", "st", ["llama", 0])
    (status,) = await ok(client, "GetStatus")
    plain = {k: v.value for k, v in status.items()}
    assert plain["state"] == "active:llama"
    assert plain["active_models"] == ["llama"]
    assert plain["mode"] == "auto" and plain["pinned"] == ""
    llama = {k: v.value for k, v in plain["models"]["llama"].items()}
    assert llama["state"] == "ready"
    assert llama["unit"] == "llmux-model-llama.service"
    assert set(llama) >= {"eviction", "in_flight", "queue_depth", "wait_estimate_usec", "endpoint"}


async def test_reload_adds_and_removes_model_objects(client, running):
    running.switcher.reload_names = ["llama", "mistral"]
    log = await SignalLog(client).watch()
    await ok(client, "Reload")
    removed = await log.wait_for(lambda: log.matching("InterfacesRemoved", MANAGER_PATH))
    added = await log.wait_for(lambda: log.matching("InterfacesAdded", MANAGER_PATH))
    assert removed[0].body == [QWEN, [MODEL_IFACE]]
    assert added[0].body[0] == model_object_path("mistral")
    assert added[0].body[1][MODEL_IFACE]["Name"].value == "mistral"
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "Models") == [LLAMA, model_object_path("mistral")]
    name, _ = error_of(await call(client, "Get", "ss", [MODEL_IFACE, "Name"], path=QWEN, interface=PROPS))
    assert name == "org.freedesktop.DBus.Error.UnknownObject"


# -- every error name for its cause ---------------------------------------------

ERROR_CASES = [
    # (setup, member, signature, body, error name, message fragment)
    (None, "Switch", "s", ["nope"], E + "NoSuchModel", "model 'nope' does not exist; known models: llama, qwen-7b"),
    ("pin", "SwitchAndWait", "st", ["qwen-7b", 0], E + "ModelPinned", "pinned to 'llama'"),
    (None, "Sleep", "ss", ["llama", "bogus"], E + "InvalidEviction", "write 'WEIGHTS+PROCESS'"),
    (None, "SetEviction", "ss", ["llama", "offload+nap"], E + "InvalidEviction", "unknown process strategy 'nap'"),
    ("fail", "SwitchAndWait", "st", ["llama", 0], E + "SwitchFailed", "failed to wake: GPU fell off the bus"),
    ("hold", "SwitchAndWait", "st", ["llama", 1000], E + "Timeout", "was not ready within 0.0s"),
    (None, "Reload", "", [], E + "InvalidConfig", "models.x.port: must be 1-65535"),
    (None, "Sleep", "ss", ["llama", "discard+checkpoint"], E + "NotSupported", "needs criu"),
    (None, "Release", "t", [99], E + "NoSuchLease", "lease 99 is not held by this connection"),
    (None, "SetMode", "s", ["turbo"], "org.freedesktop.DBus.Error.InvalidArgs", "unknown mode 'turbo'; use one of: auto, manual"),
    ("explode", "Wake", "s", ["llama"], "org.freedesktop.DBus.Error.Failed", "internal error (RuntimeError)"),
]


@pytest.mark.parametrize("setup,member,sig,body,name,fragment", ERROR_CASES, ids=[c[4].rsplit(".", 1)[1] for c in ERROR_CASES])
async def test_error_names(client, running, setup, member, sig, body, name, fragment):
    sw = running.switcher
    if setup == "pin":
        await ok(client, "Pin", "s", ["llama"])
    elif setup == "fail":
        sw.fail_next = "GPU fell off the bus"
    elif setup == "hold":
        sw.proceed.clear()
    elif setup == "explode":
        sw.explode = True
    got_name, message = error_of(await call(client, member, sig, body))
    assert got_name == name
    assert fragment in message
    assert "\n" not in message and "Traceback" not in message and ".py" not in message
    sw.proceed.set()


# -- bad input -------------------------------------------------------------------

BAD_CALLS = [
    # (path, interface, member, signature, body, error name, fragment)
    (MANAGER_PATH, MANAGER_IFACE, "Switch", "i", [5], "org.freedesktop.DBus.Error.InvalidArgs", "Switch takes (s model), not signature 'i'"),
    (MANAGER_PATH, MANAGER_IFACE, "SwitchAndWait", "s", ["llama"], "org.freedesktop.DBus.Error.InvalidArgs", "(s model, t timeout_usec)"),
    (MANAGER_PATH, MANAGER_IFACE, "Switch", "ss", ["a", "b"], "org.freedesktop.DBus.Error.InvalidArgs", "Switch takes"),
    (MANAGER_PATH, MANAGER_IFACE, "Explode", "", [], "org.freedesktop.DBus.Error.UnknownMethod", "has no method Explode"),
    (MANAGER_PATH, MODEL_IFACE, "Foo", "", [], "org.freedesktop.DBus.Error.UnknownInterface", "has no interface"),
    (model_object_path("nope"), PROPS, "GetAll", "s", [MODEL_IFACE], "org.freedesktop.DBus.Error.UnknownObject", "no model 'nope' here; models: llama, qwen-7b"),
    (MANAGER_PATH + "/model/llama/deeper", PROPS, "GetAll", "s", [MODEL_IFACE], "org.freedesktop.DBus.Error.UnknownObject", "no object"),
    (MANAGER_PATH, MANAGER_IFACE, "Switch", "s", ["../../etc/passwd"], E + "NoSuchModel", "does not exist"),
    (MANAGER_PATH, MANAGER_IFACE, "Pin", "s", [""], E + "NoSuchModel", "model '' does not exist"),
    (MANAGER_PATH, PROPS, "Set", "ssv", [MANAGER_IFACE, "Mode", Variant("s", "manual")], None, ""),
]


@pytest.mark.parametrize("path,iface,member,sig,body,name,fragment", BAD_CALLS)
async def test_bad_calls_get_errors_not_crashes(client, path, iface, member, sig, body, name, fragment):
    reply = await call(client, member, sig, body, path=path, interface=iface)
    got_name, message = error_of(reply)
    if name:
        assert got_name == name
        assert fragment in message
    assert (await ok(client, "GetStatus"))[0]["state"].value == "idle"  # still serving


@pytest.mark.parametrize("usec,expected", [(0, None), (1, 1e-6), (2**64 - 1, 86400.0), (30_000_000, 30.0)])
async def test_absurd_timeouts_are_handled(client, running, usec, expected):
    await ok(client, "SwitchAndWait", "st", ["llama", usec])
    assert running.switcher.calls[-1] == ("switch", "llama", True, expected)
    endpoint, lease = await ok(client, "Acquire", "st", ["llama", usec])
    assert running.switcher.calls[-2] == ("acquire", "llama", expected)
    assert endpoint == "http://127.0.0.1:9000" and lease >= 1
    await ok(client, "Release", "t", [lease])


async def test_a_thousand_status_calls_while_switching(system_bus, client, running):
    # dbus-daemon allows 128 pending replies per connection (the system bus
    # default), so the flood comes from ten clients at once, as it would.
    running.switcher.proceed.clear()
    await ok(client, "Switch", "s", ["llama"])
    await running.switcher.started.wait()
    clients = [await connect(system_bus.address) for _ in range(10)]
    try:
        replies = await asyncio.gather(*(call(c, "GetStatus") for c in clients for _ in range(100)))
    finally:
        for c in clients:
            await disconnect(c)
    assert len(replies) == 1000
    assert all(r.message_type == MessageType.METHOD_RETURN for r in replies), {
        (r.error_name, r.body[0]) for r in replies if r.error_name
    }
    assert {r.body[0]["state"].value for r in replies} == {"switching:none->llama"}
    running.switcher.proceed.set()
    await ok(client, "SwitchAndWait", "st", ["llama", 0])


async def leave_mid_call(address: str, running, member: str) -> str:
    """A fresh client calls `member` ("st", llama) and leaves the bus while the switch it
    started is held; its unique name."""
    running.switcher.proceed.clear()
    leaver = await connect(address)
    pending = asyncio.ensure_future(call(leaver, member, "st", ["llama", 0]))
    await running.switcher.started.wait()
    await disconnect(leaver)
    pending.cancel()
    return leaver.unique_name


async def test_client_leaving_mid_switch_and_wait(system_bus, client, running):
    await leave_mid_call(system_bus.address, running, "SwitchAndWait")
    assert (await ok(client, "GetStatus"))[0]["state"].value == "switching:none->llama"
    log = await SignalLog(client).watch()
    running.switcher.proceed.set()
    await log.wait_for(lambda: log.matching("SwitchFinished"))
    assert await get(client, MANAGER_PATH, MANAGER_IFACE, "State") == "active:llama"


# -- bus leases ------------------------------------------------------------------


async def test_lease_is_released_when_its_client_leaves(system_bus, client, running):
    holder = await connect(system_bus.address)
    endpoint, lease = await ok(holder, "Acquire", "st", ["llama", 0])
    assert endpoint == "http://127.0.0.1:9000"
    assert running.switcher.models["llama"].in_flight == 1
    assert running.service.leases_of(holder.unique_name) == [lease]
    # someone else cannot release it
    name, _ = error_of(await call(client, "Release", "t", [lease]))
    assert name == E + "NoSuchLease"
    await disconnect(holder)
    log = await SignalLog(client).watch()
    await ok(client, "GetStatus")  # NameOwnerChanged is ordered before this reply
    await poll_until(lambda: running.switcher.released)
    assert [l.model for l in running.switcher.released] == ["llama"]
    assert running.switcher.models["llama"].in_flight == 0
    del log


async def test_release_by_the_holder(client, running):
    _, lease = await ok(client, "Acquire", "st", ["qwen-7b", 0])
    await ok(client, "Release", "t", [lease])
    assert running.switcher.released and running.switcher.released[0].model == "qwen-7b"
    name, _ = error_of(await call(client, "Release", "t", [lease]))
    assert name == E + "NoSuchLease"


async def test_second_daemon_cannot_take_the_name(system_bus, running):
    with pytest.raises(RuntimeError, match="already owned"):
        await start_service(system_bus.address)


async def test_lease_of_a_client_that_left_while_waiting_is_released(system_bus, client, running):
    holder = await leave_mid_call(system_bus.address, running, "Acquire")
    await ok(client, "GetStatus")  # the service has seen the client leave
    running.switcher.proceed.set()
    await poll_until(lambda: running.switcher.released)
    assert [l.model for l in running.switcher.released] == ["llama"]
    assert running.service.leases_of(holder) == []
