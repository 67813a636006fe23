"""cost_aware: let a switch pay for itself before making the next one.

After a switch the active model keeps the GPU for a serving window as long as
the switch cost (so at most half the time goes to switching); after that the
waiting model gets the GPU once its queue is deep enough to amortize the cost
(max(1, ceil(amortization_factor × cost_s)) requests) or once its oldest
request has waited a coalescing window. A request waiting `max_wait` always
wins. ``amortization_factor: 0`` switches as soon as a request waits, serving
window and coalescing included (llmux 0.7 documented 0 as "always switch
immediately", like fifo; its code still held the serving window). Unlike llmux 0.7, a deferral that ends re-evaluates all of this with fresh
numbers (the switcher asks again), so a deferral whose requests have gone does
not switch.

Priority (policies/priority.py): a batch-only target yields to interactive
work until it is stale; an interactive target takes the GPU at once from a
model serving only batch work.
"""

from __future__ import annotations

import math
from typing import Optional

from llmuxd.policies.base import NOW, SKIP, Decision, PolicyContext, TickContext
from llmuxd.policies.costs import SwitchCosts
from llmuxd.policies.priority import batch_recheck, batch_yields, interactive_preempts


#: a serving window this close to its end has ended: two targets deferred to one window's
#: end are then both due when the first timer fires, and go in demand order
WINDOW_SLACK_S = 0.01


class CostAwarePolicy:
    name = "cost_aware"
    tick_interval: Optional[float] = None
    drain_before_switch = True

    def __init__(
        self,
        costs: SwitchCosts,
        *,
        coalesce_window: float = 2.0,
        amortization_factor: float = 0.5,
        max_wait: float = 15.0,
    ):
        self.costs = costs
        self.coalesce_window = max(0.0, coalesce_window)
        self.amortization_factor = max(0.0, amortization_factor)
        self.max_wait = max(0.0, max_wait)

    def threshold(self, cost_s: float) -> int:
        """Queue depth that justifies a switch costing `cost_s`."""
        return max(1, math.ceil(self.amortization_factor * cost_s))

    def decide(self, ctx: PolicyContext) -> Decision:
        if ctx.active is None:
            return NOW
        if ctx.target_queue_depth == 0:
            return SKIP
        if batch_yields(ctx, self.max_wait):
            return batch_recheck(ctx, self.max_wait)
        if self.amortization_factor == 0 or interactive_preempts(ctx):
            return NOW
        to_stale = self.max_wait - ctx.oldest_wait
        if to_stale <= 0:
            return NOW
        window_left = ctx.switch_cost - ctx.active_duration
        if window_left > WINDOW_SLACK_S:
            return Decision.defer(min(window_left, to_stale))
        if ctx.target_queue_depth >= self.threshold(ctx.switch_cost):
            return NOW
        coalesce_left = self.coalesce_window - ctx.oldest_wait
        if coalesce_left <= 0:
            return NOW
        return Decision.defer(min(coalesce_left, to_stale))

    def tick(self, ctx: TickContext) -> Optional[str]:
        return None

    def on_switch_complete(self, from_model: Optional[str], to_model: str, seconds: float) -> None:
        # the switcher records the sample in the shared SwitchCosts (it also
        # feeds wait estimates for every policy); nothing else to learn here
        pass
