"""The bus and llmuxctl side of llmux 0.7 compatibility, on a private bus with
the in-process service: SwitchWithOptions (a forced switch moves the pin),
llmuxctl switch --force, and each model's process_state."""

from __future__ import annotations

import json

import pytest
from dbus_fast import Variant

from llmuxd.names import MODEL_IFACE, model_object_path
from test_bus_service import client, ok  # noqa: F401  (fixture)
from test_bus_support import call, error_of, system_bus  # noqa: F401  (fixture)
from test_ctl import env, llmuxctl, running  # noqa: F401  (fixtures)

PINNED = "io.llmux.LLMux1.Error.ModelPinned"
INVALID = "org.freedesktop.DBus.Error.InvalidArgs"


def opts(**values):
    sigs = {"force": "b", "wait": "b", "timeout_usec": "t"}
    return {k: Variant(sigs.get(k, "s"), v) for k, v in values.items()}


async def test_plain_switch_while_pinned_is_refused_and_says_how_to_force(client, running):
    await ok(client, "Pin", "s", ["llama"])
    for member, sig, body in [("Switch", "s", ["qwen-7b"]), ("SwitchAndWait", "st", ["qwen-7b", 0]),
                              ("SwitchWithOptions", "sa{sv}", ["qwen-7b", opts(wait=True)])]:
        name, message = error_of(await call(client, member, sig, body))
        assert name == PINNED, member
        assert message.endswith("to move the pin to it and switch, force it: llmuxctl switch --force qwen-7b "
                                "(bus: SwitchWithOptions with force=true)"), message
    assert running.switcher.pinned == "llama"


async def test_switch_with_force_moves_the_pin(client, running):
    await ok(client, "Pin", "s", ["llama"])
    await ok(client, "SwitchWithOptions", "sa{sv}", ["qwen-7b", opts(force=True, wait=True, timeout_usec=30_000_000)])
    assert running.switcher.calls[-1] == ("switch", "qwen-7b", True, 30.0, "force")
    assert (running.switcher.pinned, running.switcher.active) == ("qwen-7b", "qwen-7b")


async def test_switch_with_options_defaults_to_a_queued_plain_switch(client, running):
    await ok(client, "SwitchWithOptions", "sa{sv}", ["llama", {}])
    assert running.switcher.calls[-1] == ("switch", "llama", False, None)


@pytest.mark.parametrize("options,fragment", [
    ({"forse": Variant("b", True)}, "unknown switch option 'forse'; known options: force (b), wait (b), timeout_usec (t)"),
    ({"force": Variant("s", "yes")}, "switch option 'force' must have type 'b', not 's'"),
    ({"timeout_usec": Variant("u", 5)}, "switch option 'timeout_usec' must have type 't', not 'u'"),
])
async def test_bad_switch_options_are_invalid_args(client, running, options, fragment):
    name, message = error_of(await call(client, "SwitchWithOptions", "sa{sv}", ["llama", options]))
    assert (name, message) == (INVALID, fragment)
    assert not [c for c in running.switcher.calls if c[0] == "switch"]


async def test_process_state_in_get_status_and_as_a_property(client, running):
    running.switcher.models["llama"].process_state = "sleeping:offload+freeze"
    (status,) = await ok(client, "GetStatus")
    models = status["models"].value
    assert models["llama"]["process_state"].value == "sleeping:offload+freeze"
    assert models["qwen-7b"]["process_state"].value == "not_started"
    running.service._refresh()  # what a switcher event or the refresh tick does
    reply = await call(client, "Get", "ss", [MODEL_IFACE, "ProcessState"], path=model_object_path("llama"),
                       interface="org.freedesktop.DBus.Properties")
    assert reply.body[0].value == "sleeping:offload+freeze"


async def test_llmuxctl_switch_force(running, env):
    await running.switcher.pin("llama")
    r = await llmuxctl("switch", "qwen-7b", env=env)
    assert r.rc == 1 and "llmuxctl switch --force qwen-7b" in r.err, r
    r = await llmuxctl("switch", "--force", "qwen-7b", env=env)
    assert r.rc == 0, r
    assert r.out.splitlines()[-1].startswith("qwen-7b is active")
    assert running.switcher.pinned == "qwen-7b"
    r = await llmuxctl("--json", "switch", "--force", "--no-wait", "llama", env=env)
    assert r.rc == 0 and json.loads(r.out) == {"model": "llama", "queued": True}, r
    assert running.switcher.calls[-1] == ("switch", "llama", False, None, "force")


async def test_llmuxctl_status_shows_the_process_column(running, env):
    running.switcher.models["llama"].process_state = "failed"
    running.switcher.models["llama"].last_error = "start: CUDA out of memory"
    r = await llmuxctl("status", env=env)
    assert r.rc == 0, r
    rows = {line.split()[0]: line.split() for line in r.out.splitlines()[3:] if line and not line.startswith("(!)")}
    assert rows["llama"][:4] == ["llama", "not_started", "(!)", "failed"], rows
    assert "(!) llama: start: CUDA out of memory" in r.out
