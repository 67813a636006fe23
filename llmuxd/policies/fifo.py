"""fifo: switch as soon as a request waits for another model (llmux 0.7's default)."""

from __future__ import annotations

from typing import Optional

from llmuxd.policies.base import NOW, Decision, PolicyContext, TickContext


class FifoPolicy:
    name = "fifo"
    tick_interval: Optional[float] = None

    def __init__(self, *, drain_before_switch: bool = True):
        self.drain_before_switch = drain_before_switch

    def decide(self, ctx: PolicyContext) -> Decision:
        return NOW

    def tick(self, ctx: TickContext) -> Optional[str]:
        return None

    def on_switch_complete(self, from_model: Optional[str], to_model: str, seconds: float) -> None:
        pass
