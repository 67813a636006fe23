"""A GPU-memory ledger shared by every simulator on a host.

There is no GPU in tests, so "GPU memory" is a JSON file: a capacity and one
reservation per simulator process. Every change happens under `fcntl.flock`
on the file itself, so simulators started by different runtimes (subprocess,
systemd units) see one consistent budget, and a start or wake that would
exceed it fails the way CUDA does (out of memory).

Entries whose process is gone are pruned (so a SIGKILLed simulator does not
leak memory forever, as a dead CUDA context does not). A pid is only judged
by a process in the same pid namespace, and its start time is recorded so a
reused pid is not mistaken for the owner.

The file format (and its locking) is llmuxd/gpu_ledger.py's, which llmuxd's GPU probe
reads too: the simulator depends on it, never the reverse.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from llmuxd import gpu_ledger
from llmuxd.gpu_ledger import DEFAULT_CAPACITY_MB

__all__ = ["DEFAULT_CAPACITY_MB", "GpuLedger", "GpuOutOfMemory"]


class GpuOutOfMemory(Exception):
    """A reservation would exceed the ledger's capacity (CUDA OOM)."""

    def __init__(self, wanted_mb: int, free_mb: int, capacity_mb: int):
        super().__init__(
            f"CUDA out of memory. Tried to allocate {wanted_mb} MiB. GPU 0 has a total capacity "
            f"of {capacity_mb} MiB of which {free_mb} MiB is free."
        )
        self.wanted_mb = wanted_mb
        self.free_mb = free_mb
        self.capacity_mb = capacity_mb


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot), None if not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # the command is in parentheses and may contain spaces: split after the last ')'
    fields = data[data.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None  # zombie or dead: its memory is gone
    return int(fields[19])


def _alive(entry: dict[str, Any], pid: int, my_ns: str) -> bool:
    if entry.get("ns", my_ns) != my_ns:
        return True  # another pid namespace: cannot judge, keep it
    start = _start_time(pid)
    if start is None:
        return False
    return entry.get("start") in (None, start)


class GpuLedger:
    """The ledger at `path`. Reading is safe from any process; writing is
    what a simulator does for itself (`reserve`)."""

    def __init__(self, path: str, capacity_mb: int | None = None):
        self.path = path
        self._capacity_mb = capacity_mb

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[tuple[Any, dict[str, Any]]]:
        with gpu_ledger.locked(self.path, exclusive, self._capacity_mb) as locked:
            yield locked

    @staticmethod
    def _write(f: Any, data: dict[str, Any]) -> None:
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, sort_keys=True))
        f.flush()

    @staticmethod
    def _prune(data: dict[str, Any]) -> bool:
        my_ns = _pid_namespace()
        res = data["reservations"]
        dead = [p for p, e in res.items() if not _alive(e, int(p), my_ns)]
        for p in dead:
            del res[p]
        return bool(dead)

    def reserve(self, mb: int, *, model: str = "", pid: int | None = None) -> None:
        """Set this process's reservation to `mb` (absolute, not a delta).
        Raises GpuOutOfMemory, leaving the old reservation, if it does not fit."""
        pid = os.getpid() if pid is None else pid
        with self._locked(exclusive=True) as (f, data):
            self._prune(data)
            res = data["reservations"]
            old = int(res.get(str(pid), {}).get("mb", 0))
            used_by_others = sum(int(e.get("mb", 0)) for p, e in res.items() if p != str(pid))
            capacity = int(data["capacity_mb"])
            if mb > old and used_by_others + mb > capacity:
                self._write(f, data)
                raise GpuOutOfMemory(mb - old, max(0, capacity - used_by_others - old), capacity)
            if mb <= 0:
                res.pop(str(pid), None)
            else:
                res[str(pid)] = {
                    "mb": int(mb),
                    "model": model,
                    "ns": _pid_namespace(),
                    "start": _start_time(pid),
                    "updated": time.time(),
                }
            self._write(f, data)

    def release(self, pid: int | None = None) -> None:
        """Drop the reservation of `pid` (default: this process)."""
        self.reserve(0, pid=pid)

    def snapshot(self, prune: bool = True) -> dict[str, Any]:
        """`{capacity_mb, used_mb, free_mb, by_pid: {pid: mb}, models: {pid: model}}`.
        `prune=False` only reads (read access to the file is enough)."""
        with self._locked(exclusive=prune) as (f, data):
            if prune and self._prune(data):
                self._write(f, data)
            return gpu_ledger.summary(data)
