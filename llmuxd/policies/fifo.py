"""fifo: switch as soon as a request waits for another model (llmux 0.7's default).

Batch requests yield to interactive ones (policies/priority.py) until they have
waited `max_wait`."""

from __future__ import annotations

from typing import Optional

from llmuxd.policies.base import NOW, Decision, PolicyContext, TickContext
from llmuxd.policies.priority import batch_recheck, batch_yields


class FifoPolicy:
    name = "fifo"
    tick_interval: Optional[float] = None

    def __init__(self, *, drain_before_switch: bool = True, max_wait: float = 15.0):
        self.drain_before_switch = drain_before_switch
        self.max_wait = max(0.0, max_wait)

    def decide(self, ctx: PolicyContext) -> Decision:
        if ctx.active is not None and batch_yields(ctx, self.max_wait):
            return batch_recheck(ctx, self.max_wait)
        return NOW

    def tick(self, ctx: TickContext) -> Optional[str]:
        return None

    def on_switch_complete(self, from_model: Optional[str], to_model: str, seconds: float) -> None:
        pass
