"""Learned switch costs: one exponential moving average per direction.

Why per direction: waking a big model from disk and sleeping a small one cost
very different amounts. As in llmux 0.7: α = 0.3, each sample capped at 60 s
(one pathological cold start must not poison the estimate for hours), 10 s
until something is learned. A sample is the time the GPU was unavailable (sleep
+ wake), not the cooldown or drain a policy chose to wait.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Mapping, Optional

log = logging.getLogger(__name__)

DEFAULT_COST_S = 10.0
MAX_SAMPLE_S = 60.0
ALPHA = 0.3
ARROW = "→"


def cost_key(from_model: Optional[str], to_model: str) -> str:
    """"a→b"; a cold start (nothing evicted) is "→b"."""
    return f"{from_model or ''}{ARROW}{to_model}"


class SwitchCosts:
    def __init__(self, default: float = DEFAULT_COST_S):
        self.default = default
        self._ema: Dict[str, float] = {}

    def estimate(self, from_model: Optional[str], to_model: str) -> float:
        return self._ema.get(cost_key(from_model, to_model), self.default)

    def record(self, from_model: Optional[str], to_model: str, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        sample = min(max(seconds, 0.0), MAX_SAMPLE_S)
        key = cost_key(from_model, to_model)
        old = self._ema.get(key)
        self._ema[key] = sample if old is None else ALPHA * sample + (1 - ALPHA) * old

    def as_dict(self) -> Dict[str, float]:
        return dict(self._ema)

    def load(self, data: Mapping[str, float]) -> None:
        """Restore persisted estimates; bad entries are logged and dropped, never fatal."""
        for key, value in dict(data).items():
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                seconds = float("nan")
            if not isinstance(key, str) or ARROW not in key or not math.isfinite(seconds) or seconds < 0:
                log.warning("ignoring persisted switch cost %r=%r: want 'from→to': seconds", key, value)
                continue
            self._ema[key] = min(seconds, MAX_SAMPLE_S)
