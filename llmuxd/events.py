"""What happened on the host: the switcher's events (bus signals, metrics, logs)
and, for the console's stream, requests served and log lines.

Plain frozen dataclasses (the two made per request or per line: NamedTuples), delivered synchronously by `Switcher.subscribe`
listeners: an observer sees every change in order, and needs no event loop of
its own. A listener that raises is logged and ignored, so a faulty observer
can never stall a switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Union


@dataclass(frozen=True)
class SwitchStarted:
    """A group began evicting `from_model` (comma-separated when several) for `to_model`.

    `to_model` is None for a plain sleep (`sleep_model`, removal on reload);
    `from_model` is None when the target fits without evicting anyone.
    """

    group: str
    from_model: Optional[str]
    to_model: Optional[str]
    #: why it runs: "POLICY: N request(s) waiting", "manual switch", "sleep requested",
    #: "reload: no longer configured" (descriptive: not part of the event's equality)
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class SwitchFinished:
    """The end of a switch started by the matching `SwitchStarted`.

    `phases` holds seconds spent in each phase that ran: backoff, cooldown,
    drain, sleep, wake; an overlapped switch has pause, kv_release,
    weights_out, weights_in (these two at once), kv_in, scheduling instead. `drain_timed_out` says the old model was put to sleep
    with requests still in flight because `drain_timeout` passed. `skipped`
    says the switch was abandoned before anything was evicted because all the
    requests that wanted it were served or timed out (invariant I7).
    """

    group: str
    from_model: Optional[str]
    to_model: Optional[str]
    ok: bool
    duration: float
    phases: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    drain_timed_out: bool = False
    skipped: bool = False
    #: "overlapped" when the old model's weights left while the new one's came in
    #: (phases then: pause, kv_release, weights_out, weights_in, kv_in, scheduling),
    #: else why not ("budget: ...", "eviction: ...", "engine: ...", "off: ..."); None
    #: when there was nothing to overlap (no model to evict, or none to wake)
    overlap: Optional[str] = None
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class ModelStateChanged:
    """A model moved to `state`, one of `llmuxd.switching.state.ModelState`'s values."""

    model: str
    state: str


@dataclass(frozen=True)
class ModeChanged:
    """The switching mode changed: "auto", or "manual" with an optional pinned model."""

    mode: str
    pinned: Optional[str]


@dataclass(frozen=True)
class ModelIdle:
    """`model` had no request for `idle_for` seconds (its idle_timeout is `timeout`) and is
    being put to sleep with `eviction` (llmuxd/switching/idle.py)."""

    model: str
    idle_for: float
    timeout: float
    eviction: str


@dataclass(frozen=True)
class PreloadProgress:
    """A preloaded model reached `progress`: starting, awake, asleep or failed: REASON
    (llmuxd/switching/preload.py)."""

    model: str
    progress: str




class RequestServed(NamedTuple):
    """One proxied request ended (the front end emits it from one place, after the
    answer or the error). Times in seconds; `first_byte` is None when nothing came
    from a backend (an error llmux answered itself). A NamedTuple, not a frozen
    dataclass: one is made per request, and that costs a fifth as much."""

    at: float  # wall clock (time.time()) when it arrived
    model: str
    path: str
    status: int
    waited: float
    first_byte: Optional[float]
    duration: float
    key_id: Optional[str] = None


class LogLine(NamedTuple):
    """One line a backend printed (`model` set, source "backend") or one of the
    daemon's own log lines (source "llmuxd", `model` when it is about one)."""

    at: float  # wall clock
    source: str
    model: Optional[str]
    text: str
    level: str = "info"


SwitchEvent = Union[SwitchStarted, SwitchFinished, ModelStateChanged, ModeChanged, ModelIdle, PreloadProgress]
#: everything the console's stream (`/llmux/v1/events`) carries
HostEvent = Union[SwitchStarted, SwitchFinished, ModelStateChanged, ModeChanged, RequestServed, LogLine]
