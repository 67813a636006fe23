"""The small protocol every switching policy implements.

A policy only *decides*; the switcher owns all state and does every switch.
It is asked three things:

- `decide(ctx)`: a request is waiting for a model that is not awake and whose
  wake would evict `ctx.active` — switch now, defer (the switcher asks again
  when the delay ends, with fresh numbers), or skip (someone else, e.g. the
  scheduler tick, will act);
- `tick(ctx)` (only when `tick_interval` is not None): which waiting model, if
  any, should the group switch to now;
- `on_switch_complete(...)`: learn from a finished switch.

Policies are pure functions of their contexts and parameters, so they are
tested without an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple


@dataclass(frozen=True)
class Decision:
    """What to do about a waiting model: "now", "defer" (for `delay` s) or "skip"."""

    kind: str
    delay: float = 0.0

    @staticmethod
    def defer(seconds: float) -> "Decision":
        # never zero or negative: a deferral must let time pass, or it loops
        return Decision("defer", max(float(seconds), MIN_DEFER_S))


#: shortest deferral; keeps a policy bug or a zero parameter from busy-looping
MIN_DEFER_S = 0.001
NOW = Decision("now")
SKIP = Decision("skip")


@dataclass(frozen=True)
class PolicyContext:
    """The numbers a policy decides on, taken when a request waits."""

    now: float
    target: str
    target_queue_depth: int
    #: seconds the oldest waiter of `target` has waited
    oldest_wait: float
    #: the model a switch would evict (None: the target fits, or nothing is awake)
    active: Optional[str]
    #: seconds `active` has been awake
    active_duration: float
    active_in_flight: int
    active_queue_depth: int
    #: estimated seconds for the switch active→target (learned, see costs.py)
    switch_cost: float
    #: True when this is the re-evaluation at the end of a deferral
    deferred: bool = False
    #: the batch requests among `target_queue_depth` (the rest are interactive)
    target_batch_depth: int = 0
    #: the batch requests among `active_in_flight` and `active_queue_depth`
    active_batch_in_flight: int = 0
    active_batch_queue_depth: int = 0
    #: interactive requests waiting for other models of the group (neither target nor active)
    others_interactive_depth: int = 0

    @property
    def target_interactive_depth(self) -> int:
        return max(0, self.target_queue_depth - self.target_batch_depth)

    @property
    def active_interactive(self) -> int:
        """Interactive requests the switch would drain or keep waiting: in flight or queued."""
        in_flight = self.active_in_flight - self.active_batch_in_flight
        queued = self.active_queue_depth - self.active_batch_queue_depth
        return max(0, in_flight) + max(0, queued)


@dataclass(frozen=True)
class AwakeModel:
    name: str
    active_duration: float
    in_flight: int
    queue_depth: int
    #: the batch requests among `in_flight` and `queue_depth`
    batch_in_flight: int = 0
    batch_queue_depth: int = 0

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queue_depth > 0

    @property
    def interactive(self) -> int:
        """Interactive requests in flight or queued: what batch work must not take the GPU from."""
        return max(0, self.in_flight - self.batch_in_flight) + max(0, self.queue_depth - self.batch_queue_depth)


@dataclass(frozen=True)
class WaitingModel:
    name: str
    queue_depth: int
    #: seconds its oldest waiter has waited
    oldest_wait: float
    #: the batch requests among `queue_depth`
    batch_depth: int = 0

    @property
    def interactive_depth(self) -> int:
        return max(0, self.queue_depth - self.batch_depth)


@dataclass(frozen=True)
class TickContext:
    """A group's picture at a scheduler tick."""

    now: float
    awake: Tuple[AwakeModel, ...]
    waiting: Tuple[WaitingModel, ...]


class Policy(Protocol):
    name: str
    #: seconds between scheduler ticks, or None for a purely reactive policy
    tick_interval: Optional[float]
    #: wait for in-flight requests before sleeping the old model
    drain_before_switch: bool

    def decide(self, ctx: PolicyContext) -> Decision: ...

    def tick(self, ctx: TickContext) -> Optional[str]: ...

    def on_switch_complete(self, from_model: Optional[str], to_model: str, seconds: float) -> None: ...
