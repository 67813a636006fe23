"""state.json: what llmuxd must remember across a restart.

Config says what should be; this file keeps what an operator changed at run
time and what the daemon learned, so `systemctl restart llmuxd` loses none of
it (invariant I8): per-model eviction overrides, mode and pin, learned switch
costs, quarantine verdicts. Backends themselves survive as systemd units and
are adopted, not stored here.

Writes are atomic (temp file, fsync, rename, fsync of the directory), so a
crash leaves the old or the new file, never half of one. A file that cannot
be read back is set aside with a warning and the daemon starts from config; a
write that fails (disk full, read-only) is logged and the daemon keeps
serving. Neither ever stops the daemon.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmuxd.daemon.journal import EVENT_STATE_CORRUPT, EVENT_STATE_WRITE_FAILED, log_event
from llmuxd.eviction import Eviction, EvictionError
from llmuxd.runtime.unit_setup import user_ids

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
MODES = ("auto", "manual")


@dataclass
class DaemonState:
    """The persisted picture. Every field has a default: an empty state is valid."""

    mode: str = "auto"
    pinned: str | None = None
    evictions: dict[str, str] = field(default_factory=dict)  # model -> "offload+keep_running"
    switch_costs: dict[str, float] = field(default_factory=dict)  # "a→b" -> seconds
    quarantine: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "pinned": self.pinned,
            "evictions": dict(sorted(self.evictions.items())),
            "switch_costs": dict(sorted(self.switch_costs.items())),
            "quarantine": dict(sorted(self.quarantine.items())),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = STATE_FILE) -> "DaemonState":
        """Read what can be trusted; an entry that does not parse is dropped
        with a warning naming it, the rest is kept."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        state = cls()
        mode = data.get("mode", "auto")
        if mode in MODES:
            state.mode = mode
        else:
            log.warning("%s: mode %r is not one of %s; using auto", source, mode, ", ".join(MODES))
        pinned = data.get("pinned")
        if pinned is None or isinstance(pinned, str):
            state.pinned = pinned
        else:
            log.warning("%s: pinned %r is not a model name; ignoring it", source, pinned)
        for model, value in _mapping(data, "evictions", source).items():
            try:
                state.evictions[model] = str(Eviction.parse(value))
            except EvictionError as exc:
                log.warning("%s: evictions.%s: %s; using the configured eviction", source, model, exc)
        for key, value in _mapping(data, "switch_costs", source).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                state.switch_costs[key] = float(value)
            else:
                log.warning("%s: switch_costs.%s: %r is not a duration; dropping it", source, key, value)
        for model, verdict in _mapping(data, "quarantine", source).items():
            if isinstance(verdict, dict):
                state.quarantine[model] = verdict
            else:
                log.warning("%s: quarantine.%s: %r is not an object; dropping it", source, model, verdict)
        return state


def _mapping(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        log.warning("%s: %s should be an object, got %s; ignoring it", source, key, type(value).__name__)
        return {}
    return value


class StateStore:
    """Reads and atomically writes `<state_dir>/state.json`."""

    def __init__(self, state_dir: str | os.PathLike[str], filename: str = STATE_FILE):
        self.directory = Path(state_dir)
        self.path = self.directory / filename
        self._last_written: bytes | None = None

    def ensure_directory(self, owner: str | None = None) -> bool:
        """Create the state directory (0750) if it is missing; False if it cannot be.

        A directory created here belongs to `owner` (and its primary group),
        as the package's tmpfiles rule makes it (`d /var/lib/llmux 0750 llmux
        llmux`): it is also the working directory of the backends, which run
        as that user. An existing directory is left as it is."""
        created = not self.directory.exists()
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create state directory %s: %s; run-time changes will not "
                        "survive a restart", self.directory, exc)
            return False
        ids = user_ids(owner) if created else None
        if ids is not None:
            try:
                os.chown(self.directory, *ids)
                os.chmod(self.directory, 0o750)  # not narrowed by the unit's UMask=0077
            except OSError as exc:
                log.warning("cannot give state directory %s to user %s: %s; backends running as %s "
                            "start in / instead", self.directory, owner, exc.strerror or exc, owner)
        return True

    def load(self) -> DaemonState:
        """The saved state; defaults when there is none or it is unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return DaemonState()
        except OSError as exc:
            log.warning("cannot read %s: %s; starting from the configuration", self.path, exc)
            return DaemonState()
        try:
            state = DaemonState.from_dict(json.loads(raw), str(self.path))
        except (ValueError, UnicodeDecodeError) as exc:
            aside = self._set_aside()
            log_event(log, EVENT_STATE_CORRUPT,
                      "ignoring corrupt %s (%s); starting from the configuration%s",
                      self.path, _one_line(exc), f", kept a copy as {aside}" if aside else "",
                      level=logging.WARNING, path=str(self.path))
            return DaemonState()
        self._last_written = raw
        return state

    def save(self, state: DaemonState) -> bool:
        """Write atomically; True when the file now holds `state`. Unchanged
        state is not rewritten. Failures are logged, never raised."""
        data = (json.dumps(state.to_dict(), indent=2, sort_keys=False) + "\n").encode()
        if data == self._last_written:
            return True
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self._fsync_directory()
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            log_event(log, EVENT_STATE_WRITE_FAILED,
                      "cannot save %s: %s; still serving, but run-time changes since the last "
                      "save will not survive a restart", self.path, exc.strerror or exc,
                      level=logging.ERROR, path=str(self.path))
            return False
        self._last_written = data
        return True

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _set_aside(self) -> Path | None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError:
            return None
        return aside


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
