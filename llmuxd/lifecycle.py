"""What the switcher needs from whatever runs the backends.

The switcher (pure logic) drives models through this protocol; the
orchestrator (`llmuxd/orchestrator.py`) implements it on a runtime, tests
implement it with fakes. Keeping it here, beside neither, is what lets the
dependency arrows point one way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from llmuxd.eviction import Eviction


class BackendState(str, enum.Enum):
    """Where a model's backend is, as the orchestrator sees it."""

    NOT_STARTED = "not_started"
    STARTING = "starting"
    READY = "ready"  # awake and answering
    SLEEPING = "sleeping"  # vLLM sleep and/or freeze, process alive
    CHECKPOINTED = "checkpointed"  # CRIU image on disk, no process
    STOPPED = "stopped"  # was running, stopped by eviction
    FAILED = "failed"


class ModelPhase(str, enum.Enum):
    """Finer than BackendState: says *how* a model sleeps (frozen, checkpointed...)."""

    NOT_STARTED = "not_started"
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"  # vLLM sleep, process running
    FROZEN = "frozen"  # process frozen (weights possibly slept first)
    CHECKPOINTED = "checkpointed"
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BackendDetail:
    """A backend's state plus what status pages show with it: how it sleeps
    (the eviction it sleeps with, after any escalation) and why it failed."""

    state: BackendState
    eviction: Optional[Eviction] = None
    reason: Optional[str] = None


class Backends(Protocol):
    """Per-model lifecycle operations. Every method raises `BackendError`
    (model, phase, reason) on failure and leaves the model in a state
    `state()` reports truthfully."""

    async def ensure_awake(self, model: str) -> None:
        """Start (cold), restore, or wake the model until it is READY."""

    async def sleep(self, model: str, eviction: Eviction) -> None:
        """Evict an awake model: weights step, then process step."""

    async def stop(self, model: str) -> None:
        """Stop the backend (SIGTERM, grace, SIGKILL). Never raises for an
        already-stopped model."""

    def state(self, model: str) -> BackendState: ...

    # Optional: `detail(model) -> BackendDetail`. The switcher's status uses it
    # when present (the orchestrator has it) and falls back to `state()`.

    def endpoint(self, model: str) -> str:
        """Base URL of the backend, e.g. http://127.0.0.1:8101."""

    def on_unexpected_exit(self, callback: Callable[[str, str], None]) -> None:
        """Register callback(model, reason) for a backend that died on its own."""
