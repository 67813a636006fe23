"""Per-key admission: a token bucket for `rate`/`burst` and a count for `max_in_flight`.

State is kept by key id, apart from the key objects, so that a reload that
replaces or revokes a key neither resets a bucket nor loses a count: a
request admitted under a key that is then revoked still releases its place
when it finishes. Counters here feed `llmuxctl status` and `keys list`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

from llmuxd.keys.errors import KeyLimited
from llmuxd.keys.model import ApiKey


@dataclass
class KeyUsage:
    """One key's state: bucket, requests now in flight, totals, last use (wall clock)."""

    tokens: float = 0.0
    refilled_at: float = 0.0
    in_flight: int = 0
    requests: int = 0
    limited: int = 0
    last_used: Optional[float] = None
    fresh: bool = True


class Ticket:
    """An admitted request's place in its key's in-flight count; release once."""

    __slots__ = ("_usage",)

    def __init__(self, usage: KeyUsage):
        self._usage: Optional[KeyUsage] = usage

    def release(self) -> None:
        usage, self._usage = self._usage, None
        if usage is not None:
            usage.in_flight -= 1


def duration_text(seconds: float) -> str:
    """A reset as OpenAI's headers write it: `1s`, `2.5s`, `6m0s`."""
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest}s"


class KeyLimits:
    """Admission of requests per key; `clock` is monotonic seconds, `wall` for last use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.clock = clock
        self.wall = wall
        self._usage: Dict[str, KeyUsage] = {}

    def usage(self, key_id: str) -> KeyUsage:
        usage = self._usage.get(key_id)
        if usage is None:
            usage = self._usage[key_id] = KeyUsage()
        return usage

    def admit(self, key: ApiKey) -> Ticket:
        """A ticket for one request under `key`, or KeyLimited (nothing counted then)."""
        usage = self.usage(key.id)
        if key.max_in_flight is not None and usage.in_flight >= key.max_in_flight:
            usage.limited += 1
            raise KeyLimited(
                f"Rate limit reached for key '{key.id}' on requests in flight: limit {key.max_in_flight}, "
                f"in flight {usage.in_flight}. Please try again when one of them has finished.",
                dimension="in-flight", limit=key.max_in_flight, remaining=0, reset=1.0, retry_after=1.0)
        if key.rate is not None:
            self._take_token(key, usage)
        usage.in_flight += 1
        usage.requests += 1
        usage.last_used = self.wall()
        return Ticket(usage)

    def _take_token(self, key: ApiKey, usage: KeyUsage) -> None:
        rate, burst = float(key.rate or 0.0), int(key.burst or 1)
        now = self.clock()
        if usage.fresh:
            usage.tokens, usage.refilled_at, usage.fresh = float(burst), now, False
        usage.tokens = min(float(burst), usage.tokens + (now - usage.refilled_at) * rate)
        usage.refilled_at = now
        if usage.tokens >= 1.0:
            usage.tokens -= 1.0
            return
        usage.limited += 1
        wait = (1.0 - usage.tokens) / rate
        raise KeyLimited(
            f"Rate limit reached for key '{key.id}' on requests: limit {key.rate:g}/s with a burst of {burst}, "
            f"used {burst}. Please try again in {duration_text(wait)}.",
            dimension="requests", limit=burst, remaining=0, reset=(burst - usage.tokens) / rate, retry_after=wait)

    def remaining(self, key: ApiKey) -> Optional[int]:
        """Whole requests left in the key's bucket now (None without a rate)."""
        if key.rate is None:
            return None
        usage = self.usage(key.id)
        if usage.fresh:
            return int(key.burst or 1)
        tokens = min(float(key.burst or 1), usage.tokens + (self.clock() - usage.refilled_at) * key.rate)
        return int(tokens)

    def snapshot(self, current: Iterable[str]) -> Dict[str, KeyUsage]:
        """Usage of the current keys and of revoked ones still in flight; forgets
        revoked keys once their last request is done."""
        keep = set(current)
        for key_id in [k for k, u in self._usage.items() if k not in keep and u.in_flight <= 0]:
            del self._usage[key_id]
        return {k: self.usage(k) for k in sorted(keep | set(self._usage))}
