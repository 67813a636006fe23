"""Policies as pure decisions (table-driven), then each one driving the real switcher."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from fakes import FakeBackends, make_config, virtual

from llmuxd.events import SwitchStarted
from llmuxd.policies import (
    NOW,
    SKIP,
    CostAwarePolicy,
    Decision,
    FifoPolicy,
    PolicyContext,
    SwitchCosts,
    TimeSlicePolicy,
    make_policy,
)
from llmuxd.policies.base import AwakeModel, TickContext, WaitingModel
from llmuxd.switcher import Switcher


def ctx(**kw) -> PolicyContext:
    base = dict(
        now=100.0, target="b", target_queue_depth=1, oldest_wait=0.0, active="a", active_duration=60.0,
        active_in_flight=0, active_queue_depth=0, switch_cost=10.0,
    )
    base.update(kw)
    return PolicyContext(**base)


# ---------------------------------------------------------------------------- fifo


@pytest.mark.parametrize("kw", [{}, {"active": None}, {"active_in_flight": 5}, {"active_duration": 0}])
def test_fifo_always_switches_now(kw):
    assert FifoPolicy().decide(ctx(**kw)) == NOW


@pytest.mark.parametrize("drain", [True, False])
def test_fifo_drains_as_configured(drain):
    assert FifoPolicy(drain_before_switch=drain).drain_before_switch is drain


# ---------------------------------------------------------------------------- cost_aware

COST_AWARE_CASES = [
    # (what, context overrides, expected decision)
    ("cold start", {"active": None}, NOW),
    ("nobody waits", {"target_queue_depth": 0}, SKIP),
    ("inside the serving window", {"active_duration": 4.0}, Decision.defer(6.0)),
    ("window, capped by staleness", {"active_duration": 0.0, "oldest_wait": 12.0}, Decision.defer(3.0)),
    ("stale beats the window", {"active_duration": 0.0, "oldest_wait": 15.0}, NOW),
    ("deep enough queue", {"target_queue_depth": 5}, NOW),
    ("shallow queue: coalesce", {"target_queue_depth": 4, "oldest_wait": 0.5}, Decision.defer(1.5)),
    ("coalescing window over", {"target_queue_depth": 1, "oldest_wait": 2.0}, NOW),
]


@pytest.mark.parametrize("what,kw,expected", COST_AWARE_CASES, ids=[c[0] for c in COST_AWARE_CASES])
def test_cost_aware_decisions(what, kw, expected):
    policy = CostAwarePolicy(SwitchCosts(), coalesce_window=2.0, amortization_factor=0.5, max_wait=15.0)
    assert policy.decide(ctx(**kw)) == expected


@pytest.mark.parametrize(
    "factor,cost,threshold", [(0.5, 10.0, 5), (0.5, 0.1, 1), (0.5, 3.0, 2), (0.0, 10.0, 1), (2.0, 10.0, 20)]
)
def test_cost_aware_threshold_is_max_1_ceil_factor_cost(factor, cost, threshold):
    assert CostAwarePolicy(SwitchCosts(), amortization_factor=factor).threshold(cost) == threshold


@pytest.mark.parametrize("kw", [{"active_duration": 0.0}, {"active_duration": 4.0}, {"active_duration": 60.0, "oldest_wait": 0.5}])
def test_cost_aware_zero_amortization_switches_now(kw):
    """llmux 0.7 documented amortization_factor 0.0 as "always switch immediately"."""
    assert CostAwarePolicy(SwitchCosts(), amortization_factor=0).decide(ctx(**kw)) == NOW
    assert CostAwarePolicy(SwitchCosts(), amortization_factor=0).decide(ctx(target_queue_depth=0, **kw)) == SKIP


def test_cost_aware_zero_parameters_never_busy_loop():
    policy = CostAwarePolicy(SwitchCosts(), coalesce_window=0, amortization_factor=0, max_wait=0)
    assert policy.decide(ctx(active_duration=0.0)) == NOW  # max_wait 0: everything is stale
    decision = CostAwarePolicy(SwitchCosts(), max_wait=15).decide(ctx(active_duration=10.0 - 1e-12))
    assert decision.kind == "defer" and decision.delay > 0


# ---------------------------------------------------------------------------- time_slice


@pytest.mark.parametrize(
    "kw,expected",
    [({"active": None}, NOW), ({"oldest_wait": 15.0}, NOW), ({}, SKIP), ({"active_in_flight": 0}, SKIP)],
)
def test_time_slice_never_preempts_reactively(kw, expected):
    assert TimeSlicePolicy(max_wait=15).decide(ctx(**kw)) == expected


def tick(awake=(), waiting=()) -> TickContext:
    return TickContext(now=0.0, awake=tuple(AwakeModel(*a) for a in awake), waiting=tuple(WaitingModel(*w) for w in waiting))


TICK_CASES = [
    ("nobody waits", tick([("a", 9, 0, 0)], []), None),
    ("active busy in flight", tick([("a", 9, 1, 0)], [("b", 3, 1.0)]), None),
    ("active has a queue", tick([("a", 9, 0, 2)], [("b", 3, 1.0)]), None),
    ("quantum not yet had", tick([("a", 1, 0, 0)], [("b", 3, 1.0)]), None),
    ("idle after quantum: longest queue", tick([("a", 9, 0, 0)], [("b", 3, 1.0), ("c", 5, 0.5)]), "c"),
    ("tie: older waiter", tick([("a", 9, 0, 0)], [("b", 3, 1.0), ("c", 3, 2.0)]), "c"),
    ("tie: then name", tick([("a", 9, 0, 0)], [("c", 3, 1.0), ("b", 3, 1.0)]), "b"),
    ("nothing awake", tick([], [("b", 1, 0.0), ("c", 2, 0.0)]), "c"),
    ("stale beats busy", tick([("a", 9, 4, 4)], [("b", 9, 1.0), ("c", 1, 15.0)]), "c"),
    ("most stale first", tick([("a", 0, 4, 4)], [("b", 1, 16.0), ("c", 1, 20.0)]), "c"),
]


@pytest.mark.parametrize("what,context,expected", TICK_CASES, ids=[c[0] for c in TICK_CASES])
def test_time_slice_tick(what, context, expected):
    assert TimeSlicePolicy(min_quantum=2.0, max_wait=15.0).tick(context) == expected


def test_time_slice_zero_interval_is_clamped():
    assert TimeSlicePolicy(tick_interval=0).tick_interval == 0.01


# ---------------------------------------------------------------------------- costs, factory


def test_switch_costs_ema():
    costs = SwitchCosts()
    assert costs.estimate("a", "b") == 10.0 and costs.estimate(None, "b") == 10.0
    costs.record("a", "b", 4.0)
    assert costs.estimate("a", "b") == 4.0  # the first sample replaces the default
    costs.record("a", "b", 14.0)
    assert costs.estimate("a", "b") == pytest.approx(0.3 * 14 + 0.7 * 4)
    costs.record("b", "a", 3600.0)
    assert costs.estimate("b", "a") == 60.0  # capped
    assert costs.estimate("a", "c") == 10.0
    assert costs.as_dict() == {"a→b": pytest.approx(7.0), "b→a": 60.0}


def test_switch_costs_load_drops_bad_entries():
    costs = SwitchCosts()
    costs.load({"a→b": 2, "→b": "5.5", "ab": 3, "a→c": float("nan"), "b→c": -1, "c→a": 500})
    assert costs.as_dict() == {"a→b": 2.0, "→b": 5.5, "c→a": 60.0}


@pytest.mark.parametrize("kind,cls", [("fifo", FifoPolicy), ("cost_aware", CostAwarePolicy), ("time_slice", TimeSlicePolicy)])
def test_make_policy(kind, cls):
    config = make_config(policy={"type": kind})
    assert isinstance(make_policy(config.policy, SwitchCosts()), cls)


def test_make_policy_unknown_type():
    with pytest.raises(ValueError, match="allowed: fifo, cost_aware, time_slice"):
        make_policy(SimpleNamespace(type="lottery"), SwitchCosts())


# ---------------------------------------------------------------------------- with the switcher


async def rig(policy: dict, models=("a", "b")):
    config = make_config(models, policy=policy)
    backends = FakeBackends(config, wake_delay=1, start_delay=1)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    starts = []
    switcher.subscribe(lambda e: starts.append((asyncio.get_running_loop().time(), e.to_model))
                       if isinstance(e, SwitchStarted) else None)
    await switcher.start()
    return switcher, backends, starts


@virtual
async def test_cost_aware_waits_out_the_serving_window():
    switcher, _, starts = await rig({"type": "cost_aware", "min_active": 0, "max_wait": 100})
    (await switcher.acquire("a")).release()  # active from t=1; learned cost →a: 1 s, a→b: default 10 s
    (await switcher.acquire("b")).release()
    assert starts == [(0, "a"), (11, "b")]  # a kept the GPU for the 10 s window


@virtual
async def test_cost_aware_switches_at_once_for_a_deep_queue():
    switcher, _, starts = await rig({"type": "cost_aware", "min_active": 0, "max_wait": 100})
    (await switcher.acquire("a")).release()
    await asyncio.sleep(20)  # the window is over
    waiters = [asyncio.ensure_future(switcher.acquire("b")) for _ in range(5)]  # 5 ≥ ceil(0.5 × 10)
    for lease in await asyncio.gather(*waiters):
        lease.release()
    assert starts[-1] == (21, "b")


@virtual
async def test_time_slice_waits_for_idle_then_serves_the_longest_queue():
    switcher, _, starts = await rig(
        {"type": "time_slice", "min_active": 0, "min_quantum": 2, "tick_interval": 0.5, "max_wait": 100},
        models=("a", "b", "c"),
    )
    busy = await switcher.acquire("a")
    b = [asyncio.ensure_future(switcher.acquire("b")) for _ in range(1)]
    c = [asyncio.ensure_future(switcher.acquire("c")) for _ in range(3)]
    await asyncio.sleep(30)
    assert [m for _, m in starts] == ["a"]  # a is busy: never preempted
    busy.release()
    for lease in await asyncio.gather(*c):
        lease.release()
    assert starts[1][1] == "c"
    for lease in await asyncio.gather(*b):
        lease.release()
    assert [m for _, m in starts] == ["a", "c", "b"]


@virtual
async def test_time_slice_hands_over_the_moment_the_awake_model_goes_idle():
    """Not at the next tick (issue #26: the tick's phase added up to tick_interval to every wait)."""
    switcher, _, starts = await rig({"type": "time_slice", "min_active": 0, "min_quantum": 0,
                                     "tick_interval": 5, "max_wait": 100})
    busy = await switcher.acquire("a")
    waiter = asyncio.ensure_future(switcher.acquire("b"))
    await asyncio.sleep(7.3)
    assert [m for _, m in starts] == ["a"]
    idle_at = asyncio.get_running_loop().time()
    busy.release()
    (await waiter).release()
    assert starts[-1] == (pytest.approx(idle_at), "b")


@virtual
async def test_time_slice_scheduler_enforces_max_wait_without_new_arrivals():
    switcher, _, starts = await rig({"type": "time_slice", "min_active": 0, "max_wait": 15})
    busy = await switcher.acquire("a")
    lease = await switcher.acquire("b")  # only one arrival; a stays busy throughout
    assert 15 <= starts[-1][0] <= 16 and starts[-1][1] == "b"
    lease.release()
    busy.release()


# ------------------------------------------------ llmux 0.7's zero values, with the switcher

ZERO_CASES = [
    # (0.7 key at 0, as our key; when b serves; the same with 0.7's default; when b serves then)
    ("min_active_secs", {"type": "fifo", "min_active": 0}, 2.0, {"type": "fifo"}, 7.0),
    ("amortization_factor", {"type": "cost_aware", "min_active": 0, "amortization_factor": 0}, 2.0,
     {"type": "cost_aware", "min_active": 0}, 12.0),
    ("max_wait_secs (cost_aware)", {"type": "cost_aware", "min_active": 0, "max_wait": 0}, 2.0,
     {"type": "cost_aware", "min_active": 0}, 12.0),
    ("coalesce_window_ms", {"type": "cost_aware", "min_active": 0, "coalesce_window": 0}, 12.0,
     {"type": "cost_aware", "min_active": 0}, 14.0),
    ("max_wait_secs (time_slice)", {"type": "time_slice", "min_active": 0, "max_wait": 0}, 2.0,
     {"type": "time_slice", "min_active": 0}, 4.0),
    ("min_quantum_ms + tick_interval_ms", {"type": "time_slice", "min_active": 0, "min_quantum": 0, "tick_interval": 0},
     2.01, {"type": "time_slice", "min_active": 0}, 4.0),
]


@pytest.mark.parametrize("what,zero,at,default,default_at", ZERO_CASES, ids=[c[0] for c in ZERO_CASES])
@virtual
async def test_zero_values_mean_what_they_meant_in_07(what, zero, at, default, default_at):
    """a serves one request (awake from t=1 after a 1 s cold start), then b is
    asked for; b's wake takes 1 s. Each zero removes its wait; the same rig with
    0.7's default waits longer, so the zero is what made the difference."""
    loop = asyncio.get_running_loop()
    for policy, expected in ((zero, at), (default, default_at)):
        start = loop.time()
        switcher, _, _ = await rig(policy)
        (await switcher.acquire("a")).release()
        if what == "coalesce_window_ms":
            await asyncio.sleep(10)  # past cost_aware's serving window: only coalescing is left
        (await switcher.acquire("b")).release()
        assert loop.time() - start == pytest.approx(expected, abs=0.02), (what, policy)
        await switcher.close()
