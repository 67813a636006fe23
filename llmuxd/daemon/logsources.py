"""Where the console's log lines come from: one small protocol, two sources (DESIGN.md §2).

- Embedded mode (`llmuxd run`): `CapturedOutput`, a logging handler on the
  `llmuxd` logger. Backend output reaches it through `llmuxd.backend` (the
  subprocess runtime forwards each line with the model attached); the daemon's
  own INFO+ lines come with it.
- System mode: `JournalFollower`, `journalctl --follow -o json` on the models'
  units (llmux.slice) and llmuxd.service — the journal by unit, never files.

Both keep a bounded buffer per model (plus one for the daemon's lines), so a
console that connects sees the recent past, and hand every new line to one
sink (the console's event hub). A sink must not block: it is called on the
event loop, from the logging call or the journal reader.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import shutil
import time
from typing import Callable, Deque, Dict, Iterable, List, Optional, Protocol

from llmuxd.events import LogLine
from llmuxd.names import JOURNAL_MODEL_FIELD, SLICE, model_from_unit

log = logging.getLogger(__name__)

#: lines kept per model (and for the daemon's own lines)
LINES_PER_MODEL = 300
#: the key of the daemon's own buffer
DAEMON = ""
#: the longest line kept, in characters (a runaway line must not fill memory)
LINE_MAX = 4000

Sink = Callable[[LogLine], None]


class LogSource(Protocol):
    """What the console needs from a log source."""

    def recent(self, model: Optional[str] = None) -> List[LogLine]:
        """The buffered lines (one model's, or all in time order)."""

    def follow(self, sink: Optional[Sink]) -> None:
        """Send each new line to `sink` (None: stop sending)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _Buffers:
    """Bounded per-model line buffers and the sink: the part both sources share."""

    def __init__(self, per_model: int = LINES_PER_MODEL):
        self._per_model = per_model
        self._lines: Dict[str, Deque[LogLine]] = {}
        self._sink: Optional[Sink] = None

    def follow(self, sink: Optional[Sink]) -> None:
        self._sink = sink

    def add(self, line: LogLine) -> None:
        key = line.model if line.source == "backend" and line.model else DAEMON
        buf = self._lines.get(key)
        if buf is None:
            buf = self._lines[key] = collections.deque(maxlen=self._per_model)
        buf.append(line)
        sink = self._sink
        if sink is not None:
            try:
                sink(line)
            except Exception:  # noqa: BLE001 - a faulty reader never breaks logging
                pass

    def recent(self, model: Optional[str] = None) -> List[LogLine]:
        if model is not None:
            return list(self._lines.get(model, ()))
        merged: List[LogLine] = []
        for buf in list(self._lines.values()):
            merged.extend(buf)
        merged.sort(key=lambda line: line.at)
        return merged


def _level(levelno: int) -> str:
    return logging.getLevelName(levelno).lower() if levelno else "info"


class CapturedOutput(_Buffers, logging.Handler):
    """Embedded mode: the backends' captured output and the daemon's own lines."""

    def __init__(self, per_model: int = LINES_PER_MODEL, daemon_level: int = logging.INFO,
                 logger: str = "llmuxd"):
        _Buffers.__init__(self, per_model)
        logging.Handler.__init__(self, level=logging.DEBUG)
        self._daemon_level = daemon_level
        self._logger = logging.getLogger(logger)
        self._saved_level: Optional[int] = None

    def emit(self, record: logging.LogRecord) -> None:
        model = getattr(record, "llmux_model", None)
        if record.name == "llmuxd.backend" and model:
            text = record.getMessage()
            prefix = f"[{model}] "
            if text.startswith(prefix):
                text = text[len(prefix):]
            self.add(LogLine(record.created, "backend", model, text[:LINE_MAX], "info"))
            return
        if record.levelno < self._daemon_level:
            return
        fields = getattr(record, "journal_fields", None) or {}
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the caller's bug
            text = str(record.msg)
        self.add(LogLine(record.created, "llmuxd", fields.get(JOURNAL_MODEL_FIELD), text[:LINE_MAX],
                         _level(record.levelno)))

    async def start(self) -> None:
        self._logger.addHandler(self)
        # backend lines are INFO on llmuxd.backend: make sure they reach us
        backend = logging.getLogger("llmuxd.backend")
        if not backend.isEnabledFor(logging.INFO):
            self._saved_level = backend.level
            backend.setLevel(logging.INFO)

    async def stop(self) -> None:
        self._logger.removeHandler(self)
        if self._saved_level is not None:
            logging.getLogger("llmuxd.backend").setLevel(self._saved_level)
            self._saved_level = None


#: journald PRIORITY -> level name
_PRIORITY = {0: "critical", 1: "critical", 2: "critical", 3: "error", 4: "warning", 5: "info",
             6: "info", 7: "debug"}


def line_from_journal(entry: dict, daemon_unit: str) -> Optional[LogLine]:
    """A LogLine from one `journalctl -o json` entry, or None for one that is not ours."""
    message = entry.get("MESSAGE")
    if isinstance(message, list):  # journalctl writes non-UTF-8 messages as byte arrays
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode("utf-8", "replace")
    if not isinstance(message, str):
        return None
    try:
        at = int(entry.get("__REALTIME_TIMESTAMP", 0)) / 1e6 or time.time()
    except (TypeError, ValueError):
        at = time.time()
    try:
        level = _PRIORITY.get(int(entry.get("PRIORITY", 6)), "info")
    except (TypeError, ValueError):
        level = "info"
    unit = entry.get("_SYSTEMD_UNIT") or entry.get("UNIT") or ""
    model = model_from_unit(unit)
    if model is not None:
        return LogLine(at, "backend", model, message[:LINE_MAX], level)
    if unit == daemon_unit or entry.get("SYSLOG_IDENTIFIER") == "llmuxd":
        field = entry.get(JOURNAL_MODEL_FIELD)
        return LogLine(at, "llmuxd", field if isinstance(field, str) else None, message[:LINE_MAX], level)
    return None


class JournalFollower(_Buffers):
    """System mode: the models' units and llmuxd's own unit, read from the journal.

    Runs `journalctl --follow -o json -n LINES _SYSTEMD_SLICE=llmux.slice +
    _SYSTEMD_UNIT=llmuxd.service` and keeps it running (restarted after a pause
    if it exits, from the last entry's cursor).
    Where journalctl is missing, the console says logs are unavailable."""

    RESTART_AFTER = 5.0

    def __init__(self, per_model: int = LINES_PER_MODEL, daemon_unit: str = "llmuxd.service",
                 journalctl: Optional[str] = None, extra_args: Iterable[str] = ()):
        super().__init__(per_model)
        self.daemon_unit = daemon_unit
        self.journalctl = journalctl or shutil.which("journalctl")
        self._extra = list(extra_args)
        self._task: Optional[asyncio.Task] = None
        self._proc: Optional[asyncio.subprocess.Process] = None
        self.unavailable: Optional[str] = None if self.journalctl else "journalctl is not installed"
        #: the last entry read: a restarted journalctl goes on after it (no line twice)
        self._cursor: Optional[str] = None

    def argv(self) -> List[str]:
        start = f"--after-cursor={self._cursor}" if self._cursor else f"--lines={self._per_model}"
        # matches, not --unit=GLOB: journalctl expands a glob once, against the units
        # already in the journal, so a model started later would never be followed
        return [str(self.journalctl), "--follow", "--output=json", start, "--no-pager", *self._extra,
                f"_SYSTEMD_SLICE={SLICE}", "+", f"_SYSTEMD_UNIT={self.daemon_unit}"]

    async def start(self) -> None:
        if self.journalctl and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _run(self) -> None:
        while True:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                    limit=1 << 20)
                assert self._proc.stdout is not None
                while True:
                    raw = await self._proc.stdout.readline()
                    if not raw:
                        break
                    try:
                        entry = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(entry, dict):
                        continue
                    cursor = entry.get("__CURSOR")
                    if isinstance(cursor, str):
                        self._cursor = cursor
                    line = line_from_journal(entry, self.daemon_unit)
                    if line is not None:
                        self.add(line)
                await self._proc.wait()
                self.unavailable = f"journalctl exited with status {self._proc.returncode}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logs are optional; the daemon is not
                self.unavailable = f"cannot read the journal: {exc}"
                log.warning("console logs: %s", self.unavailable)
            await asyncio.sleep(self.RESTART_AFTER)
            self.unavailable = None
