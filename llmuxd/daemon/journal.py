"""Logging for llmuxd: journald when systemd runs us, readable lines otherwise.

Three ways out, picked by `setup_logging()`:
- run by systemd with stderr connected to journald ($JOURNAL_STREAM names
  stderr's dev:inode) and the native socket reachable: each record goes to
  /run/systemd/journal/socket as one datagram with structured fields
  (LLMUX_EVENT=, LLMUX_MODEL=, MESSAGE_ID=, PRIORITY=), so `journalctl
  LLMUX_EVENT=switch_finished` works without python3-systemd;
- the same, but no native socket (or a send fails): "<N>message" lines on
  stderr, which journald turns into priorities (`journalctl -p warning`);
- anywhere else (a terminal, tests, embedded mode): plain timestamped lines.

Events worth finding later are logged with `log_event()`; their kinds and
MESSAGE_IDs are the constants below, in one place.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import IO, Any, Callable

JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_STREAM_ENV = "JOURNAL_STREAM"
SYSLOG_IDENTIFIER = "llmuxd"
FIELDS_ATTR = "journal_fields"  # LogRecord attribute carrying structured fields
FIELD_PREFIX = "LLMUX_"

# Event kinds (LLMUX_EVENT=) and their MESSAGE_IDs (journalctl MESSAGE_ID=…).
EVENT_DAEMON_READY = "daemon_ready"
EVENT_DAEMON_STOPPING = "daemon_stopping"
EVENT_RELOAD_FINISHED = "reload_finished"
EVENT_RELOAD_FAILED = "reload_failed"
EVENT_CONFIG_INVALID = "config_invalid"
EVENT_UNITS_ADOPTED = "units_adopted"
EVENT_SWITCH_STARTED = "switch_started"
EVENT_SWITCH_FINISHED = "switch_finished"
EVENT_SWITCH_FAILED = "switch_failed"
EVENT_MODEL_STATE_CHANGED = "model_state_changed"
EVENT_STATE_CORRUPT = "state_corrupt"
EVENT_STATE_WRITE_FAILED = "state_write_failed"
EVENT_BACKEND_ORPHAN = "backend_orphan"
# checkpoint images in object storage (started and progress share the *_progress kind)
EVENT_CHECKPOINT_UPLOAD_PROGRESS = "checkpoint_upload_progress"
EVENT_CHECKPOINT_UPLOADED = "checkpoint_uploaded"
EVENT_CHECKPOINT_UPLOAD_FAILED = "checkpoint_upload_failed"
EVENT_CHECKPOINT_DOWNLOAD_PROGRESS = "checkpoint_download_progress"
EVENT_CHECKPOINT_DOWNLOADED = "checkpoint_downloaded"
EVENT_CHECKPOINT_DOWNLOAD_FAILED = "checkpoint_download_failed"
# API keys (llmuxd/http/auth.py): refusals are summed per minute, never one line per request
EVENT_KEYS_LOADED = "keys_loaded"
EVENT_KEY_REFUSED = "key_refused"
EVENT_KEY_LIMITED = "key_limited"

MESSAGE_IDS: dict[str, str] = {
    EVENT_KEYS_LOADED: "8989c7cfcfda453aa1d7418f256b186a",
    EVENT_KEY_REFUSED: "b43d28630b2543f08ab5c33a862c5bdc",
    EVENT_KEY_LIMITED: "b2889c5ecf444ae69e7e8f9096d6d77d",
    EVENT_DAEMON_READY: "40de0105bb9c4bfd9c34b4cada352581",
    EVENT_DAEMON_STOPPING: "136904e19b44458f84a7d1ec4a74cdeb",
    EVENT_RELOAD_FINISHED: "ced473e73a6b4b35bc5699d58cd694c7",
    EVENT_RELOAD_FAILED: "70a3d048197a4e70a74e3e7512e41420",
    EVENT_CONFIG_INVALID: "c26eded54ec84e878b8a01e6bd7b8db3",
    EVENT_UNITS_ADOPTED: "03a04b54657549778466e3830df4315a",
    EVENT_SWITCH_STARTED: "54e5f8faa1bc4054b224ffc3b5e617a8",
    EVENT_SWITCH_FINISHED: "3585faa4a72e46a9befc8378ce8056fd",
    EVENT_SWITCH_FAILED: "daa25ea94035486d93658bec385f9120",
    EVENT_MODEL_STATE_CHANGED: "76c89949c37642d187f424aa1c2ec1fd",
    EVENT_STATE_CORRUPT: "0b1c87ff4379404f9f4d31a9dab4df31",
    EVENT_STATE_WRITE_FAILED: "c866c97d8ec94066947b4398404785e4",
    EVENT_BACKEND_ORPHAN: "74d7e0d68c804c2eaec4bfd16bf1eeb0",
    EVENT_CHECKPOINT_UPLOAD_PROGRESS: "6f4ee2cc8958ce6b03a739888badd8e1",
    EVENT_CHECKPOINT_UPLOADED: "4ae8f0af019a46b0e54ca4018670ea03",
    EVENT_CHECKPOINT_UPLOAD_FAILED: "34024e12e8f91bcf66ccde774a88f178",
    EVENT_CHECKPOINT_DOWNLOAD_PROGRESS: "3218332d81c07ec279fb8d4659107c63",
    EVENT_CHECKPOINT_DOWNLOADED: "9b95ddb7ece69e3dec4059e7cddaae61",
    EVENT_CHECKPOINT_DOWNLOAD_FAILED: "352e025103bfbd7726d41be482aeab51",
}

_FIELD_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


def syslog_priority(levelno: int) -> int:
    """logging level -> syslog priority (what journald's PRIORITY= means)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_field_name(key: str) -> str:
    """A Python keyword (`from_model`) as an llmux journal field (LLMUX_FROM_MODEL);
    names already upper case (MESSAGE_ID, LLMUX_MODEL) are kept."""
    name = key if key.isupper() else FIELD_PREFIX + key.upper()
    if not _FIELD_NAME_RE.match(name):
        raise ValueError(f"invalid journal field name {name!r}: use A-Z, 0-9 and _ (max 64)")
    return name


def encode_fields(fields: Mapping[str, object]) -> bytes:
    """The native journal protocol: KEY=VALUE lines; values with a newline
    use the binary form KEY\\n<u64 little-endian length>VALUE\\n."""
    out = bytearray()
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def journal_stream_matches(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` (stderr) is the journald stream systemd connected us to."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    expected = env.get(JOURNAL_STREAM_ENV)
    if not expected or stream is None:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class PrefixFormatter(logging.Formatter):
    """'<N>logger: message', every line prefixed, for stderr read by journald
    (a traceback keeps its priority on each line)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class PlainFormatter(logging.Formatter):
    """Timestamped lines for a terminal or a test log."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


class JournalHandler(logging.Handler):
    """Sends records to journald over its native socket with structured fields.

    Unlike python-systemd's JournalHandler this forwards the fields passed
    through `log_event()` (record attribute `journal_fields`). A record the
    socket refuses goes to `fallback` instead, so a journald restart or a
    missing socket never loses a line or raises into the daemon.
    """

    def __init__(self, socket_path: str = JOURNAL_SOCKET, *, identifier: str = SYSLOG_IDENTIFIER,
                 fallback: logging.Handler | None = None):
        super().__init__()
        self.socket_path = socket_path
        self.identifier = identifier
        self.fallback = fallback
        self._sock: socket.socket | None = None
        self.setFormatter(logging.Formatter("%(message)s"))

    def fields_for(self, record: logging.LogRecord) -> dict[str, object]:
        fields: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": syslog_priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        extra = getattr(record, FIELDS_ATTR, None) or {}
        for key, value in extra.items():
            if value is not None:
                fields[key] = value
        return fields

    def send(self, payload: bytes) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto(payload, self.socket_path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too big for one datagram
                raise
            self._send_memfd(self._sock, payload)

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        """Large entries travel as a sealed memfd passed with SCM_RIGHTS."""
        fd = os.memfd_create("llmuxd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                               0, self.socket_path)
        finally:
            os.close(fd)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(encode_fields(self.fields_for(record)))
        except Exception:  # noqa: BLE001 - logging must never take the daemon down
            if self.fallback is not None:
                self.fallback.handle(record)
            else:
                self.handleError(record)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def log_event(logger: logging.Logger, kind: str, message: str, *args: object,
              level: int = logging.INFO, model: str | None = None, exc_info: object = None,
              **fields: object) -> None:
    """Log `message % args` as event `kind` with journal fields:
    LLMUX_EVENT=kind, MESSAGE_ID=<kind's id>, LLMUX_MODEL=model and LLMUX_<KEY>
    for each keyword (None values are left out)."""
    journal_fields: dict[str, object] = {"LLMUX_EVENT": kind}
    if kind in MESSAGE_IDS:
        journal_fields["MESSAGE_ID"] = MESSAGE_IDS[kind]
    if model is not None:
        journal_fields["LLMUX_MODEL"] = model
    for key, value in fields.items():
        if value is not None:
            journal_fields[journal_field_name(key)] = value
    logger.log(level, message, *args, exc_info=exc_info, extra={FIELDS_ATTR: journal_fields},
               stacklevel=2)


#: (direction, state) of a checkpoint transfer -> its event kind
_TRANSFER_KINDS = {
    ("upload", "started"): EVENT_CHECKPOINT_UPLOAD_PROGRESS,
    ("upload", "progress"): EVENT_CHECKPOINT_UPLOAD_PROGRESS,
    ("upload", "finished"): EVENT_CHECKPOINT_UPLOADED,
    ("upload", "failed"): EVENT_CHECKPOINT_UPLOAD_FAILED,
    ("download", "started"): EVENT_CHECKPOINT_DOWNLOAD_PROGRESS,
    ("download", "progress"): EVENT_CHECKPOINT_DOWNLOAD_PROGRESS,
    ("download", "finished"): EVENT_CHECKPOINT_DOWNLOADED,
    ("download", "failed"): EVENT_CHECKPOINT_DOWNLOAD_FAILED,
}


def transfer_reporter(logger: logging.Logger) -> Callable[[Any], None]:
    """A reporter for llmuxd.checkpoint.store: each transfer event (a
    `TransferEvent`) as a journal event with LLMUX_BYTES, LLMUX_TOTAL_BYTES,
    LLMUX_RATE_BPS, LLMUX_FILES, LLMUX_GENERATION, LLMUX_URL, LLMUX_ENDPOINT."""

    def report(event: Any) -> None:
        kind = _TRANSFER_KINDS[(event.direction, event.state)]
        log_event(logger, kind, "%s", event.message(), level=event.level, model=event.model, bytes=event.done,
                  total_bytes=event.total, rate_bps=int(event.rate), files=event.files, generation=event.generation,
                  url=event.url, endpoint=event.endpoint, transfer_state=event.state, error=event.error)
    return report


_INSTALLED_ATTR = "_llmuxd_handler"


def setup_logging(level: int = logging.INFO, *, stream: IO[str] | None = None,
                  env: Mapping[str, str] | None = None, journal_socket: str = JOURNAL_SOCKET,
                  identifier: str = SYSLOG_IDENTIFIER, logger: logging.Logger | None = None
                  ) -> logging.Handler:
    """Install the right handler on `logger` (the root logger) and return it.
    Calling it again replaces the handler it installed before."""
    stream = sys.stderr if stream is None else stream
    target = logging.getLogger() if logger is None else logger
    stderr_handler = logging.StreamHandler(stream)
    handler: logging.Handler
    if journal_stream_matches(stream, env):
        stderr_handler.setFormatter(PrefixFormatter())
        if os.path.exists(journal_socket):
            handler = JournalHandler(journal_socket, identifier=identifier, fallback=stderr_handler)
        else:
            handler = stderr_handler
    else:
        stderr_handler.setFormatter(PlainFormatter())
        handler = stderr_handler
    for old in list(target.handlers):
        if getattr(old, _INSTALLED_ATTR, False):
            target.removeHandler(old)
            old.close()
    setattr(handler, _INSTALLED_ATTR, True)
    target.addHandler(handler)
    target.setLevel(level)
    return handler
