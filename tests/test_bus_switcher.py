"""The bus service over the real Switcher and tests/fakes.py's FakeBackends:
what a bus client sees during real switches, failures, pins, leases, reloads."""

from __future__ import annotations

import pytest
from dbus_fast import MessageType

from fakes import FakeBackends, make_config
from llmuxd.bus.service import export_service
from llmuxd.names import MANAGER_IFACE, MANAGER_PATH, MODEL_IFACE, model_object_path
from llmuxd.switcher import Switcher
from test_bus_support import (SignalLog, call, changed_props, connect, disconnect, error_of, poll_until,  # noqa: F401
                               system_bus)

E = "io.llmux.LLMux1.Error."
PROPS = "org.freedesktop.DBus.Properties"
A, B = model_object_path("a"), model_object_path("b")


class Stack:
    def __init__(self, bus, switcher, backends, service, configs):
        self.bus, self.switcher, self.backends, self.service, self.configs = bus, switcher, backends, service, configs


@pytest.fixture
async def stack(system_bus):
    config = make_config(("a", "b"), policy={"drain_timeout": 5, "coalesce_window": 0, "min_active": 0})
    backends = FakeBackends(config)
    switcher = Switcher(config, backends)
    await switcher.start()
    configs = [config]

    async def reload():
        new = make_config(("a", "c"))
        for name in new.models:
            if name not in backends.states:
                backends.add_model(name)
                backends.ports[name] = 20100
        await switcher.reload(new)
        configs.append(new)

    bus = await connect(system_bus.address)
    service = await export_service(bus, switcher, reload=reload, version="t", refresh_interval=0)
    await service.request_name()
    yield Stack(bus, switcher, backends, service, configs)
    await service.close()
    await disconnect(bus)
    await switcher.close()


@pytest.fixture
async def client(system_bus, stack):
    bus = await connect(system_bus.address)
    yield bus
    await disconnect(bus)


async def ok(bus, member, sig="", body=None, **kw):
    reply = await call(bus, member, sig, body, **kw)
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return reply.body


async def prop(bus, path, iface, name):
    (v,) = await ok(bus, "Get", "ss", [iface, name], path=path, interface=PROPS)
    return v.value


async def test_real_switches_are_signalled(client, stack):
    log = await SignalLog(client).watch()
    await ok(client, "SwitchAndWait", "st", ["a", 0])
    await ok(client, "SwitchAndWait", "st", ["b", 0])
    done = await log.wait_for(lambda: len(log.matching("SwitchFinished")) >= 2 and log.matching("SwitchFinished"))
    assert [m.body[:3] for m in log.matching("SwitchStarted")] == [["", "a"], ["a", "b"]]
    assert [m.body[:3] for m in done] == [["", "a", True], ["a", "b", True]]
    await log.wait_for(lambda: any(c.get("State") == "active:b" for c in changed_props(log, MANAGER_PATH)))
    await log.wait_for(lambda: any(c.get("State") == "asleep" for c in changed_props(log, A)))
    assert await prop(client, B, MODEL_IFACE, "State") == "active"
    assert await prop(client, B, MODEL_IFACE, "Endpoint") == stack.backends.endpoint("b")
    assert await prop(client, MANAGER_PATH, MANAGER_IFACE, "ActiveModels") == ["b"]


async def test_switch_returns_before_the_backend_is_up(client, stack):
    hold = stack.backends.hold("start", "a")
    log = await SignalLog(client).watch()
    await ok(client, "Switch", "s", ["a"])
    await stack.backends.entered("start", "a").wait()
    assert (await prop(client, MANAGER_PATH, MANAGER_IFACE, "State")).startswith("switching:")
    assert await prop(client, A, MODEL_IFACE, "State") == "waking"
    hold.set()
    finished = await log.wait_for(lambda: log.matching("SwitchFinished"))
    assert finished[0].body[1:3] == ["a", True]


async def test_backend_failure_is_a_switch_failed_error(client, stack):
    stack.backends.fail("start", "b", "CUDA out of memory")
    name, message = error_of(await call(client, "SwitchAndWait", "st", ["b", 0]))
    assert name == E + "SwitchFailed"
    assert "CUDA out of memory" in message and "\n" not in message
    assert "CUDA out of memory" in await prop(client, B, MODEL_IFACE, "LastError")


async def test_pin_blocks_other_switches(client, stack):
    await ok(client, "Pin", "s", ["a"])
    assert await prop(client, MANAGER_PATH, MANAGER_IFACE, "PinnedModel") == "a"
    name, message = error_of(await call(client, "SwitchAndWait", "st", ["b", 0]))
    assert name == E + "ModelPinned"
    await ok(client, "Unpin")
    await ok(client, "SwitchAndWait", "st", ["b", 0])


async def test_eviction_override_and_sleep(client, stack):
    await ok(client, "SetEviction", "ss", ["a", "retain+stop"])
    assert await prop(client, A, MODEL_IFACE, "Eviction") == "retain+stop"
    await ok(client, "SwitchAndWait", "st", ["a", 0])
    await ok(client, "Sleep", "ss", ["a", ""])
    assert ("sleep", "a", "retain+stop") in stack.backends.calls
    name, _ = error_of(await call(client, "SetEviction", "ss", ["a", "offload+nap"]))
    assert name == E + "InvalidEviction"


async def test_bus_lease_holds_the_model_until_its_client_leaves(system_bus, client, stack):
    holder = await connect(system_bus.address)
    endpoint, lease = await ok(holder, "Acquire", "st", ["a", 0])
    assert endpoint == stack.backends.endpoint("a")
    assert stack.switcher.status().models["a"].in_flight == 1
    await disconnect(holder)
    await poll_until(lambda: stack.switcher.status().models["a"].in_flight == 0)
    assert stack.switcher.status().models["a"].in_flight == 0
    assert stack.service.leases_of(holder.unique_name) == []


async def test_reload_changes_the_model_objects(client, stack):
    log = await SignalLog(client).watch()
    await ok(client, "Reload")
    assert await prop(client, MANAGER_PATH, MANAGER_IFACE, "Models") == [A, model_object_path("c")]
    await log.wait_for(lambda: log.matching("InterfacesAdded", MANAGER_PATH))
    name, _ = error_of(await call(client, "GetAll", "s", [MODEL_IFACE], path=B, interface=PROPS))
    assert name == "org.freedesktop.DBus.Error.UnknownObject"
