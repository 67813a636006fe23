"""Habits from llama-swap and Ollama in the switcher (issue 25): max_concurrency,
idle_timeout and preload, on a virtual clock with FakeBackends.

Each behaviour has its negative control beside it (no limit, no timeout, a
busy model), so a test cannot pass by measuring nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional, Tuple

import pytest
from fakes import FakeBackends, virtual

from llmuxd.config import Config
from llmuxd.errors import SwitchTimeout
from llmuxd.events import ModelIdle, PreloadProgress
from llmuxd.switcher import Switcher


async def rig(models: dict, *, policy: Optional[dict] = None, groups: Optional[dict] = None,
              preload: Optional[list] = None, start: bool = True) -> Tuple[Switcher, FakeBackends, List[Any]]:
    config = Config.from_dict({
        "models": {name: {"model_path": f"/models/{name}", **extra} for name, extra in models.items()},
        "policy": {"min_active": 0, **(policy or {})},
        "groups": groups or {},
        "preload": preload or [],
    })
    backends = FakeBackends(config)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    events: List[Any] = []
    switcher.subscribe(events.append)
    if start:
        await switcher.start()
    return switcher, backends, events


async def pause(seconds: float) -> None:
    await asyncio.sleep(seconds)


# ---------------------------------------------------------------------------- max_concurrency


@pytest.mark.parametrize("limit,granted_at_once", [(2, 2), (None, 3)], ids=["limit-2", "no-limit"])
@virtual
async def test_max_concurrency_holds_the_rest_in_the_queue(limit, granted_at_once):
    switcher, _, _ = await rig({"a": {} if limit is None else {"max_concurrency": limit}})
    tasks = [asyncio.ensure_future(switcher.acquire("a")) for _ in range(3)]
    await pause(1)
    done = [t for t in tasks if t.done()]
    assert len(done) == granted_at_once
    st = switcher.status().models["a"]
    assert (st.in_flight, st.queue_depth) == (granted_at_once, 3 - granted_at_once)
    if limit is not None:
        done[0].result().release()  # a slot comes back: the queued request takes it
        await pause(0)
        assert all(t.done() for t in tasks) and switcher.status().models["a"].in_flight == 2
    for t in tasks:
        if t.done():
            t.result().release()
    assert switcher.status().models["a"].in_flight == 0


@virtual
async def test_a_request_waiting_for_a_slot_times_out_like_any_queued_request():
    switcher, _, _ = await rig({"a": {"max_concurrency": 1}}, policy={"request_timeout": 30})
    lease = await switcher.acquire("a")
    started = asyncio.get_running_loop().time()
    with pytest.raises(SwitchTimeout) as info:
        await switcher.acquire("a")
    assert asyncio.get_running_loop().time() - started == pytest.approx(30)
    assert info.value.http_status == 504 and info.value.retry_after >= 1
    assert switcher.status().models["a"].queue_depth == 0
    lease.release()
    assert (await switcher.acquire("a")).model == "a"  # the slot is free again


@virtual
async def test_max_concurrency_keeps_arrival_order():
    switcher, _, _ = await rig({"a": {"max_concurrency": 1}})
    first = await switcher.acquire("a")
    queued = asyncio.ensure_future(switcher.acquire("a"))
    await pause(0)
    later = asyncio.ensure_future(switcher.acquire("a"))  # must not overtake the queued one
    await pause(0)
    assert not queued.done() and not later.done()
    first.release()
    await pause(0)
    assert queued.done() and not later.done()


# ---------------------------------------------------------------------------- idle_timeout


@pytest.mark.parametrize("settings,policy,evicted_after", [
    ({"idle_timeout": 30}, {}, 30),
    ({}, {"idle_timeout": 20}, 20),                     # the policy default
    ({"idle_timeout": 0}, {"idle_timeout": 20}, None),  # 0: never, over the default
    ({}, {}, None),                                     # nothing set: never
    ({"idle_timeout": 10}, {"min_active": 60}, 60),     # awake at least min_active
], ids=["own", "policy-default", "zero-never", "unset-never", "min-active-first"])
@virtual
async def test_an_idle_model_is_evicted_with_its_own_eviction(settings, policy, evicted_after):
    switcher, backends, events = await rig({"a": {"eviction": "discard+freeze", **settings}}, policy=policy)
    (await switcher.acquire("a")).release()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if evicted_after is None:
        await pause(3600)
        assert switcher.status().models["a"].state == "active"
        assert switcher.status().models["a"].idle_left_s is None
        assert backends.count("sleep") == 0
        return
    await pause(evicted_after - 1)
    st = switcher.status().models["a"]
    assert st.state == "active" and st.idle_left_s == pytest.approx(1, abs=0.01)
    await pause(2)
    assert switcher.status().models["a"].state == "asleep"
    assert ("sleep", "a", "discard+freeze") in backends.calls
    idle = [e for e in events if isinstance(e, ModelIdle)]
    assert len(idle) == 1 and idle[0].model == "a" and idle[0].eviction == "discard+freeze"
    assert idle[0].idle_for == pytest.approx(evicted_after, abs=1.01) and loop.time() - t0 < evicted_after + 2


@virtual
async def test_idle_timeout_has_no_effect_while_a_request_is_in_flight_or_queued():
    switcher, backends, _ = await rig({"a": {"idle_timeout": 10, "max_concurrency": 1}})
    lease = await switcher.acquire("a")
    queued = asyncio.ensure_future(switcher.acquire("a", timeout=1000))
    await pause(100)
    st = switcher.status().models["a"]
    assert (st.state, st.in_flight, st.queue_depth, st.idle_left_s) == ("active", 1, 1, None)
    lease.release()
    await pause(0)
    (await queued).release()  # the last request ends now: the countdown starts from here
    await pause(9)
    assert switcher.status().models["a"].state == "active"
    await pause(2)
    assert switcher.status().models["a"].state == "asleep" and backends.count("sleep", "a") == 1


@virtual
async def test_the_pinned_model_is_not_evicted_for_being_idle():
    switcher, backends, _ = await rig({"a": {"idle_timeout": 10}, "b": {}})
    await switcher.pin("a")
    await pause(100)
    assert switcher.status().models["a"].state == "active" and backends.count("sleep") == 0
    await switcher.unpin()
    await pause(11)
    assert switcher.status().models["a"].state == "asleep"


@virtual
async def test_a_reload_that_sets_idle_timeout_starts_counting():
    switcher, _, _ = await rig({"a": {}})
    (await switcher.acquire("a")).release()
    await pause(50)
    assert switcher.status().models["a"].state == "active"
    new = Config.from_dict({"models": {"a": {"model_path": "/models/a", "idle_timeout": 5}},
                            "policy": {"min_active": 0}})
    await switcher.reload(new)
    await pause(2)
    assert switcher.status().models["a"].state == "asleep"  # idle for 52s already


# ---------------------------------------------------------------------------- preload


@virtual
async def test_preload_wakes_the_listed_models_in_order_within_the_budget():
    switcher, backends, events = await rig(
        {"a": {"gpu_group": "g", "gpu_memory_gib": 10}, "b": {"gpu_group": "g", "gpu_memory_gib": 10}, "c": {}},
        groups={"g": {"budget_gib": 20}}, preload=["b", "a"])
    await pause(1)
    assert switcher.status().preload == {"b": "awake", "a": "awake"}
    assert [c for c in backends.calls if c[0] == "start"] == [("start", "b"), ("start", "a")]
    assert set(switcher.status().active_models) == {"a", "b"}
    progress = [(e.model, e.progress) for e in events if isinstance(e, PreloadProgress)]
    assert progress == [("b", "starting"), ("b", "awake"), ("a", "starting"), ("a", "awake")]


@virtual
async def test_preload_in_a_one_model_group_leaves_the_last_awake_and_the_others_warm():
    switcher, backends, _ = await rig({"a": {}, "b": {}}, preload=["a", "b"])
    await pause(1)
    assert switcher.status().preload == {"a": "asleep", "b": "awake"}
    assert switcher.status().active_models == ("b",)
    assert ("sleep", "a", "offload+keep_running") in backends.calls  # started, then asleep with its eviction


@virtual
async def test_a_preload_failure_is_reported_and_the_next_model_still_loads():
    switcher, backends, _ = await rig({"a": {}, "b": {}}, preload=["a", "b"], start=False)
    backends.fail("start", "a", "no such weights")
    await switcher.start()
    await pause(5)
    progress = switcher.status().preload
    assert progress["a"].startswith("failed: ") and "no such weights" in progress["a"]
    assert progress["b"] == "awake"
    assert (await switcher.acquire("b")).model == "b"  # the switcher is healthy


@virtual
async def test_preload_runs_again_after_a_reload():
    switcher, backends, _ = await rig({"a": {}, "b": {}}, preload=["a"])
    await pause(1)
    await switcher.switch("b")
    assert switcher.status().preload == {"a": "asleep"}
    new = Config.from_dict({"models": {"a": {"model_path": "/models/a"}, "b": {"model_path": "/models/b"}},
                            "policy": {"min_active": 0}, "preload": ["a"]})
    await switcher.reload(new)
    await pause(1)
    assert switcher.status().preload == {"a": "awake"} and switcher.status().active_models == ("a",)
