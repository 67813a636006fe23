"""Transfer progress: bytes, total and rate, reported at intervals.

The store reports `TransferEvent`s to a callable; by default they become
plain log lines. The daemon passes a reporter that logs them as journal
events (LLMUX_EVENT=checkpoint_upload_progress ..., see
llmuxd/daemon/journal.py), so `journalctl LLMUX_MODEL=qwen` shows how far an
upload or download is.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("llmuxd.checkpoint.store")

UPLOAD = "upload"
DOWNLOAD = "download"
STARTED, PROGRESS, FINISHED, FAILED = "started", "progress", "finished", "failed"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass(frozen=True)
class TransferEvent:
    direction: str  # upload | download
    state: str  # started | progress | finished | failed
    model: str
    url: str  # s3://bucket/prefix/model/generations/<generation>/
    endpoint: str
    generation: str
    done: int
    total: int
    files: int
    elapsed: float
    error: str | None = None

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def message(self) -> str:
        verb = "uploading" if self.direction == UPLOAD else "downloading"
        where = f"{'to' if self.direction == UPLOAD else 'from'} {self.url} at {self.endpoint}"
        amount = f"{human_bytes(self.done)} of {human_bytes(self.total)}"
        if self.state == STARTED:
            return f"model {self.model}: {verb} checkpoint image {where}: {human_bytes(self.total)} in {self.files} files"
        if self.state == PROGRESS:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            left = (self.total - self.done) / self.rate if self.rate > 0 else None
            eta = f", about {human_seconds(left)} left" if left is not None else ""
            return f"model {self.model}: {verb} checkpoint image: {amount} ({pct:.0f}%), " \
                   f"{human_bytes(self.rate)}/s{eta}"
        if self.state == FINISHED:
            done = "uploaded" if self.direction == UPLOAD else "downloaded"
            return f"model {self.model}: checkpoint image {done} {where}: {amount} in " \
                   f"{human_seconds(self.elapsed)} ({human_bytes(self.rate)}/s)"
        return f"model {self.model}: checkpoint image {self.direction} failed after {amount}: {self.error}"

    @property
    def level(self) -> int:
        return logging.WARNING if self.state == FAILED else logging.INFO


Reporter = Callable[[TransferEvent], None]


def log_transfer(event: TransferEvent) -> None:
    """The default reporter: one plain log line per event."""
    log.log(event.level, "%s", event.message())


class ProgressMeter:
    """Counts bytes from any thread and reports at most every `interval` seconds."""

    def __init__(self, report: Reporter, direction: str, model: str, url: str, endpoint: str, generation: str,
                 total: int, files: int, *, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._report, self._clock, self.interval = report, clock, interval
        self._fixed = dict(direction=direction, model=model, url=url, endpoint=endpoint, generation=generation,
                           total=total, files=files)
        self._lock = threading.Lock()
        self.done = 0
        self._start = clock()
        self._last = self._start

    def _event(self, state: str, error: str | None = None) -> TransferEvent:
        return TransferEvent(state=state, done=self.done, elapsed=self._clock() - self._start, error=error,
                             **self._fixed)  # type: ignore[arg-type]

    def _emit(self, event: TransferEvent) -> None:
        try:
            self._report(event)
        except Exception:  # noqa: BLE001 - a reporter must not break a transfer
            log.exception("transfer progress reporter failed")

    def started(self) -> None:
        self._emit(self._event(STARTED))

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = self._clock()
            due = now - self._last >= self.interval
            if due:
                self._last = now
                event = self._event(PROGRESS)
        if due:
            self._emit(event)

    def finished(self) -> TransferEvent:
        event = self._event(FINISHED)
        self._emit(event)
        return event

    def failed(self, error: str) -> None:
        self._emit(self._event(FAILED, error))
