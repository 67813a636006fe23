"""Per-model `max_concurrency`: at most that many leases on a model at once.

The rest wait in the model's own queue, as requests for a sleeping model do,
with the same deadline timer and Retry-After (llmuxd/switcher.py): a queued
request is granted when a lease comes back. Without a limit nothing here runs
(the switcher's fast path only looks at `ModelRuntime.max_concurrency`).
"""

from __future__ import annotations

from typing import Any, Optional

from llmuxd.switching.state import ModelRuntime


def limit_of(model_config: Any) -> Optional[int]:
    """The configured limit of a model (None: unlimited; configs without the key too)."""
    return getattr(model_config, "max_concurrency", None)


def room(m: ModelRuntime, wanted: int) -> int:
    """How many of `wanted` queued requests may get a lease on `m` now."""
    if m.max_concurrency is None:
        return wanted
    return max(0, min(wanted, m.max_concurrency - m.in_flight))


def has_room_now(m: ModelRuntime) -> bool:
    """A new request may take a lease at once: below the limit and nobody queued before it."""
    return m.max_concurrency is None or (m.in_flight < m.max_concurrency and not m.queue)
