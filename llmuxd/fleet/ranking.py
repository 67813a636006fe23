"""Which of a model's deployments a router should send the next request to.

One pure function, `preferred`, used by the LiteLLM hook and by the fleet
simulation in benchmarks/fleet.py, so the benchmark measures the decision that
ships. The rule, in order:

1. Hosts where the model is **awake**: all of them are returned, and the router's
   own strategy (LiteLLM's shuffle, least-busy, ...) balances between them. A
   switch costs seconds; spreading one model's load over hosts that already
   serve it costs nothing.
2. Otherwise exactly one host, the best by: the model is already **starting**
   there (or this router just sent it there to be started: a *claim*, which
   bridges the gap until the host's next signal shows it); then a host that can
   wake it **without evicting** another model (free budget in its GPU group, and
   no other model claimed there); then the least **pressure**: the demand of the
   other models that live on the host (awake there, or last sent there by this
   router), as the router counted their requests, in steps of a quarter of an
   average host's demand, so models that must share hosts are spread the way an
   operator's static assignment would spread them; then a host where it is **warm** (loaded but
   asleep: a wake of seconds, where elsewhere it would be a cold start, and the
   model returns to the host it lived on); then the lowest **wait estimate** (the
   host's own `Retry-After` estimate); then the least loaded host; then a stable hash of
   (model, host), so that different asleep models spread over equal hosts and
   every router instance picks the same one.

Hosts without a usable signal (unknown, stale, unreachable), that do not serve the
model, or that would refuse it at once (`accepts` false: pinned elsewhere, queue
full) are skipped. When nothing is usable the answer is empty and the caller
falls back to its default routing: the fleet signal can improve routing, never
stop it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, FrozenSet, List, Optional, Sequence, Tuple

from llmuxd.fleet.signal import AWAKE, FAILED, STARTING, HostSignal, ModelSignal


@dataclass(frozen=True)
class Option:
    """One deployment of the requested model: `key` is what the caller gets back."""

    key: Any
    host: str
    model: str
    #: the host's signal, None when it is unknown, stale or unreachable
    signal: Optional[HostSignal]
    #: models this router recently sent to `host` to be started
    claimed: FrozenSet[str] = frozenset()
    #: the demand of other models living on `host`, in steps (0: the least loaded kind of host)
    pressure: int = 0

    @property
    def model_signal(self) -> Optional[ModelSignal]:
        return None if self.signal is None else self.signal.models.get(self.model)


def usable(option: Option) -> bool:
    ms = option.model_signal
    return ms is not None and ms.accepts


def spread_hash(model: str, host: str) -> int:
    """A stable pseudo-random rank of `host` for `model` (rendezvous hashing)."""
    digest = hashlib.blake2b(f"{model}\x00{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(option: Option) -> Tuple[int, int, int, int, float, int, int]:
    """Sort key for a host where the model is not awake (smaller is better)."""
    ms = option.model_signal
    assert ms is not None and option.signal is not None
    if ms.state == STARTING or option.model in option.claimed:
        tier = 0
    elif ms.state == FAILED:
        tier = 2
    else:
        tier = 1
    evicts = not ms.fits_without_eviction or bool(option.claimed - {option.model})
    return (tier, int(evicts), option.pressure, int(not ms.warm), ms.wait_estimate_s, option.signal.load,
            spread_hash(option.model, option.host))


def preferred(options: Sequence[Option]) -> List[Option]:
    """The options to route to (see the module docstring); empty: fall back to default routing."""
    candidates = [o for o in options if usable(o)]
    awake = [o for o in candidates if o.model_signal is not None and o.model_signal.state == AWAKE]
    if awake:
        return awake
    if not candidates:
        return []
    return [min(candidates, key=rank)]
