"""The switcher's behaviour, scenario by scenario (llmux 0.7's switcher tests and ours).

All on a virtual clock (fakes.VirtualTimeLoop): waits of minutes take no real
time, and durations asserted here are virtual, so they are exact, not timings.
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional, Tuple

import pytest
from fakes import FakeBackends, make_config, virtual

from llmuxd.errors import (
    InvalidEviction,
    ModelPinned,
    QueueFull,
    SwitchFailed,
    SwitchTimeout,
    UnknownModel,
)
from llmuxd.events import ModeChanged, ModelStateChanged, SwitchFinished, SwitchStarted
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import BackendState
from llmuxd.switcher import InvalidMode, ShuttingDown, Switcher


async def rig(
    models: Any = ("a", "b"),
    *,
    policy: Optional[dict] = None,
    groups: Optional[dict] = None,
    start: bool = True,
    **delays: float,
) -> Tuple[Switcher, FakeBackends, List[Any]]:
    """A started switcher on FakeBackends; min_active 0 unless the test sets it."""
    config = make_config(models, policy={"min_active": 0, **(policy or {})}, groups=groups)
    backends = FakeBackends(config, **delays)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    events: List[Any] = []
    switcher.subscribe(events.append)
    if start:
        await switcher.start()
    return switcher, backends, events


async def acquire_held_in_start(switcher: Switcher, backends: FakeBackends, model: str = "a"
                                ) -> Tuple[asyncio.Event, "asyncio.Future[Any]"]:
    """An acquire of `model` waiting while its backend's start is held: (gate, waiter);
    setting the gate lets the start finish."""
    gate = backends.hold("start", model)
    waiter = asyncio.ensure_future(switcher.acquire(model))
    await backends.entered("start", model).wait()
    return gate, waiter


def finished(events: List[Any]) -> List[SwitchFinished]:
    return [e for e in events if isinstance(e, SwitchFinished)]


async def until_state(switcher: Switcher, model: str, state: str) -> None:
    """Wait (event-based) until `model` reaches `state`."""
    reached = asyncio.Event()

    def listener(event: Any) -> None:
        if isinstance(event, ModelStateChanged) and event.model == model and event.state == state:
            reached.set()

    unsubscribe = switcher.subscribe(listener)
    try:
        if switcher.status().models[model].state != state:
            await reached.wait()
    finally:
        unsubscribe()


# ---------------------------------------------------------------------------- registration, status


@virtual
async def test_fresh_switcher_is_idle_in_auto_mode():
    switcher, backends, _ = await rig()
    status = switcher.status()
    assert (status.state, status.mode, status.pinned, status.active_models) == ("idle", "auto", None, ())
    assert set(status.models) == {"a", "b"}
    assert status.models["a"].state == "asleep"
    assert status.models["a"].eviction == "offload+keep_running"
    assert status.models["a"].endpoint == backends.endpoint("a")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.acquire("nope"),
        lambda s: s.switch("nope"),
        lambda s: s.pin("nope"),
        lambda s: s.sleep_model("nope"),
        lambda s: s.wake_model("nope"),
    ],
    ids=["acquire", "switch", "pin", "sleep", "wake"],
)
@virtual
async def test_unknown_model_is_refused_with_the_known_ones(call):
    switcher, backends, _ = await rig()
    with pytest.raises(UnknownModel) as info:
        await call(switcher)
    assert str(info.value) == "model 'nope' does not exist; known models: a, b"
    assert info.value.http_status == 404
    assert backends.calls == []


@virtual
async def test_unknown_model_in_sync_calls():
    switcher, _, _ = await rig()
    for call in (lambda: switcher.set_eviction("nope", None), lambda: switcher.wait_estimate("nope"),
                 lambda: switcher.eviction_for("nope")):
        with pytest.raises(UnknownModel):
            call()


# ---------------------------------------------------------------------------- leases


@virtual
async def test_leases_count_in_flight_and_release_once():
    switcher, backends, _ = await rig()
    first = await switcher.acquire("a")
    second = await switcher.acquire("a")
    assert first.endpoint == backends.endpoint("a") and first.model == "a"
    assert switcher.status().models["a"].in_flight == 2
    first.release()
    first.release()  # a second release is harmless
    assert switcher.status().models["a"].in_flight == 1
    with second:
        pass
    async with await switcher.acquire("a"):
        assert switcher.status().models["a"].in_flight == 1
    assert switcher.status().models["a"].in_flight == 0


@virtual
async def test_cold_start_then_switches_a_b_a():
    switcher, backends, events = await rig(start_delay=3, wake_delay=2, sleep_delay=1)
    loop = asyncio.get_running_loop()
    (await switcher.acquire("a")).release()
    assert switcher.status().state == "active:a" and loop.time() == 3
    (await switcher.acquire("b")).release()
    assert switcher.status().state == "active:b"
    (await switcher.acquire("a")).release()
    assert switcher.status().state == "active:a"
    assert backends.calls == [
        ("start", "a"), ("sleep", "a", "offload+keep_running"), ("start", "b"),
        ("sleep", "b", "offload+keep_running"), ("wake", "a"),
    ]
    last = finished(events)[-1]
    assert (last.from_model, last.to_model, last.ok) == ("b", "a", True)
    assert last.phases["sleep"] == 1 and last.phases["wake"] == 2
    assert backends.violations == []


@virtual
async def test_same_model_takes_the_fast_path():
    switcher, backends, events = await rig()
    (await switcher.acquire("a")).release()
    calls, n_events = list(backends.calls), len(events)
    for _ in range(100):
        (await switcher.acquire("a")).release()
    assert backends.calls == calls and len(events) == n_events


@virtual
async def test_cooldown_keeps_the_old_model_for_min_active():
    switcher, _, events = await rig(policy={"min_active": 2})
    loop = asyncio.get_running_loop()
    (await switcher.acquire("a")).release()
    t0 = loop.time()
    (await switcher.acquire("b")).release()
    assert loop.time() - t0 >= 2
    assert finished(events)[-1].phases["cooldown"] == 2


@virtual
async def test_old_model_serves_during_cooldown():
    switcher, _, _ = await rig(policy={"min_active": 5})
    (await switcher.acquire("a")).release()
    want_b = asyncio.ensure_future(switcher.acquire("b"))
    await asyncio.sleep(1)
    assert switcher.status().state == "switching:a->b"
    lease = await switcher.acquire("a")  # still active: served at once
    lease.release()
    (await want_b).release()


@virtual
async def test_drain_waits_for_leases_and_refuses_new_ones():
    switcher, _, _ = await rig()
    held = [await switcher.acquire("a"), await switcher.acquire("a")]
    want_b = asyncio.ensure_future(switcher.acquire("b"))
    await until_state(switcher, "a", "draining")
    assert switcher.status().state == "switching:a->b"
    with pytest.raises(SwitchTimeout):
        await switcher.acquire("a", timeout=1)  # queued, not served while draining
    assert not want_b.done()
    for lease in held:
        lease.release()
    (await want_b).release()
    assert switcher.status().state == "active:b"
    assert switcher.status().models["a"].in_flight == 0


@virtual
async def test_drain_timeout_sleeps_anyway_and_says_so():
    switcher, backends, events = await rig(policy={"drain_timeout": 3})
    loop = asyncio.get_running_loop()
    lease = await switcher.acquire("a")
    t0 = loop.time()
    (await switcher.acquire("b")).release()
    assert loop.time() - t0 == 3
    last = finished(events)[-1]
    assert last.ok and last.drain_timed_out and last.phases["drain"] == 3
    lease.release()  # late release of the evicted model is harmless
    assert switcher.status().models["a"].in_flight == 0
    assert backends.violations == []


@virtual
async def test_no_drain_when_drain_before_switch_is_off():
    switcher, _, events = await rig(policy={"drain_before_switch": False})
    lease = await switcher.acquire("a")
    (await switcher.acquire("b")).release()
    assert finished(events)[-1].phases["drain"] == 0
    lease.release()


# ---------------------------------------------------------------------------- failures


@virtual
async def test_failed_sleep_escalates_to_stop_and_the_switch_goes_on():
    switcher, backends, _ = await rig()
    (await switcher.acquire("a")).release()
    backends.fail("sleep", "a", "vLLM answered 500")
    (await switcher.acquire("b")).release()
    assert switcher.status().state == "active:b"
    assert backends.states["a"] is BackendState.STOPPED
    assert "sleep (offload+keep_running) failed: vLLM answered 500; stopped instead" in (
        switcher.status().models["a"].last_error or ""
    )
    (await switcher.acquire("a")).release()  # cold start again
    assert backends.count("start", "a") == 2
    assert backends.violations == []


@virtual
async def test_failed_wake_stops_target_backs_off_then_recovers():
    switcher, backends, events = await rig(policy={"failure_backoff": 2})
    (await switcher.acquire("a")).release()
    backends.fail("start", "b", "CUDA out of memory")
    with pytest.raises(SwitchFailed) as info:
        await switcher.acquire("b")
    assert str(info.value) == "model 'b' failed to start: CUDA out of memory"
    assert info.value.http_status == 502 and info.value.retry_after >= 1
    status = switcher.status()
    assert status.state == "idle"
    assert status.models["b"].state == "failed" and status.models["b"].last_error == "start: CUDA out of memory"
    assert backends.states["b"] is BackendState.STOPPED  # the half-woken target is stopped
    assert not finished(events)[-1].ok
    (await switcher.acquire("a")).release()  # recovery, after the backoff
    assert finished(events)[-1].phases["backoff"] == 2
    assert switcher.status().state == "active:a"
    (await switcher.acquire("b")).release()  # and b works once healed
    assert switcher.status().models["b"].last_error is None


@virtual
async def test_wake_that_never_finishes_times_out_and_fails_waiters():
    switcher, backends, _ = await rig(policy={"wake_timeout": 30})
    (await switcher.acquire("a")).release()
    backends.hold("wake", "a")  # a is sleeping after the next switch, so its wake is warm
    (await switcher.acquire("b")).release()
    with pytest.raises(SwitchFailed) as info:
        await switcher.acquire("a")
    assert "not ready within 30s" in str(info.value)
    assert backends.states["a"] is BackendState.STOPPED


@virtual
async def test_request_timeout_bounds_the_triggering_request_but_not_the_switch():
    switcher, backends, _ = await rig(policy={"request_timeout": 5})
    loop = asyncio.get_running_loop()
    gate = backends.hold("start", "a")
    with pytest.raises(SwitchTimeout) as info:
        await switcher.acquire("a")
    assert loop.time() == 5 and info.value.http_status == 504 and info.value.retry_after >= 1
    assert switcher.status().models["a"].queue_depth == 0  # it left the queue at once
    gate.set()
    await until_state(switcher, "a", "active")  # the switch itself went on


@virtual
async def test_cancelled_waiter_never_cancels_the_switch():
    switcher, backends, _ = await rig()
    gate, waiter = await acquire_held_in_start(switcher, backends)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set()
    await until_state(switcher, "a", "active")
    assert switcher.status().models["a"].in_flight == 0


@virtual
async def test_queued_switch_whose_waiters_left_is_skipped():
    switcher, backends, events = await rig(("a", "b", "c"))
    gate = backends.hold("start", "b")
    want_b = asyncio.ensure_future(switcher.acquire("b"))
    await backends.entered("start", "b").wait()
    with pytest.raises(SwitchTimeout):
        await switcher.acquire("c", timeout=1)  # queued behind b, gives up
    gate.set()
    (await want_b).release()
    await asyncio.sleep(1)
    assert backends.count("start", "c") == 0
    assert [e.to_model for e in events if isinstance(e, SwitchStarted)] == ["b"]


@virtual
async def test_deferred_switch_is_dropped_when_its_waiters_left():
    """cost_aware re-evaluates demand when a deferral ends instead of switching blindly."""
    switcher, backends, _ = await rig(policy={"type": "cost_aware", "max_wait": 100})
    (await switcher.acquire("a")).release()
    with pytest.raises(SwitchTimeout):
        await switcher.acquire("b", timeout=1)  # inside a's serving window (10 s): deferred
    await asyncio.sleep(30)
    assert backends.count("start", "b") == 0 and switcher.status().state == "active:a"


@virtual
async def test_queue_full_is_refused_with_retry_after():
    switcher, backends, _ = await rig(policy={"queue_limit": 2})
    backends.hold("start", "a")
    waiters = [asyncio.ensure_future(switcher.acquire("a")) for _ in range(2)]
    await backends.entered("start", "a").wait()
    with pytest.raises(QueueFull) as info:
        await switcher.acquire("a")
    assert info.value.http_status == 429 and info.value.retry_after >= 1
    assert str(info.value) == "model 'a' has 2 requests queued already; retry later"
    for w in waiters:
        w.cancel()


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
@virtual
async def test_no_time_to_wait_is_a_timeout_without_a_switch(timeout):
    switcher, backends, events = await rig()
    with pytest.raises(SwitchTimeout):
        await switcher.acquire("a", timeout=timeout)
    assert backends.calls == [] and events == []
    await switcher.switch("a")
    (await switcher.acquire("a", timeout=timeout)).release()  # awake: served without waiting


@virtual
async def test_backend_that_dies_is_restarted_by_the_next_request():
    switcher, backends, _ = await rig()
    (await switcher.acquire("a")).release()
    backends.kill("a", "Xid 79")
    status = switcher.status()
    assert status.state == "idle" and status.models["a"].state == "failed"
    assert status.models["a"].last_error == "backend exited unexpectedly: Xid 79"
    (await switcher.acquire("a")).release()
    assert backends.count("start", "a") == 2 and switcher.status().state == "active:a"


@virtual
async def test_backend_dying_while_draining_ends_the_drain():
    switcher, backends, _ = await rig()
    lease = await switcher.acquire("a")
    want_b = asyncio.ensure_future(switcher.acquire("b"))
    await until_state(switcher, "a", "draining")
    backends.kill("a")
    (await want_b).release()
    lease.release()
    assert switcher.status().state == "active:b" and backends.violations == []


# ---------------------------------------------------------------------------- modes and control


@virtual
async def test_pin_serves_only_the_pinned_model_until_unpinned():
    switcher, _, events = await rig()
    await switcher.pin("a")
    status = switcher.status()
    assert (status.mode, status.pinned, status.state) == ("manual", "a", "active:a")
    (await switcher.acquire("a")).release()
    with pytest.raises(ModelPinned) as info:
        await switcher.acquire("b")
    assert info.value.http_status == 503
    assert str(info.value) == "llmux is in manual mode, pinned to 'a'; 'b' is not served until unpinned"
    with pytest.raises(ModelPinned):
        await switcher.switch("b")
    await switcher.unpin()
    assert switcher.status().mode == "auto"
    (await switcher.acquire("b")).release()
    assert [e for e in events if isinstance(e, ModeChanged)] == [ModeChanged("manual", "a"), ModeChanged("auto", None)]


@virtual
async def test_manual_without_pin_serves_the_active_model():
    switcher, _, _ = await rig()
    await switcher.switch("a")
    await switcher.set_mode("manual")
    (await switcher.acquire("a")).release()
    with pytest.raises(ModelPinned) as info:
        await switcher.acquire("b")
    assert "the active model" in str(info.value)
    await switcher.switch("b")  # manual mode is operated by explicit switches
    assert switcher.status().state == "active:b"
    await switcher.set_mode("AUTO")
    assert switcher.status().mode == "auto"


@pytest.mark.parametrize("mode", ["invalid", "", None, 3])
@virtual
async def test_set_mode_rejects_nonsense(mode):
    switcher, _, _ = await rig()
    with pytest.raises(InvalidMode) as info:
        await switcher.set_mode(mode)
    assert "allowed: auto, manual" in str(info.value) and info.value.http_status == 400
    assert switcher.status().mode == "auto"


@virtual
async def test_pin_rolls_back_the_mode_when_its_switch_fails():
    switcher, backends, _ = await rig()
    backends.fail("start", "b")
    with pytest.raises(SwitchFailed):
        await switcher.pin("b")
    assert (switcher.status().mode, switcher.status().pinned) == ("auto", None)


@virtual
async def test_pinned_model_that_died_is_restarted_by_its_next_request():
    switcher, backends, _ = await rig()
    await switcher.pin("a")
    backends.kill("a")
    (await switcher.acquire("a")).release()
    assert switcher.status().state == "active:a"


@virtual
async def test_force_switch_to_the_active_model_is_a_noop():
    switcher, backends, events = await rig()
    await switcher.switch("a")
    calls, n_events = list(backends.calls), len(events)
    await switcher.switch("a")
    await switcher.wake_model("a")
    assert backends.calls == calls and len(events) == n_events


@virtual
async def test_switch_without_waiting_and_with_a_timeout():
    switcher, backends, _ = await rig()
    gate = backends.hold("start", "a")
    await switcher.switch("a", wait=False)
    with pytest.raises(SwitchTimeout):
        await switcher.switch("a", timeout=2)
    gate.set()
    await until_state(switcher, "a", "active")


@virtual
async def test_control_switch_failure_is_reported():
    switcher, backends, _ = await rig()
    backends.fail("start", "a", "bad weights")
    with pytest.raises(SwitchFailed) as info:
        await switcher.switch("a")
    assert info.value.phase == "start" and info.value.reason == "bad weights"


@virtual
async def test_sleep_model_drains_then_sleeps_with_the_given_eviction():
    switcher, backends, events = await rig()
    lease = await switcher.acquire("a")
    sleeping = asyncio.ensure_future(switcher.sleep_model("a", "discard+keep_running"))
    await until_state(switcher, "a", "draining")
    assert not sleeping.done()
    lease.release()
    await sleeping
    assert backends.calls[-1] == ("sleep", "a", "discard+keep_running")
    assert switcher.status().state == "idle"
    assert finished(events)[-1].to_model is None
    await switcher.sleep_model("a")  # asleep already: nothing to do
    await switcher.wake_model("a")
    assert switcher.status().state == "active:a"


@virtual
async def test_eviction_override_is_validated_and_used():
    switcher, backends, _ = await rig()
    with pytest.raises(InvalidEviction) as info:
        switcher.set_eviction("a", "offload+sideways")
    assert "unknown process strategy 'sideways'" in str(info.value) and info.value.http_status == 400
    switcher.set_eviction("a", "retain+keep_running")  # llmux 0.7's no-op: allowed, as 0.7 allowed it
    with pytest.raises(InvalidEviction):
        await switcher.sleep_model("a", "nonsense")
    switcher.set_eviction("a", "retain+cuda_suspend")
    assert switcher.eviction_for("a") == Eviction.parse("retain+cuda_suspend")
    assert switcher.status().models["a"].eviction == "retain+cuda_suspend"
    (await switcher.acquire("a")).release()
    (await switcher.acquire("b")).release()
    assert ("sleep", "a", "retain+cuda_suspend") in backends.calls
    switcher.set_eviction("a", None)
    assert str(switcher.eviction_for("a")) == "offload+keep_running"


# ---------------------------------------------------------------------------- events, estimates


@virtual
async def test_events_in_order_and_a_raising_listener_is_ignored():
    switcher, _, events = await rig()

    def broken(event: Any) -> None:
        raise RuntimeError("observer bug")

    switcher.subscribe(broken)
    seen: List[Any] = []
    unsubscribe = switcher.subscribe(seen.append)
    (await switcher.acquire("a")).release()
    unsubscribe()
    (await switcher.acquire("b")).release()
    assert seen == [
        SwitchStarted("default", None, "a"),
        ModelStateChanged("a", "waking"),
        ModelStateChanged("a", "active"),
        finished(events)[0],
    ]
    assert len(finished(events)) == 2


@virtual
async def test_wait_estimate_and_learned_costs():
    switcher, backends, _ = await rig(start_delay=4, wake_delay=4, sleep_delay=2)
    assert switcher.wait_estimate("a") == 10  # nothing learned yet: the 10 s default
    (await switcher.acquire("a")).release()
    assert switcher.wait_estimate("a") == 0
    (await switcher.acquire("b")).release()
    assert switcher.switch_costs == {"→a": 4.0, "a→b": 6.0}
    (await switcher.acquire("a")).release()
    assert switcher.wait_estimate("b") == pytest.approx(6.0)  # a→b learned
    switcher.load_costs({"a→b": 1.5, "bad": 3, "b→a": "x", "a→c": -1})
    assert switcher.wait_estimate("b") == 1.5
    assert "bad" not in switcher.switch_costs


@virtual
async def test_close_answers_waiters_with_shutting_down():
    switcher, backends, _ = await rig()
    _, waiter = await acquire_held_in_start(switcher, backends)
    await switcher.close()
    with pytest.raises(ShuttingDown):
        await waiter
    with pytest.raises(ShuttingDown):
        await switcher.acquire("b")


@virtual
async def test_start_adopts_awake_backends():
    config = make_config(("a", "b"), policy={"min_active": 0})
    backends = FakeBackends(config)
    backends.states["b"] = BackendState.READY
    backends.on_gpu.add("b")
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    await switcher.start()
    assert switcher.status().state == "active:b"
    (await switcher.acquire("b")).release()
    assert backends.calls == []


# ---------------------------------------------------------------------------- reload


@virtual
async def test_reload_adds_removes_and_keeps_state():
    switcher, backends, _ = await rig(("a", "b"))
    (await switcher.acquire("a")).release()
    switcher.set_eviction("a", "discard+keep_running")
    lease = await switcher.acquire("a")
    new = make_config(("b", "c"), policy={"min_active": 0})
    backends.add_model("c")
    reload = asyncio.ensure_future(switcher.reload(new))
    await until_state(switcher, "a", "draining")
    with pytest.raises(UnknownModel) as info:
        await switcher.acquire("a")
    assert "known models: b, c" in str(info.value)
    lease.release()
    await reload
    assert backends.states["a"] is BackendState.STOPPED
    assert set(switcher.status().models) == {"b", "c"}
    (await switcher.acquire("c")).release()
    assert switcher.status().state == "active:c"


@virtual
async def test_reload_keeps_the_active_model_and_overrides():
    switcher, backends, _ = await rig(("a", "b"))
    (await switcher.acquire("a")).release()
    switcher.set_eviction("b", "discard+keep_running")
    await switcher.reload(make_config(("a", "b"), policy={"type": "time_slice", "min_active": 0}))
    status = switcher.status()
    assert status.state == "active:a" and status.policy == "time_slice"
    assert status.models["b"].eviction == "discard+keep_running"
    assert backends.count("stop") == 0


# ---------------------------------------------------------------------------- groups and budgets


@virtual
async def test_groups_switch_independently_and_in_parallel():
    switcher, backends, _ = await rig(
        {"a": {}, "b": {}, "c": {"gpu_group": "g2"}, "d": {"gpu_group": "g2"}}, groups={"g2": {}}
    )
    gate, want_a = await acquire_held_in_start(switcher, backends)
    (await switcher.acquire("c")).release()  # g2 is not held up by g1's slow start
    (await switcher.acquire("d")).release()
    assert not want_a.done()
    gate.set()
    (await want_a).release()
    status = switcher.status()
    assert status.active_models == ("a", "d")
    assert status.groups["g2"].state == "active:d"
    assert backends.violations == [] and backends.peak_awake == {"default": 1, "g2": 1}


@virtual
async def test_budget_keeps_models_that_fit_awake_together():
    models = {m: {"gpu_group": "big", "gpu_memory_gib": gib} for m, gib in (("a", 10), ("b", 10), ("c", 15))}
    switcher, backends, _ = await rig(models, groups={"big": {"budget_gib": 30}})
    (await switcher.acquire("a")).release()
    (await switcher.acquire("b")).release()
    assert switcher.status().active_models == ("a", "b") and backends.count("sleep") == 0
    await asyncio.sleep(1)
    (await switcher.acquire("a")).release()  # b is now the least recently used
    (await switcher.acquire("c")).release()
    assert backends.calls[-2:] == [("sleep", "b", "offload+keep_running"), ("start", "c")]
    assert switcher.status().active_models == ("a", "c")
    assert backends.violations == []


@virtual
async def test_budget_evicts_idle_models_before_busy_ones():
    models = {m: {"gpu_group": "big", "gpu_memory_gib": 10} for m in ("a", "b", "c")}
    switcher, backends, _ = await rig(models, groups={"big": {"budget_gib": 20}})
    busy = await switcher.acquire("a")
    await asyncio.sleep(1)
    (await switcher.acquire("b")).release()  # b used later, but idle
    (await switcher.acquire("c")).release()
    assert ("sleep", "b", "offload+keep_running") in backends.calls
    assert switcher.status().active_models == ("a", "c")
    busy.release()


@virtual
async def test_retain_keep_running_is_allowed_in_a_shared_budget():
    models = {m: {"gpu_group": "big", "gpu_memory_gib": 10} for m in ("a", "b")}
    switcher, _, _ = await rig(models, groups={"big": {"budget_gib": 20}})
    switcher.set_eviction("a", "retain+keep_running")
    assert switcher.status().models["a"].eviction == "retain+keep_running"


@virtual
async def test_waiter_cancelled_after_its_lease_was_granted_gives_it_back():
    switcher, backends, _ = await rig()
    gate, waiter = await acquire_held_in_start(switcher, backends)
    gate.set()
    await until_state(switcher, "a", "active")  # granted in the same step; waiter not yet resumed
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert switcher.status().models["a"].in_flight == 0


@virtual
async def test_acquire_before_start_works_and_start_still_adopts():
    switcher, backends, _ = await rig(start=False)
    backends.states["b"] = BackendState.READY
    backends.on_gpu.add("b")
    await switcher.start()
    (await switcher.acquire("b")).release()
    assert backends.calls == []
    switcher2, backends2, _ = await rig(start=False)
    (await switcher2.acquire("a")).release()  # workers start on demand
    await switcher2.start()
    assert switcher2.status().state == "active:a"


EDGE_POLICIES = [
    {"type": "time_slice", "tick_interval": 0, "min_quantum": 0, "max_wait": 0},
    {"type": "cost_aware", "coalesce_window": 0, "amortization_factor": 0, "max_wait": 0},
    {"type": "fifo", "min_active": -5, "failure_backoff": -1, "drain_timeout": -1},
    {"type": "cost_aware", "coalesce_window": 1e9, "max_wait": 1e9, "min_active": 1e9, "request_timeout": 10},
]


@pytest.mark.parametrize("overrides", EDGE_POLICIES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@virtual
async def test_edge_policy_values_do_not_crash(overrides):
    """The loader rejects most of these; the switcher must still never hang or crash on them."""
    from types import SimpleNamespace

    base = make_config(("a", "b"))
    policy = SimpleNamespace(**{**base.policy.dict(), **overrides})
    config = SimpleNamespace(models=base.models, groups=base.groups, policy=policy)
    backends = FakeBackends(base, wake_delay=1)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    await switcher.start()
    for model in ("a", "b", "a"):
        try:
            (await switcher.acquire(model)).release()
        except SwitchTimeout:
            pass  # a huge min_active legitimately outlasts request_timeout
    assert backends.violations == []
    await switcher.close()


@virtual
async def test_zero_queue_limit_refuses_waiting_but_serves_the_awake_model():
    base = make_config(("a", "b"), policy={"min_active": 0})
    from types import SimpleNamespace

    config = SimpleNamespace(models=base.models, groups=base.groups,
                             policy=SimpleNamespace(**{**base.policy.dict(), "queue_limit": 0}))
    switcher = Switcher(config, FakeBackends(base), clock=asyncio.get_running_loop().time)
    with pytest.raises(QueueFull):
        await switcher.acquire("a")
    await switcher.switch("a")
    (await switcher.acquire("a")).release()


@virtual
async def test_targets_whose_deferrals_end_together_go_oldest_first():
    """cost_aware defers b and then c to the end of a's serving window. When c's timer
    fires first (its estimate is 1 ms cheaper: float noise does as much), the older
    demand, b, still switches first: a deferral that ends asks again about everyone
    waiting, oldest first."""
    switcher, backends, events = await rig(("a", "b", "c"), policy={"type": "cost_aware", "max_wait": 100})
    switcher.load_costs({"a→b": 10.0, "a→c": 9.999})
    (await switcher.acquire("a")).release()
    b = asyncio.ensure_future(switcher.acquire("b"))
    await asyncio.sleep(1)
    c = asyncio.ensure_future(switcher.acquire("c"))
    (await b).release()
    (await c).release()
    assert [e.to_model for e in events if isinstance(e, SwitchStarted)] == ["a", "b", "c"]
