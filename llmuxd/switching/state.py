"""The switcher's bookkeeping records and the status snapshot it hands out.

Kept apart from the state machine (llmuxd/switcher.py) so that facades (bus,
HTTP, metrics) can import the status types without the machinery.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

from llmuxd.events import SwitchEvent
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import BackendDetail, BackendState
from llmuxd.priority import DEFAULT_PRIORITY, Priority

DEFAULT_GROUP = "default"
_ABSENT = object()
Listener = Callable[[SwitchEvent], None]


class ModelState(str, enum.Enum):
    """A model as the switcher sees it (the backend's own view is `BackendState`)."""

    ASLEEP = "asleep"  # not on the GPU: never started, sleeping, frozen, checkpointed or stopped
    WAKING = "waking"  # a switch is starting/waking it
    ACTIVE = "active"  # awake and taking requests
    DRAINING = "draining"  # awake, refusing new leases, waiting for in-flight ones
    EVICTING = "evicting"  # being put to sleep
    FAILED = "failed"  # its last wake failed or its backend died; the next request retries

    def __str__(self) -> str:
        return self.value


class Mode(str, enum.Enum):
    AUTO = "auto"
    MANUAL = "manual"

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Waiter:
    """One request queued for a model that is not awake."""

    model: "ModelRuntime"
    enqueued_at: float
    future: "asyncio.Future[Lease]"
    timer: Optional[asyncio.TimerHandle] = None
    #: interactive waiters count before batch ones in every policy (llmuxd/policies/priority.py)
    priority: Priority = DEFAULT_PRIORITY


@dataclass(eq=False)
class ModelRuntime:
    name: str
    group: str
    memory_gib: Optional[float]
    state: ModelState = ModelState.ASLEEP
    #: waiters in arrival order (a dict: O(1) removal when one times out)
    queue: Dict[Waiter, None] = field(default_factory=dict)
    in_flight: int = 0
    #: the batch leases among `in_flight` (the rest are interactive)
    batch_in_flight: int = 0
    #: the batch waiters in `queue`; kept by enqueue()/dequeue(), use them
    batch_waiting: int = 0
    activated_at: Optional[float] = None
    last_used: float = 0.0
    last_error: Optional[str] = None
    last_switch_s: Optional[float] = None
    eviction_override: Optional[Eviction] = None
    #: resolved when in_flight reaches 0 while a drain waits
    drain_future: "Optional[asyncio.Future[None]]" = None
    #: removed by a reload; kept until its backend is stopped
    removed: bool = False
    #: leases at once (config max_concurrency; None: no limit): llmuxd/switching/concurrency.py
    max_concurrency: Optional[int] = None

    @property
    def awake(self) -> bool:
        """On the GPU and counted against the group's budget."""
        return self.state in (ModelState.ACTIVE, ModelState.DRAINING)

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or bool(self.queue)

    def oldest_enqueued(self) -> Optional[float]:
        for waiter in self.queue:
            return waiter.enqueued_at
        return None

    def enqueue(self, waiter: Waiter) -> None:
        self.queue[waiter] = None
        if waiter.priority is Priority.BATCH:
            self.batch_waiting += 1

    def dequeue(self, waiter: Waiter) -> bool:
        """Take `waiter` out of the queue; False if it was not in it."""
        if self.queue.pop(waiter, _ABSENT) is _ABSENT:
            return False
        if waiter.priority is Priority.BATCH and self.batch_waiting > 0:
            self.batch_waiting -= 1
        return True

    @property
    def interactive_waiting(self) -> int:
        return max(0, len(self.queue) - self.batch_waiting)


@dataclass(eq=False)
class Op:
    """A control operation run by a group's worker, in order with switches."""

    kind: str  # "switch" | "sleep" | "remove"
    model: ModelRuntime
    future: "asyncio.Future[None]"
    eviction: Optional[Eviction] = None


@dataclass(eq=False)
class GroupRuntime:
    name: str
    budget_gib: Optional[float]
    #: awake models, in activation order
    awake: List[ModelRuntime] = field(default_factory=list)
    #: (evicted names, target name or None) while a switch runs
    switching: Optional[Tuple[Tuple[str, ...], Optional[str]]] = None
    switch_started_at: Optional[float] = None
    #: targets the policy said to switch to now, in order (an ordered set)
    wanted: Dict[str, None] = field(default_factory=dict)
    ops: Deque[Op] = field(default_factory=deque)
    deferrals: Dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    last_failure: Optional[float] = None
    wakeup: Optional[asyncio.Event] = None
    demand: Optional[asyncio.Event] = None
    worker: "Optional[asyncio.Task[None]]" = None
    ticker: "Optional[asyncio.Task[None]]" = None
    skipped_switches: int = 0


class Lease:
    """Permission to send one request to `model` at `endpoint`.

    Release it exactly when the response is finished or abandoned; releasing
    twice is harmless. Works as `with` and `async with`.
    """

    __slots__ = ("model", "endpoint", "priority", "_runtime", "_on_release", "_released")

    def __init__(
        self,
        on_release: Callable[[ModelRuntime, Priority], None],
        runtime: ModelRuntime,
        endpoint: str,
        priority: Priority = DEFAULT_PRIORITY,
    ):
        self.model = runtime.name
        self.endpoint = endpoint
        #: so the switcher knows which in-flight requests are interactive
        self.priority = priority
        self._runtime = runtime
        self._on_release = on_release  # the switcher's bookkeeping (in-flight, drain)
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._on_release(self._runtime, self.priority)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Lease {self.model} {self.endpoint} {state}>"


_PROCESS_STATE = {
    BackendState.NOT_STARTED: "not_started",
    BackendState.STARTING: "starting",
    BackendState.READY: "running",
    BackendState.CHECKPOINTED: "checkpointed",
    BackendState.STOPPED: "stopped",
    BackendState.FAILED: "failed",
}


def process_state(state: ModelState, backend: BackendDetail) -> str:
    """One word for where a model is, as llmux 0.7's status said it: the
    switcher's view where it knows better (awake models run; a failed wake
    is a failure whatever the backend did after), else the backend's, with
    the eviction a sleeping model sleeps with: ``sleeping:offload+freeze``."""
    if state is ModelState.FAILED or backend.state is BackendState.FAILED:
        return "failed"
    if state in (ModelState.ACTIVE, ModelState.DRAINING):
        return "running"
    if backend.state is BackendState.SLEEPING:
        return f"sleeping:{backend.eviction}" if backend.eviction is not None else "sleeping"
    return _PROCESS_STATE[backend.state]


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: str
    eviction: str
    group: str
    in_flight: int
    queue_depth: int
    wait_estimate: float
    last_error: Optional[str]
    last_switch_s: Optional[float]
    endpoint: Optional[str]
    #: not_started, starting, running, sleeping:WEIGHTS+PROCESS, checkpointed, stopped
    #: or failed (see `last_error`): `process_state()`
    process_state: str = "not_started"
    #: seconds until an idle eviction (idle_timeout), None when none is due: llmuxd/switching/idle.py
    idle_left_s: Optional[float] = None


@dataclass(frozen=True)
class GroupStatus:
    name: str
    budget_gib: Optional[float]
    state: str
    active_models: Tuple[str, ...]


@dataclass(frozen=True)
class SwitcherStatus:
    mode: str
    pinned: Optional[str]
    #: "idle" | "active:a,b" | "switching:a->b" (the first switching group)
    state: str
    active_models: Tuple[str, ...]
    models: Dict[str, ModelStatus]
    groups: Dict[str, GroupStatus] = field(default_factory=dict)
    policy: str = "fifo"
    #: preload progress, model -> pending | starting | awake | asleep | failed: REASON (llmuxd/switching/preload.py)
    preload: Dict[str, str] = field(default_factory=dict)
