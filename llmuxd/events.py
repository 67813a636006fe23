"""What the switcher tells its observers (bus signals, metrics, logs).

Plain frozen dataclasses, delivered synchronously by `Switcher.subscribe`
listeners: an observer sees every change in order, and needs no event loop of
its own. A listener that raises is logged and ignored, so a faulty observer
can never stall a switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union


@dataclass(frozen=True)
class SwitchStarted:
    """A group began evicting `from_model` (comma-separated when several) for `to_model`.

    `to_model` is None for a plain sleep (`sleep_model`, removal on reload);
    `from_model` is None when the target fits without evicting anyone.
    """

    group: str
    from_model: Optional[str]
    to_model: Optional[str]


@dataclass(frozen=True)
class SwitchFinished:
    """The end of a switch started by the matching `SwitchStarted`.

    `phases` holds seconds spent in each phase that ran: backoff, cooldown,
    drain, sleep, wake. `drain_timed_out` says the old model was put to sleep
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


SwitchEvent = Union[SwitchStarted, SwitchFinished, ModelStateChanged, ModeChanged, ModelIdle, PreloadProgress]
