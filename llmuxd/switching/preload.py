"""`preload: [models]`: wake the listed models at start and after each reload.

In the listed order, each model is switched to as any control switch is
(through its group's worker, I6): started if it never ran, woken otherwise,
within its group's budget. A group that holds one model awake therefore ends
with the last listed one awake and the earlier ones put to sleep with their own
eviction, started and warm where that eviction keeps the process. A failure is
logged and shown in the progress, and the next model is tried: the daemon
never stops for a preload.

Progress per model: ``pending``, ``starting``, ``awake``, ``asleep`` (woken,
then evicted for a later one or another request), ``failed: REASON``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional

from llmuxd.events import PreloadProgress

log = logging.getLogger(__name__)


class Preloader:
    """The preload run of one `Switcher`."""

    def __init__(self, switcher: Any):
        self._s = switcher
        self._task: "Optional[asyncio.Task[None]]" = None
        self._progress: Dict[str, str] = {}

    def targets(self) -> List[str]:
        """The configured preload list as model names (aliases resolved, unknown ones left out:
        the config check refuses them)."""
        config = self._s._config
        resolve = getattr(config, "resolve_model", None)
        names = []
        for entry in getattr(config, "preload", None) or []:
            name = resolve(entry) if resolve is not None else (entry if entry in config.models else None)
            if name is not None and name not in names:
                names.append(name)
        return names

    def run(self) -> None:
        """Start a preload run (a run still going is abandoned: its switch finishes on its own)."""
        self.stop()
        names = self.targets()
        self._progress = {name: "pending" for name in names}
        if names and not self._s._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(names), name="llmux-preload")

    def stop(self) -> "Optional[asyncio.Task[None]]":
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            return task
        return None

    def progress(self) -> Dict[str, str]:
        out = {}
        for name, word in self._progress.items():
            m = self._s._models.get(name)
            if word == "awake" and (m is None or not m.awake):
                word = "asleep"
            out[name] = word
        return out

    def _set(self, name: str, word: str) -> None:
        self._progress[name] = word
        self._s._emit(PreloadProgress(name, word))

    async def _run(self, names: List[str]) -> None:
        for i, name in enumerate(names, 1):
            self._set(name, "starting")
            log.info("preload %d/%d: starting and waking '%s'", i, len(names), name)
            try:
                await self._s.switch(name, wait=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported; the next model is tried
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("preload %d/%d: '%s' failed: %s", i, len(names), name, reason)
                self._set(name, f"failed: {reason}")
                continue
            log.info("preload %d/%d: '%s' is awake", i, len(names), name)
            self._set(name, "awake")
