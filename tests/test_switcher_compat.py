"""llmux 0.7 behaviours of the switcher: a forced switch moves the pin, and
each model's status says where its backend is (0.7's process_state)."""

from __future__ import annotations

import pytest
from fakes import FakeBackends, make_config, virtual

from llmuxd.errors import ModelPinned, SwitchFailed
from llmuxd.events import ModeChanged
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import BackendDetail, BackendState
from llmuxd.switcher import Switcher
from llmuxd.switching.state import ModelState, process_state


async def rig(models=("a", "b", "c")):
    import asyncio

    config = make_config(models, policy={"min_active": 0})
    backends = FakeBackends(config)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    events: list = []
    switcher.subscribe(events.append)
    await switcher.start()
    return switcher, backends, events


def pin_state(switcher):
    status = switcher.status()
    return status.mode, status.pinned, status.state


# ---------------------------------------------------------------------------- force switch


@virtual
async def test_plain_switch_while_pinned_fails_and_says_how_to_force():
    switcher, _, _ = await rig()
    await switcher.pin("a")
    with pytest.raises(ModelPinned) as info:
        await switcher.switch("b")
    assert str(info.value) == (
        "llmux is in manual mode, pinned to 'a'; 'b' is not served until unpinned; to move the pin to it and "
        "switch, force it: llmuxctl switch --force b (bus: SwitchWithOptions with force=true)"
    )
    assert pin_state(switcher) == ("manual", "a", "active:a")


@virtual
async def test_force_switch_while_pinned_moves_the_pin_and_switches():
    switcher, _, events = await rig()
    await switcher.pin("a")
    await switcher.switch("b", force=True)
    assert pin_state(switcher) == ("manual", "b", "active:b")
    assert [e for e in events if isinstance(e, ModeChanged)] == [ModeChanged("manual", "a"), ModeChanged("manual", "b")]
    (await switcher.acquire("b")).release()  # the new pin serves
    with pytest.raises(ModelPinned):
        await switcher.acquire("a")  # the old one no longer does


@virtual
async def test_force_switch_without_waiting_moves_the_pin_at_once():
    switcher, backends, _ = await rig()
    await switcher.pin("a")
    gate = backends.hold("start", "b")
    await switcher.switch("b", wait=False, force=True)
    assert pin_state(switcher)[:2] == ("manual", "b")
    gate.set()
    (await switcher.acquire("b")).release()
    assert pin_state(switcher) == ("manual", "b", "active:b")


@virtual
async def test_failed_force_switch_puts_the_pin_back():
    switcher, backends, _ = await rig()
    await switcher.pin("a")
    backends.fail("start", "b")
    with pytest.raises(SwitchFailed):
        await switcher.switch("b", force=True)
    assert pin_state(switcher)[:2] == ("manual", "a")


@virtual
async def test_force_in_manual_mode_without_a_pin_pins_the_target():
    switcher, _, _ = await rig()
    await switcher.switch("a")
    await switcher.set_mode("manual")
    await switcher.switch("b", force=True)
    assert pin_state(switcher) == ("manual", "b", "active:b")


@virtual
async def test_force_in_auto_mode_is_a_plain_switch():
    switcher, _, events = await rig()
    await switcher.switch("b", force=True)
    assert pin_state(switcher) == ("auto", None, "active:b")
    assert not [e for e in events if isinstance(e, ModeChanged)]


@virtual
async def test_force_switch_to_the_pinned_model_changes_nothing():
    switcher, backends, events = await rig()
    await switcher.pin("a")
    calls, n = list(backends.calls), len(events)
    await switcher.switch("a", force=True)
    assert backends.calls == calls and len(events) == n


# ---------------------------------------------------------------------------- process_state

_ASLEEP, _ACTIVE, _FAILED = ModelState.ASLEEP, ModelState.ACTIVE, ModelState.FAILED
OFFLOAD_FREEZE = Eviction.parse("offload+freeze")

PROCESS_CASES = [
    # (switcher's state, backend detail, process_state)
    (_ASLEEP, BackendDetail(BackendState.NOT_STARTED), "not_started"),
    (ModelState.WAKING, BackendDetail(BackendState.STARTING), "starting"),
    (_ACTIVE, BackendDetail(BackendState.READY), "running"),
    (ModelState.DRAINING, BackendDetail(BackendState.READY), "running"),
    (ModelState.EVICTING, BackendDetail(BackendState.READY), "running"),
    (_ASLEEP, BackendDetail(BackendState.SLEEPING, OFFLOAD_FREEZE), "sleeping:offload+freeze"),
    (_ASLEEP, BackendDetail(BackendState.SLEEPING), "sleeping"),
    (_ASLEEP, BackendDetail(BackendState.CHECKPOINTED, Eviction.parse("discard+checkpoint")), "checkpointed"),
    (_ASLEEP, BackendDetail(BackendState.STOPPED), "stopped"),
    (_ASLEEP, BackendDetail(BackendState.FAILED, reason="start: exited"), "failed"),
    (_FAILED, BackendDetail(BackendState.STOPPED), "failed"),  # a failed wake, stopped after
]


@pytest.mark.parametrize("state,detail,expected", PROCESS_CASES, ids=[c[2] + "/" + c[0].value for c in PROCESS_CASES])
def test_process_state_combines_switcher_and_backend(state, detail, expected):
    assert process_state(state, detail) == expected


class DetailedBackends(FakeBackends):
    """FakeBackends that also say how a model sleeps (as the orchestrator does)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.slept_with: dict = {}

    async def sleep(self, model, eviction):
        await super().sleep(model, eviction)
        self.slept_with[model] = eviction

    def detail(self, model):
        state = self.states[model]
        return BackendDetail(state, self.slept_with.get(model) if state is BackendState.SLEEPING else None)


@virtual
async def test_status_shows_each_models_process_state_and_the_error_of_a_failure():
    import asyncio

    config = make_config({"a": {"eviction": "offload+keep_running"}, "b": {"eviction": "retain+stop"}, "c": {}},
                         policy={"min_active": 0})
    backends = DetailedBackends(config)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    await switcher.start()

    def states():
        return {n: m.process_state for n, m in switcher.status().models.items()}

    assert states() == {"a": "not_started", "b": "not_started", "c": "not_started"}
    await switcher.switch("a")
    await switcher.switch("b")
    assert states() == {"a": "sleeping:offload+keep_running", "b": "running", "c": "not_started"}
    backends.fail("start", "c", reason="CUDA out of memory")
    with pytest.raises(SwitchFailed):
        await switcher.switch("c")
    status = switcher.status().models
    assert states() == {"a": "sleeping:offload+keep_running", "b": "stopped", "c": "failed"}
    assert status["c"].state == "failed" and "CUDA out of memory" in status["c"].last_error


@virtual
async def test_backends_without_detail_still_give_a_process_state():
    switcher, _, _ = await rig()
    await switcher.switch("a")
    await switcher.switch("b")
    assert {n: m.process_state for n, m in switcher.status().models.items()} == {
        "a": "sleeping", "b": "running", "c": "not_started"}
