"""The GPU ledger's file format: where hosts without a GPU keep "GPU memory".

llmux-vllm-sim writes it (llmuxd/sim/ledger.py: reservations, pruning, out of memory);
llmuxd's `gpu_probe: ledger` and the tests' stand-in nvidia-smi only read it. Both sides
import this module, so the product never imports the simulator. A JSON object, changed
only under `fcntl.flock` on the file itself::

    {"capacity_mb": 81920,
     "reservations": {"<pid>": {"mb": 16000, "model": "a", "ns": "pid:[4026531836]",
                                "start": 123456, "updated": 1700000000.0}}}

`ns` is the writer's PID namespace and `start` its start time (clock ticks since boot), so
only a reader in the same namespace judges whether an entry's process still lives.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

#: the model environment variable naming a simulator's ledger (`gpu_probe: ledger` reads it)
LEDGER_ENV = "LLMUX_SIM_GPU_LEDGER"
#: the model environment variable with a simulator's GPU need in MiB: what verified eviction
#: expects to see before its sleep, as it expects gpu_memory_gib of a real model
SIZE_ENV = "LLMUX_SIM_GPU_MB"
DEFAULT_CAPACITY_MB = 81920  # one 80 GiB GPU


def normalized(raw: str, capacity_mb: int | None = None) -> dict[str, Any]:
    """The file's text as a ledger: anything unreadable is an empty one."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    data.setdefault("capacity_mb", int(capacity_mb if capacity_mb is not None else DEFAULT_CAPACITY_MB))
    if not isinstance(data.get("reservations"), dict):
        data["reservations"] = {}
    return data


@contextmanager
def locked(path: str, exclusive: bool, capacity_mb: int | None = None) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(open file, data) under flock. Shared (read-only) access opens the file read-only and
    never creates it: a reader such as llmuxd's GPU probe may run where the ledger's directory
    is read-only to it (llmuxd.service has ProtectSystem=strict); a missing ledger reads as empty."""
    if exclusive:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if os.fstat(fd).st_size == 0:
                os.fchmod(fd, 0o666)  # simulators may run as other users (User= of their unit)
        except OSError:
            pass
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            fd = os.open(os.devnull, os.O_RDONLY)
    with os.fdopen(fd, "r+" if exclusive else "r") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield f, normalized(f.read(), capacity_mb)


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """`{capacity_mb, used_mb, free_mb, by_pid: {pid: mb}, models: {pid: model}}` of a ledger."""
    res = data["reservations"]
    by_pid = {int(p): int(e.get("mb", 0)) for p, e in res.items()}
    used = sum(by_pid.values())
    capacity = int(data["capacity_mb"])
    return {"capacity_mb": capacity, "used_mb": used, "free_mb": capacity - used, "by_pid": by_pid,
            "models": {int(p): e.get("model", "") for p, e in res.items()}}


def read(path: str) -> dict[str, Any]:
    """The ledger at `path` as it is (no pruning: read access is enough), as `summary()`."""
    with locked(path, exclusive=False) as (_f, data):
        return summary(data)
