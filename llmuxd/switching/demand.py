"""What a policy is shown: the contexts the switcher builds from its records,
counted by priority (interactive and batch), and the order in which waiting
models are considered. Pure functions over llmuxd/switching/state.py, so the
state machine only calls them."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from llmuxd.policies.base import AwakeModel, PolicyContext, TickContext, WaitingModel
from llmuxd.switching.state import GroupRuntime, ModelRuntime


def _since(now: float, then: Optional[float]) -> float:
    # `then` may be 0.0 on a clock that starts at zero (the virtual loop): test for None, not falsehood
    return 0.0 if then is None else now - then


def policy_context(
    now: float,
    target: ModelRuntime,
    victims: List[ModelRuntime],
    group_models: Iterable[ModelRuntime],
    switch_cost: float,
    deferred: bool,
) -> PolicyContext:
    """The numbers `Policy.decide` reads for a switch to `target` that would evict `victims`."""
    primary = victims[0] if victims else None
    involved = {id(target)} | {id(v) for v in victims}
    others_interactive = sum(m.interactive_waiting for m in group_models if id(m) not in involved and m.queue)
    return PolicyContext(
        now=now,
        target=target.name,
        target_queue_depth=len(target.queue),
        oldest_wait=_since(now, target.oldest_enqueued()),
        active=primary.name if primary else None,
        active_duration=_since(now, primary.activated_at) if primary else 0.0,
        active_in_flight=sum(v.in_flight for v in victims),
        active_queue_depth=sum(len(v.queue) for v in victims),
        switch_cost=switch_cost,
        deferred=deferred,
        target_batch_depth=min(target.batch_waiting, len(target.queue)),
        active_batch_in_flight=sum(v.batch_in_flight for v in victims),
        active_batch_queue_depth=sum(min(v.batch_waiting, len(v.queue)) for v in victims),
        others_interactive_depth=others_interactive,
    )


def tick_context(now: float, g: GroupRuntime, group_models: Iterable[ModelRuntime]) -> TickContext:
    """A group's picture for `Policy.tick`: its awake models and the asleep ones with waiters."""
    return TickContext(
        now=now,
        awake=tuple(
            AwakeModel(
                a.name, _since(now, a.activated_at), a.in_flight, len(a.queue),
                batch_in_flight=a.batch_in_flight, batch_queue_depth=min(a.batch_waiting, len(a.queue)),
            )
            for a in g.awake
        ),
        waiting=tuple(
            WaitingModel(m.name, len(m.queue), _since(now, m.oldest_enqueued()),
                         batch_depth=min(m.batch_waiting, len(m.queue)))
            for m in group_models
            if m.queue and not m.awake
        ),
    )


def demand_rank(m: ModelRuntime, now: float, max_wait: float) -> tuple:
    """Which waiting model is considered first: stale ones (oldest waiter past `max_wait`,
    batch or not: staleness is what keeps batch from starving), oldest first; then
    those with interactive waiters; then the rest; each by oldest waiter, then name."""
    oldest = m.oldest_enqueued()
    oldest = now if oldest is None else oldest
    stale = now - oldest >= max_wait
    return (not stale, not stale and m.interactive_waiting == 0, oldest, m.name)


def reevaluation_order(waiting: List[ModelRuntime], now: float, max_wait: float) -> List[ModelRuntime]:
    """The order in which the policy is asked again about every waiting model (demand_rank)."""
    return sorted(waiting, key=lambda m: demand_rank(m, now, max_wait))


def next_wanted(wanted: Dict[str, None], models: Dict[str, ModelRuntime], now: float, max_wait: float) -> str:
    """Which of the targets the policy wants now goes first (`wanted` is a non-empty ordered
    set): in the order they were wanted, unless batch waiters are among them, then by
    demand_rank, so a batch target wanted first does not go before interactive ones."""
    candidates = [models[name] for name in wanted if name in models]
    if not any(m.batch_waiting for m in candidates):
        return next(iter(wanted))
    return min(candidates, key=lambda m: demand_rank(m, now, max_wait)).name


def interactive_work(m: ModelRuntime) -> bool:
    """Interactive requests in flight on `m` or waiting for it."""
    return m.in_flight > m.batch_in_flight or m.interactive_waiting > 0
