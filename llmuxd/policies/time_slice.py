"""time_slice: never preempt a busy model; hand the GPU over at idle moments.

Requests for a sleeping model wait (the policy skips them) until a scheduler
tick finds the awake model idle — no request in flight or queued — after it has
had `min_quantum` seconds; the tick then switches to the longest queue. The
tick itself enforces `max_wait`: a model whose oldest request has waited that
long gets the GPU even from a busy model (which is drained, not cut off).
Ties are broken deterministically: deeper queue, then older waiter, then name.

Priority (policies/priority.py): models with interactive waiters are picked
before batch-only ones (among stale ones, the oldest first), and for them a model serving only
batch work counts as idle (its batch requests are drained); batch-only
waiters wait for a truly idle moment, or until they are stale.
"""

from __future__ import annotations

from typing import Optional

from llmuxd.policies.base import NOW, SKIP, Decision, PolicyContext, TickContext, WaitingModel
from llmuxd.policies.priority import interactive_rank, yields_to_interactive


def _rank(w: WaitingModel) -> tuple:
    return (-w.queue_depth, -w.oldest_wait, w.name)


class TimeSlicePolicy:
    name = "time_slice"
    drain_before_switch = True

    def __init__(self, *, tick_interval: float = 0.5, min_quantum: float = 2.0, max_wait: float = 15.0):
        # a zero interval would spin the scheduler; 10 ms is below any switch's cost
        self.tick_interval: Optional[float] = max(0.01, tick_interval)
        self.min_quantum = max(0.0, min_quantum)
        self.max_wait = max(0.0, max_wait)

    def decide(self, ctx: PolicyContext) -> Decision:
        if ctx.active is None:
            return NOW
        if ctx.target_queue_depth and ctx.oldest_wait >= self.max_wait:
            return NOW
        return SKIP

    def tick(self, ctx: TickContext) -> Optional[str]:
        waiting = [w for w in ctx.waiting if w.queue_depth > 0]
        if not waiting:
            return None
        stale = [w for w in waiting if w.oldest_wait >= self.max_wait]
        if stale:
            return min(stale, key=lambda w: (-w.oldest_wait, w.name)).name
        interactive = [w for w in waiting if w.interactive_depth > 0]
        if interactive:
            if ctx.awake and not any(yields_to_interactive(a, self.min_quantum) for a in ctx.awake):
                return None
            return min(interactive, key=interactive_rank).name
        if ctx.awake:
            ready = [a for a in ctx.awake if not a.busy and a.active_duration >= self.min_quantum]
            if not ready:
                return None
        return min(waiting, key=_rank).name

    def on_switch_complete(self, from_model: Optional[str], to_model: str, seconds: float) -> None:
        pass
