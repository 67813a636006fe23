"""Post-wake canary: one deterministic probe after a wake that could corrupt the model.

After a level-2 wake vLLM can silently answer garbage (vLLM #29341, #16564), and
a restored image may come from a subtly different process. The answer to one
temperature-0 prompt, taken while the model was known good (before its sleep),
is compared after such a wake; a mismatch stops the backend, marks that
eviction unsafe for the model (persisted by the daemon through `on_unsafe`),
and later sleeps use a safer eviction.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from llmuxd.eviction import STOP_EVICTION, Eviction, ProcessStrategy, WeightStrategy

log = logging.getLogger("llmuxd.checkpoint.canary")

CANARY_PROMPT = "What is 2+2? Reply with just the number."
CANARY_MAX_TOKENS = 10

UnsafeCallback = Callable[[str, str, str], None]


def needs_canary(eviction: Eviction) -> bool:
    """Wakes that can bring back a different model: discard, and restores."""
    return eviction.weights is WeightStrategy.DISCARD or eviction.process is ProcessStrategy.CHECKPOINT


def safer(eviction: Eviction) -> Eviction:
    """One step towards what cannot go wrong: a restore becomes a stop (cold start),
    a discard becomes an offload (weights never leave the process)."""
    if eviction.process is ProcessStrategy.CHECKPOINT:
        return STOP_EVICTION
    if eviction.weights is WeightStrategy.DISCARD:
        return Eviction(WeightStrategy.OFFLOAD, eviction.process)
    return STOP_EVICTION


class Canary:
    """Baseline answers per model, and the evictions found unsafe per model."""

    def __init__(self, on_unsafe: UnsafeCallback | None = None):
        self.baselines: dict[str, str] = {}
        self.unsafe: dict[str, set[str]] = {}
        self._on_unsafe = on_unsafe

    def load_unsafe(self, verdicts: dict[str, Iterable[str]]) -> None:
        """Restore what the daemon persisted: {model: ["discard+keep_running", ...]}."""
        for model, evictions in verdicts.items():
            self.unsafe.setdefault(model, set()).update(str(Eviction.parse(e)) for e in evictions)

    def is_unsafe(self, model: str, eviction: Eviction) -> bool:
        return str(eviction) in self.unsafe.get(model, set())

    def effective(self, model: str, eviction: Eviction) -> Eviction:
        """`eviction`, or the first safer one not marked unsafe for `model` (logged)."""
        chosen = eviction
        while self.is_unsafe(model, chosen) and chosen != STOP_EVICTION:
            chosen = safer(chosen)
        if chosen != eviction:
            log.warning("model %s: eviction %s failed its post-wake check before; sleeping with %s instead",
                        model, eviction, chosen)
        return chosen

    def mark_unsafe(self, model: str, eviction: Eviction, reason: str) -> None:
        self.unsafe.setdefault(model, set()).add(str(eviction))
        log.error("model %s: eviction %s marked unsafe: %s; next sleep uses %s", model, eviction, reason,
                  self.effective_quiet(model, eviction))
        if self._on_unsafe is not None:
            try:
                self._on_unsafe(model, str(eviction), reason)
            except Exception:  # noqa: BLE001 - persistence must not break a wake
                log.exception("persisting the unsafe verdict failed")

    def effective_quiet(self, model: str, eviction: Eviction) -> Eviction:
        chosen = eviction
        while self.is_unsafe(model, chosen) and chosen != STOP_EVICTION:
            chosen = safer(chosen)
        return chosen


#: where unsafe verdicts live in DaemonState.quarantine[model]
QUARANTINE_KEY = "unsafe_evictions"


def record_unsafe(quarantine: dict, model: str, eviction: str, reason: str) -> None:
    """Store a verdict in the daemon's persisted `DaemonState.quarantine` (then save it)."""
    quarantine.setdefault(model, {}).setdefault(QUARANTINE_KEY, {})[eviction] = reason


def unsafe_from_quarantine(quarantine: dict) -> dict[str, list[str]]:
    """The verdicts `record_unsafe` stored, for `Canary.load_unsafe` at startup."""
    return {model: sorted(verdict.get(QUARANTINE_KEY, {}))
            for model, verdict in quarantine.items() if isinstance(verdict, dict)}
