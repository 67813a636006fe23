"""The orchestrator's partial steps of an overlapped switch (issue #26) on real
simulators, under each runtime: pause and KV release, the weights back alone,
then the KV cache and scheduling; a refusal leaves the model fit for the
sequential sleep; a weights wake failing midway stops the model."""

from __future__ import annotations

import pytest

from llmuxd.errors import BackendError
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import BackendState
from test_orchestrator import answer, fault, make, refuses_connections, runtime_kind, sim_state, unique  # noqa: F401

OFFLOAD = Eviction.parse("offload+keep_running")
DISCARD = Eviction.parse("discard+keep_running")


@pytest.mark.parametrize("eviction", [OFFLOAD, DISCARD], ids=str)
async def test_partial_steps_round_trip(make, eviction):  # noqa: F811
    model = unique("parts")
    orch = await make({model: {}})
    await orch.ensure_awake(model)
    before = await answer(orch, model)
    steps: list[str] = []
    await orch.pause_and_release(model, eviction, steps.append)
    st = await sim_state(orch, model)
    assert (steps, st["sleeping_tags"], st["scheduler_paused"]) == (["kv_release"], ["kv_cache"], True)
    assert orch.state(model) is BackendState.READY and not orch.wakes_in_parts(model)
    await orch.sleep(model, eviction)
    assert orch.state(model) is BackendState.SLEEPING and orch.wakes_in_parts(model)
    await orch.wake_weights(model)
    st = await sim_state(orch, model)
    assert st["sleeping_tags"] == ["kv_cache"] and st["weights_valid"]  # reloaded after discard
    await orch.finish_wake(model, steps.append)
    assert steps == ["kv_release", "scheduling"]
    assert orch.state(model) is BackendState.READY
    assert await answer(orch, model) == before


async def test_a_refused_release_leaves_the_model_fit_for_its_sleep(make):  # noqa: F811
    model = unique("cpu")
    orch = await make({model: {"env": {"LLMUX_SIM_PLATFORM": "cpu"}, "sleep_mode": False}})
    await orch.ensure_awake(model)
    with pytest.raises(BackendError) as err:
        await orch.pause_and_release(model, OFFLOAD)
    assert err.value.phase == "kv release"
    assert "Selective discard is not supported on CPU" in err.value.refused
    await orch.sleep(model, OFFLOAD)
    assert orch.state(model) is BackendState.SLEEPING  # not stopped
    await orch.ensure_awake(model)
    assert orch.state(model) is BackendState.READY


async def test_an_ordinary_failure_is_not_a_refusal(make):  # noqa: F811
    model = unique("failrel")
    orch = await make({model: {}})
    await orch.ensure_awake(model)
    await fault(orch, model, "fail_release")
    with pytest.raises(BackendError) as err:
        await orch.pause_and_release(model, OFFLOAD)
    assert err.value.phase == "kv release" and err.value.refused is None


async def test_a_weights_wake_failing_midway_stops_the_model(make):  # noqa: F811
    model = unique("midway")
    orch = await make({model: {}})
    await orch.ensure_awake(model)
    await orch.sleep(model, OFFLOAD)
    await fault(orch, model, "fail_wake_midway")
    with pytest.raises(BackendError) as err:
        await orch.wake_weights(model)
    assert (err.value.model, err.value.phase) == (model, "wake weights")
    assert orch.state(model) is BackendState.FAILED
    assert refuses_connections(orch, model)
