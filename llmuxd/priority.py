"""A request's priority: a plain value that travels from its API key to its waiter.

It lives at the bottom of the package so that the key store (below `http`), the
switcher and the policies can all name it without importing each other: policies
count waiters by priority and never see keys (DESIGN.md §2).
"""

from __future__ import annotations

import enum


class Priority(str, enum.Enum):
    """Interactive requests count before batch ones in every policy; batch is never starved."""

    INTERACTIVE = "interactive"
    BATCH = "batch"

    def __str__(self) -> str:
        return self.value


DEFAULT_PRIORITY = Priority.INTERACTIVE
