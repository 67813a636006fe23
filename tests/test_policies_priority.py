"""Interactive before batch in every policy (issue #23), table-driven, then with the switcher.

The rules (llmuxd/policies/priority.py): a batch-only target yields to
interactive work until its oldest request has waited `max_wait`; an interactive
target takes the GPU from a model that serves only batch work. Without batch
requests every policy decides exactly as before (the contexts' batch counts
default to zero, and the old tables in test_policies.py still hold).
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List

import pytest
from fakes import FakeBackends, make_config, virtual

from llmuxd.errors import SwitchTimeout
from llmuxd.events import SwitchStarted
from llmuxd.policies import NOW, SKIP, CostAwarePolicy, Decision, FifoPolicy, SwitchCosts, TimeSlicePolicy
from llmuxd.policies.base import AwakeModel, PolicyContext, TickContext, WaitingModel
from llmuxd.priority import Priority
from llmuxd.switcher import Switcher

BATCH = Priority.BATCH

POLICIES = {
    "fifo": lambda: FifoPolicy(max_wait=15.0),
    "cost_aware": lambda: CostAwarePolicy(SwitchCosts(), coalesce_window=2.0, amortization_factor=0.5, max_wait=15.0),
    "time_slice": lambda: TimeSlicePolicy(min_quantum=2.0, max_wait=15.0),
}


def ctx(**kw: Any) -> PolicyContext:
    """b is wanted while a is awake: a has had the GPU for 60 s, b's one request is interactive."""
    base: Dict[str, Any] = dict(
        now=100.0, target="b", target_queue_depth=1, oldest_wait=0.0, active="a", active_duration=60.0,
        active_in_flight=0, active_queue_depth=0, switch_cost=10.0,
    )
    base.update(kw)
    return PolicyContext(**base)


BATCH_TARGET = {"target_queue_depth": 3, "target_batch_depth": 3}
A_SERVES_INTERACTIVE = {"active_in_flight": 2}
A_SERVES_BATCH = {"active_in_flight": 4, "active_batch_in_flight": 4}
RECHECK = Decision.defer(0.5)

DECIDE_CASES = [
    # (what, context overrides, {policy: expected})
    ("batch target, interactive in flight on a: yields",
     {**BATCH_TARGET, **A_SERVES_INTERACTIVE}, {"fifo": RECHECK, "cost_aware": RECHECK, "time_slice": SKIP}),
    ("batch target, interactive queued on a (draining): yields",
     {**BATCH_TARGET, "active_queue_depth": 1}, {"fifo": RECHECK, "cost_aware": RECHECK, "time_slice": SKIP}),
    ("batch target, interactive waiting for another model: yields",
     {**BATCH_TARGET, "others_interactive_depth": 1}, {"fifo": RECHECK, "cost_aware": RECHECK, "time_slice": SKIP}),
    ("batch target, recheck no later than staleness",
     {**BATCH_TARGET, **A_SERVES_INTERACTIVE, "oldest_wait": 14.75},
     {"fifo": Decision.defer(0.25), "cost_aware": Decision.defer(0.25), "time_slice": SKIP}),
    ("batch target stale: served like any stale request",
     {**BATCH_TARGET, **A_SERVES_INTERACTIVE, "others_interactive_depth": 5, "oldest_wait": 15.0},
     {"fifo": NOW, "cost_aware": NOW, "time_slice": NOW}),
    ("batch target, a serves only batch: the policy's own rules",
     {**BATCH_TARGET, **A_SERVES_BATCH}, {"fifo": NOW, "cost_aware": Decision.defer(2.0), "time_slice": SKIP}),
    ("batch target, a idle: the policy's own rules",
     {**BATCH_TARGET, "target_queue_depth": 5, "target_batch_depth": 5}, {"fifo": NOW, "cost_aware": NOW, "time_slice": SKIP}),
    ("one interactive among the batch: not batch-only",
     {"target_queue_depth": 3, "target_batch_depth": 2, **A_SERVES_INTERACTIVE},
     {"fifo": NOW, "cost_aware": Decision.defer(2.0), "time_slice": SKIP}),
    ("interactive target, a serves only batch: preempts, serving window or not",
     {**A_SERVES_BATCH, "active_duration": 1.0}, {"fifo": NOW, "cost_aware": NOW, "time_slice": SKIP}),
    ("interactive target, a has batch queued only: preempts",
     {"active_queue_depth": 2, "active_batch_queue_depth": 2, "active_duration": 1.0},
     {"fifo": NOW, "cost_aware": NOW, "time_slice": SKIP}),
    ("interactive target, a idle inside its window: unchanged (defer)",
     {"active_duration": 1.0}, {"fifo": NOW, "cost_aware": Decision.defer(9.0), "time_slice": SKIP}),
    ("interactive target, a serves interactive too: unchanged",
     {**A_SERVES_INTERACTIVE, "active_batch_in_flight": 1, "active_duration": 1.0},
     {"fifo": NOW, "cost_aware": Decision.defer(9.0), "time_slice": SKIP}),
]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("what,kw,expected", DECIDE_CASES, ids=[c[0] for c in DECIDE_CASES])
def test_decide_counts_interactive_before_batch(policy, what, kw, expected):
    assert POLICIES[policy]().decide(ctx(**kw)) == expected[policy]


def tick(awake=(), waiting=()) -> TickContext:
    """awake: (name, active s, in flight, queued, batch in flight, batch queued);
    waiting: (name, depth, oldest wait, batch depth)."""
    return TickContext(now=0.0, awake=tuple(AwakeModel(*a) for a in awake),
                       waiting=tuple(WaitingModel(*w) for w in waiting))


TICK_CASES = [
    ("interactive before a deeper batch queue",
     tick([("a", 9, 0, 0)], [("b", 1, 1.0, 0), ("c", 9, 5.0, 9)]), "b"),
    ("a busy with batch only: interactive takes it",
     tick([("a", 9, 4, 0, 4, 0)], [("b", 1, 0.1, 0)]), "b"),
    ("a busy with batch only, quantum not yet had: wait",
     tick([("a", 1, 4, 0, 4, 0)], [("b", 1, 0.1, 0)]), None),
    ("a busy with interactive: batch waits",
     tick([("a", 9, 1, 0)], [("c", 9, 5.0, 9)]), None),
    ("a busy with batch: batch waits for idle too",
     tick([("a", 9, 1, 0, 1, 0)], [("c", 9, 5.0, 9)]), None),
    ("a idle: batch gets its turn",
     tick([("a", 9, 0, 0)], [("c", 9, 5.0, 9)]), "c"),
    ("deeper interactive queue first",
     tick([("a", 9, 0, 0)], [("b", 5, 1.0, 4), ("c", 3, 1.0, 0)]), "c"),
    ("among stale, the oldest first: batch",
     tick([("a", 9, 1, 0)], [("b", 1, 15.0, 0), ("c", 9, 40.0, 9)]), "c"),
    ("among stale, the oldest first: interactive",
     tick([("a", 9, 1, 0)], [("b", 1, 41.0, 0), ("c", 9, 40.0, 9)]), "b"),
    ("stale batch beats busy interactive and fresh interactive waiters",
     tick([("a", 9, 3, 0)], [("b", 1, 1.0, 0), ("c", 9, 15.0, 9)]), "c"),
]


@pytest.mark.parametrize("what,context,expected", TICK_CASES, ids=[c[0] for c in TICK_CASES])
def test_time_slice_tick_counts_interactive_before_batch(what, context, expected):
    assert TimeSlicePolicy(min_quantum=2.0, max_wait=15.0).tick(context) == expected


# ---------------------------------------------------------------------------- with the switcher

SWITCHER_POLICIES = [
    {"type": "fifo"},
    {"type": "cost_aware"},
    {"type": "time_slice"},
]
IDS = [p["type"] for p in SWITCHER_POLICIES]


async def rig(policy: dict, models=("a", "b", "c"), **policy_kw: Any):
    config = make_config(models, policy={"min_active": 0, "max_wait": 15, **policy, **policy_kw})
    backends = FakeBackends(config, wake_delay=1, start_delay=1)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    starts: List[tuple] = []
    switcher.subscribe(lambda e: starts.append((asyncio.get_running_loop().time(), e.to_model))
                       if isinstance(e, SwitchStarted) else None)
    await switcher.start()
    return switcher, backends, starts


@pytest.mark.parametrize("policy", SWITCHER_POLICIES, ids=IDS)
@virtual
async def test_a_batch_queue_never_leaves_a_model_serving_interactive(policy):
    switcher, backends, starts = await rig(policy)
    loop = asyncio.get_running_loop()
    held = await switcher.acquire("a")  # one interactive request in flight on a
    batch = [asyncio.ensure_future(switcher.acquire("b", priority=BATCH)) for _ in range(8)]
    await asyncio.sleep(10)  # below max_wait
    assert [m for _, m in starts] == ["a"] and backends.count("start", "b") == 0
    released_at = loop.time()
    held.release()
    for lease in await asyncio.gather(*batch):
        lease.release()
    assert starts[-1][1] == "b" and starts[-1][0] - released_at <= 0.5  # its turn came at the idle moment


@pytest.mark.parametrize("policy", SWITCHER_POLICIES, ids=IDS)
@virtual
async def test_interactive_waiting_elsewhere_goes_before_older_batch(policy):
    switcher, _, starts = await rig(policy)
    held = await switcher.acquire("a")
    batch = [asyncio.ensure_future(switcher.acquire("b", priority=BATCH)) for _ in range(8)]
    await asyncio.sleep(3)
    chat = asyncio.ensure_future(switcher.acquire("c"))  # interactive, younger than the batch
    await asyncio.sleep(3)
    held.release()
    (await chat).release()
    for lease in await asyncio.gather(*batch):
        lease.release()
    assert [m for _, m in starts] == ["a", "c", "b"]


@pytest.mark.parametrize("policy", SWITCHER_POLICIES, ids=IDS)
@virtual
async def test_batch_is_served_not_expired_under_continuous_interactive_load(policy):
    """Interactive chat keeps a and b busy without a gap for 200 s; batch requests for c
    (request_timeout 60 s) must still be served: staleness (max_wait 15 s) gives them
    their turn. The same run without that bound is the negative control below."""
    switcher, _, starts = await rig(policy, request_timeout=60)
    loop = asyncio.get_running_loop()
    end = loop.time() + 200
    outcome = {"served": 0, "expired": 0}
    chat_served = 0

    async def chat(model: str) -> None:
        nonlocal chat_served
        while loop.time() < end:
            try:
                async with await switcher.acquire(model, timeout=1e6):
                    await asyncio.sleep(0.5)
                chat_served += 1
            except SwitchTimeout:
                raise AssertionError("an interactive request expired")

    async def batch_job() -> None:
        try:
            async with await switcher.acquire("c", priority=BATCH):
                await asyncio.sleep(0.5)
            outcome["served"] += 1
        except SwitchTimeout:
            outcome["expired"] += 1

    async def batch_flood() -> None:
        jobs = []
        while loop.time() < end - 60:
            jobs.append(asyncio.ensure_future(batch_job()))
            await asyncio.sleep(2)
        await asyncio.gather(*jobs)

    await asyncio.gather(*(chat(m) for m in ("a", "b", "a", "b")), batch_flood())
    assert outcome["expired"] == 0 and outcome["served"] == 70
    assert chat_served > 100 and "c" in [m for _, m in starts]


@virtual
async def test_negative_control_without_staleness_batch_expires():
    """The test above can fail: with max_wait beyond request_timeout, batch never gets a turn."""
    switcher, _, _ = await rig({"type": "fifo"}, request_timeout=60, max_wait=1000)
    loop = asyncio.get_running_loop()
    end = loop.time() + 100

    async def chat(model: str) -> None:
        while loop.time() < end:
            async with await switcher.acquire(model, timeout=1e6):
                await asyncio.sleep(0.5)

    chats = asyncio.gather(chat("a"), chat("a"))
    await asyncio.sleep(1)  # a is awake and serving
    batch = asyncio.ensure_future(switcher.acquire("c", priority=BATCH))
    await chats
    with pytest.raises(SwitchTimeout):
        await batch


@virtual
async def test_lease_priority_and_batch_in_flight_count():
    switcher, _, _ = await rig({"type": "fifo"})
    plain = await switcher.acquire("a")
    batch = await switcher.acquire("a", priority="batch")  # a plain string, as a key store may hand it
    assert (plain.priority, batch.priority) == (Priority.INTERACTIVE, BATCH)
    m = switcher._models["a"]
    assert (m.in_flight, m.batch_in_flight) == (2, 1)
    batch.release()
    batch.release()  # twice: harmless
    assert (m.in_flight, m.batch_in_flight) == (1, 0)
    plain.release()
    assert (m.in_flight, m.batch_in_flight) == (0, 0)
    with pytest.raises(ValueError):
        await switcher.acquire("a", priority="urgent")
    assert m.in_flight == 0


@virtual
async def test_expired_and_served_batch_waiters_leave_the_count():
    switcher, _, _ = await rig({"type": "fifo"})
    held = await switcher.acquire("a")
    waiters = [asyncio.ensure_future(switcher.acquire("b", timeout=5, priority=BATCH)) for _ in range(3)]
    await asyncio.sleep(0)
    b = switcher._models["b"]
    assert (len(b.queue), b.batch_waiting, b.interactive_waiting) == (3, 3, 0)
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, SwitchTimeout) for r in results)
    assert (len(b.queue), b.batch_waiting) == (0, 0)
    held.release()
