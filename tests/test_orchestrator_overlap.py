"""The orchestrator's partial steps of an overlapped switch (issue #26) on real
simulators, under each runtime: pause and KV release, the weights back alone,
then the KV cache and scheduling; a refusal leaves the model fit for the
sequential sleep; a weights wake failing midway stops the model."""

from __future__ import annotations

import pytest

from llmuxd.checkpoint.gpu_probe import Measurement
from llmuxd.engine.errors import BackendHTTPError
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


class ScriptedProbe:
    """An orchestrator hook whose GPU probe answers from a script (None: it cannot measure)."""

    def __init__(self, readings: list):
        self.readings = list(readings)

    def backend_env(self, model, config, env):
        return env

    async def before_sleep(self, orchestrator, m, eviction):
        return eviction

    async def after_sleep(self, orchestrator, m, eviction):
        return None

    async def after_wake(self, orchestrator, m, eviction, fresh):
        return None

    async def measure_backend(self, orchestrator, m):
        mib = self.readings.pop(0) if self.readings else None
        return None if mib is None else Measurement(mib, "scripted per process")


def record_wakes(orch, model: str, refuse_tags: bool = False) -> list:
    """The tags of each /wake_up the orchestrator sends to `model` (None: a plain wake)."""
    engine = orch._models[model].engine
    real, calls = engine.wake_up, []

    async def wake_up(tags=None):
        calls.append(tuple(tags) if tags else None)
        if tags and refuse_tags:
            raise BackendHTTPError(404, '{"detail":"Not Found"}', url=orch.endpoint(model), operation="wake_up")
        return await real(tags)

    engine.wake_up = wake_up
    return calls


PARTS = [("weights",), ("kv_cache",), ("scheduling",)]


@pytest.mark.parametrize("readings,refuse,wakes,measured", [
    ([500, 8692], False, PARTS, 8.0),  # the weights step added 8 GiB: measured, in parts
    ([500, 500], False, PARTS, None),  # nothing seen to arrive: not a size
    ([None], False, [None], None),  # no probe answers: the plain wake
    ([500], True, [("weights",), None], None),  # a server without tagged wakes: the plain wake after its refusal
], ids=["measured", "nothing-seen", "no-probe", "refused"])
async def test_the_first_wake_measures_the_weights_once(make, readings, refuse, wakes, measured):  # noqa: F811
    model = unique("learn")
    orch = await make({model: {}})
    orch.hooks.append(ScriptedProbe(readings + [4000, 9000]))  # a second wake must not measure
    await orch.ensure_awake(model)
    before = await answer(orch, model)
    calls = record_wakes(orch, model, refuse)
    for _ in range(2):
        await orch.sleep(model, OFFLOAD)
        await orch.ensure_awake(model)
        assert orch.state(model) is BackendState.READY and await answer(orch, model) == before
    assert calls == wakes + [None]  # the second wake is plain
    assert orch.weights_gib(model) == measured
