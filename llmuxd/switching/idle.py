"""Idle eviction (`idle_timeout`, llama-swap's ttl, Ollama's keep_alive).

A model awake with no request in flight, none queued and none for its
idle_timeout is put to sleep with its own eviction (its override, else its
configured one), through its group's worker like any control sleep (I6), which
frees its GPU memory for other work. 0 means never. Rules:

- the time counts from the model's last lease taken or given back, so a long
  stream keeps it awake however long it runs;
- a model stays awake at least `policy.min_active` after it woke (the switcher's
  cooldown; check-config warns when idle_timeout is shorter);
- the model pinned in manual mode is never evicted for being idle (the pin
  says keep it).

One task per switcher, started only while some model has a timeout: it
sleeps until the nearest deadline (at most `MAX_NAP` seconds, so a reload or
new traffic is seen soon) and looks again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from llmuxd.events import ModelIdle
from llmuxd.switching.state import Mode, ModelRuntime, ModelState

log = logging.getLogger(__name__)

#: longest nap between two looks at the models (seconds)
MAX_NAP = 1.0


class IdleEvictions:
    """The idle-eviction watcher of one `Switcher` (it reads the switcher's models)."""

    def __init__(self, switcher: Any):
        self._s = switcher
        self._task: "Optional[asyncio.Task[None]]" = None
        #: models whose idle sleep is queued or running (no second one meanwhile)
        self._evicting: set = set()

    def timeout_of(self, name: str) -> float:
        config = self._s._config
        if name not in config.models:
            return 0.0
        own = getattr(config.models[name], "idle_timeout", None)
        return float(own if own is not None else getattr(config.policy, "idle_timeout", 0.0) or 0.0)

    def configure(self) -> None:
        """(Re)start the watcher when some model has a timeout; called at start and reload."""
        if self._s._closed or not any(self.timeout_of(n) > 0 for n in self._s._models):
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="llmux-idle")

    def stop(self) -> "Optional[asyncio.Task[None]]":
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    def left(self, m: ModelRuntime) -> Optional[float]:
        """Seconds until `m` is evicted for being idle; None when it is not counting down
        (no timeout, not awake, busy, pinned, or being evicted already)."""
        due = self._due(m)
        return None if due is None else max(0.0, due - self._s._clock())

    def still_due(self, m: ModelRuntime) -> bool:
        """At the worker, just before the sleep: nothing came in since it was queued."""
        due = self._due(m, queued=True)
        now = self._s._clock()
        if due is None or due > now:
            return False
        eviction = self._s.eviction_for(m.name)
        idle_for = now - m.last_used
        timeout = self.timeout_of(m.name)
        log.info("model '%s' idle for %.0fs (idle_timeout %gs): putting it to sleep with %s",
                 m.name, idle_for, timeout, eviction)
        self._s._emit(ModelIdle(m.name, idle_for, timeout, str(eviction)))
        return True

    def _due(self, m: ModelRuntime, queued: bool = False) -> Optional[float]:
        timeout = self.timeout_of(m.name)
        if timeout <= 0 or m.state is not ModelState.ACTIVE or m.busy or m.removed:
            return None
        if m.name in self._evicting and not queued:
            return None
        if self._s._mode is Mode.MANUAL and self._s._pinned == m.name:
            return None
        due = m.last_used + timeout
        if m.activated_at is not None:
            due = max(due, m.activated_at + float(self._s._config.policy.min_active))
        return due

    async def _watch(self) -> None:
        while True:
            nap = MAX_NAP
            now = self._s._clock()
            for m in list(self._s._models.values()):
                due = self._due(m)
                if due is None:
                    continue
                if due <= now:
                    self._evict(m)
                else:
                    nap = min(nap, due - now)
            if not any(self.timeout_of(n) > 0 for n in self._s._models):
                self._task = None
                return  # configure() starts it again when a reload sets one
            await self._s._sleep(max(nap, 0.001))

    def _evict(self, m: ModelRuntime) -> None:
        self._evicting.add(m.name)
        fut = self._s._submit(m, "idle_sleep")
        fut.add_done_callback(lambda f, name=m.name: self._done(name, f))

    def _done(self, name: str, fut: "asyncio.Future[None]") -> None:
        self._evicting.discard(name)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.warning("idle eviction of '%s' failed: %s", name, exc)
