"""Simulated model weights: a real file, read into real host RAM.

A cold start, a level-2 reload and the host RAM a sleeping model holds are
what make vLLM switches expensive; the simulator reproduces them with a file
of deterministic bytes per model, created once under the cache directory and
read back (after dropping it from the page cache, so the read is real I/O).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

BLOCK = 1 << 20  # 1 MiB


def weights_path(cache_dir: str, model: str, size_mb: int) -> str:
    digest = hashlib.sha256(model.encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")[-40:] or "model"
    return os.path.join(cache_dir, f"{safe}-{digest}-{size_mb}MB.weights")


def ensure_weights_file(cache_dir: str, model: str, size_mb: int) -> str:
    """Create the weights file for `model` unless it exists. The content is a
    function of the model name only, so every process agrees on it."""
    path = weights_path(cache_dir, model, size_mb)
    if os.path.exists(path) and os.path.getsize(path) == size_mb * BLOCK:
        return path
    if not os.path.isdir(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
        try:
            os.chmod(cache_dir, 0o1777)  # shared like /tmp: units may run as other users
        except OSError:
            pass
    base = bytearray(hashlib.shake_256(model.encode()).digest(BLOCK))
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".weights-")
    try:
        with os.fdopen(fd, "wb") as f:
            for i in range(size_mb):
                base[:8] = i.to_bytes(8, "little")
                f.write(base)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: concurrent creators just race to the same content
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_weights(path: str, into: bytearray | None = None, drop_cache: bool = True) -> bytearray:
    """Read the whole file into host RAM (into `into` when given)."""
    size = os.path.getsize(path)
    buf = into if into is not None and len(into) == size else bytearray(size)
    with open(path, "rb", buffering=0) as f:
        if drop_cache and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        view = memoryview(buf)
        pos = 0
        while pos < size:
            n = f.readinto(view[pos : pos + 16 * BLOCK])
            if not n:
                break
            pos += n
    return buf


def weights_fingerprint(buf: bytearray | None) -> str:
    """A cheap digest of a few sampled pages: equal for correctly loaded
    weights, different for a zeroed (discarded, not reloaded) buffer."""
    if not buf:
        return ""
    h = hashlib.sha256()
    step = max(1, len(buf) // 16)
    for off in range(0, len(buf), step):
        h.update(buf[off : off + 4096])
    return h.hexdigest()[:16]
