"""The console's event hub: `llmuxd.events` as one numbered stream, fanned out to readers.

It reads what already happens — the switcher's events (`Switcher.subscribe`),
the front end's one request summary per request, the log sources' lines — and
numbers each as an SSE frame, encoded once. It holds no state of its own
beyond bounded histories of that stream (the last switches, requests and
frames, for readers that connect or resume, and request summaries gathered for
a quarter second into one frame); the models' state always comes
from `Switcher.status()` through `status_fn`.

The request path never waits on a reader: `publish` appends a frame to each
reader's bounded queue and returns. A reader that falls `queue_limit` frames
behind loses its queue and is told so (a `gap` event, then a fresh
`snapshot`), rather than slowing anyone down.

Ids are `EPOCH:SEQ`; EPOCH changes each time llmuxd starts, so a reader
resuming with `Last-Event-ID` from an earlier run gets a `gap` ("llmuxd
restarted") and a snapshot, and one resuming within the same run gets exactly
the frames it missed, or a `gap` saying how many are gone.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from llmuxd.events import (
    LogLine, ModeChanged, ModelIdle, ModelStateChanged, PreloadProgress, RequestServed, SwitchFinished,
    SwitchStarted,
)

#: frames kept for readers that resume (Last-Event-ID)
RING_FRAMES = 4096
#: frames one reader may have waiting before it is resynchronised
QUEUE_LIMIT = 2048
#: switches and requests kept for a reader's first snapshot
SWITCHES_KEPT = 50
REQUESTS_KEPT = 300
#: log lines in a snapshot
SNAPSHOT_LOG_LINES = 600
#: seconds between looks at the switcher's status while someone reads (queue depth
#: and in-flight counts change without an event of their own)
STATUS_EVERY = 1.0
#: seconds request summaries are gathered into one `requests` frame (one per request
#: would cost the request path a JSON encoding and a frame each)
REQUESTS_EVERY = 0.25
#: seconds a burst of changes is coalesced into one status frame
STATUS_COALESCE = 0.25


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)


def wire(event: Any) -> Tuple[str, Dict[str, Any]]:
    """(SSE event type, JSON-able data) of one `llmuxd.events` value."""
    if isinstance(event, SwitchStarted):
        return "switch_started", {**vars(event), "at": time.time()}
    if isinstance(event, SwitchFinished):
        return "switch_finished", {**vars(event), "at": time.time()}
    if isinstance(event, ModelStateChanged):
        return "state", dict(vars(event))
    if isinstance(event, ModeChanged):
        return "mode", dict(vars(event))
    if isinstance(event, LogLine):
        return "log", event._asdict()
    if isinstance(event, ModelIdle):
        return "idle", {**vars(event), "at": time.time()}
    if isinstance(event, PreloadProgress):
        return "preload", dict(vars(event))
    raise TypeError(f"not a host event: {event!r}")


class Reader:
    """One follower of the stream: its bounded queue of encoded frames."""

    def __init__(self, limit: int):
        self.limit = limit
        self.frames: Deque[bytes] = collections.deque()
        self.wake = asyncio.Event()
        #: frames dropped since the last resync (0: none)
        self.dropped = 0
        self.closed = False

    def offer(self, frame: bytes) -> None:
        if self.dropped:
            self.dropped += 1
            return
        if len(self.frames) >= self.limit:
            self.dropped = len(self.frames) + 1
            self.frames.clear()
        else:
            self.frames.append(frame)
        self.wake.set()

    def take(self) -> List[bytes]:
        frames = list(self.frames)
        self.frames.clear()
        self.wake.clear()
        return frames


class EventHub:
    """Numbers host events into SSE frames and hands them to every reader."""

    def __init__(self, status_fn: Callable[[], Dict[str, Any]], *,
                 logs: Any = None, ring: int = RING_FRAMES, queue_limit: int = QUEUE_LIMIT,
                 epoch: Optional[str] = None):
        self.status_fn = status_fn
        self.logs = logs
        self.epoch = epoch or os.urandom(4).hex()
        self.seq = 0
        self.queue_limit = queue_limit
        self._ring: Deque[Tuple[int, bytes]] = collections.deque(maxlen=ring)
        self._readers: List[Reader] = []
        self.switches: Deque[Dict[str, Any]] = collections.deque(maxlen=SWITCHES_KEPT)
        self.running: Dict[str, Dict[str, Any]] = {}  # group -> its switch in progress
        self.requests: Deque[Dict[str, Any]] = collections.deque(maxlen=REQUESTS_KEPT)
        self._last_status = ""
        self._status_handle: Optional[asyncio.Handle] = None
        self._served: List[RequestServed] = []
        self._served_handle: Optional[asyncio.Handle] = None
        self._ticker: Optional[asyncio.Task] = None
        self.closed = False

    # -- what goes in ---------------------------------------------------------

    def on_event(self, event: Any) -> None:
        """Listener for `Switcher.subscribe`, the front end's request summaries and log lines."""
        if type(event) is RequestServed:  # the request path: gather, encode later in one frame
            self._served.append(event)
            if self._served_handle is None:
                try:
                    self._served_handle = asyncio.get_running_loop().call_later(
                        REQUESTS_EVERY, self.flush_requests)
                except RuntimeError:  # no loop (a plain call): at once
                    self.flush_requests()
            return
        kind, data = wire(event)
        if kind == "switch_started":
            self.running[data["group"]] = data
        elif kind == "switch_finished":
            self.running.pop(data["group"], None)
            self.switches.append(data)
        if kind != "log":
            self.status_soon()
        self.publish(kind, data)

    def publish(self, kind: str, data: Any) -> None:
        self.seq += 1
        frame = f"id: {self.epoch}:{self.seq}\nevent: {kind}\ndata: {_dumps(data)}\n\n".encode()
        self._ring.append((self.seq, frame))
        for reader in self._readers:
            reader.offer(frame)

    def flush_requests(self) -> None:
        """The gathered request summaries as one `requests` frame (a list, oldest first)."""
        self._served_handle = None
        served, self._served = self._served, []
        if not served:
            return
        data = [r._asdict() for r in served]
        self.requests.extend(data)
        self.publish("requests", data)
        self.status_soon()

    def status_soon(self) -> None:
        """A status frame shortly (changes in one burst make one frame)."""
        if self._status_handle is None and self._readers:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._status_handle = loop.call_later(STATUS_COALESCE, self._emit_status)

    def _emit_status(self) -> None:
        self._status_handle = None
        if not self._readers:
            return
        try:
            status = self.status_fn()
        except Exception as exc:  # noqa: BLE001 - the stream says so rather than dying
            status = {"error": f"status unavailable: {exc}"}
        text = _dumps(status)
        if text != self._last_status:
            self._last_status = text
            self.publish("status", status)

    async def _tick(self) -> None:
        while self._readers:
            await asyncio.sleep(STATUS_EVERY)
            self._emit_status()

    # -- readers --------------------------------------------------------------

    def snapshot(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Everything a reader needs to draw the page from scratch."""
        try:
            status = self.status_fn()
        except Exception as exc:  # noqa: BLE001
            status = {"error": f"status unavailable: {exc}"}
        self.flush_requests()  # what the snapshot shows is not sent again
        logs = []
        if self.logs is not None:
            logs = [line._asdict() for line in self.logs.recent()[-SNAPSHOT_LOG_LINES:]]
        return {
            "epoch": self.epoch, "seq": self.seq, "status": status,
            "switches": list(self.switches), "running": list(self.running.values()),
            "requests": list(self.requests), "logs": logs,
            "logs_unavailable": getattr(self.logs, "unavailable", None) if self.logs is not None
            else "no log source in this daemon",
            **(extra or {}),
        }

    def snapshot_frame(self, extra: Optional[Dict[str, Any]] = None) -> bytes:
        data = _dumps(self.snapshot(extra))  # first: it may publish gathered requests (seq moves)
        return f"id: {self.epoch}:{self.seq}\nevent: snapshot\ndata: {data}\n\n".encode()

    def gap_frame(self, reason: str, missed: Optional[int]) -> bytes:
        return f"event: gap\ndata: {_dumps({'reason': reason, 'missed': missed})}\n\n".encode()

    def connect(self, last_event_id: Optional[str], extra: Optional[Dict[str, Any]] = None) -> Reader:
        """A new reader with its first frames queued: the frames it missed when it
        resumes within this run, else (a gap notice and) a snapshot. Synchronous,
        so no event falls between what it is given and what it is sent next."""
        reader = Reader(self.queue_limit)
        for frame in self._first_frames(last_event_id, extra):
            reader.frames.append(frame)
        reader.wake.set()
        if self.closed:  # llmuxd is stopping: this reader gets its frames, then `bye`
            reader.closed = True
            return reader
        self._readers.append(reader)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())
        return reader

    def _first_frames(self, last_event_id: Optional[str], extra: Optional[Dict[str, Any]]) -> List[bytes]:
        if not last_event_id:
            return [self.snapshot_frame(extra)]
        epoch, _, seq_text = last_event_id.strip().partition(":")
        try:
            seq = int(seq_text)
        except ValueError:
            return [self.gap_frame(f"unknown Last-Event-ID {last_event_id[:40]!r}", None),
                    self.snapshot_frame(extra)]
        if epoch != self.epoch:
            return [self.gap_frame("llmuxd restarted since that event", None), self.snapshot_frame(extra)]
        if seq > self.seq or seq < 0:
            return [self.gap_frame(f"Last-Event-ID {seq} is not from this stream", None),
                    self.snapshot_frame(extra)]
        oldest = self._ring[0][0] if self._ring else self.seq + 1
        if seq + 1 < oldest:
            return [self.gap_frame("those events are no longer kept", oldest - seq - 1),
                    self.snapshot_frame(extra)]
        return [frame for s, frame in self._ring if s > seq]

    def resync(self, reader: Reader, extra: Optional[Dict[str, Any]] = None) -> List[bytes]:
        """The frames that replace what a reader lost by falling behind."""
        dropped, reader.dropped = reader.dropped, 0
        return [self.gap_frame("this reader fell behind; events were dropped", dropped),
                self.snapshot_frame(extra)]

    def disconnect(self, reader: Reader) -> None:
        reader.closed = True
        if reader in self._readers:
            self._readers.remove(reader)

    @property
    def readers(self) -> int:
        return len(self._readers)

    def close(self) -> None:
        """End every reader's stream (llmuxd is stopping): their handlers return."""
        self.closed = True
        for reader in list(self._readers):
            reader.closed = True
            reader.wake.set()
        if self._status_handle is not None:
            self._status_handle.cancel()
            self._status_handle = None
        if self._served_handle is not None:
            self._served_handle.cancel()
            self._served_handle = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
