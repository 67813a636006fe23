"""Weights and KV cache as real torch allocations: `llmux-vllm-sim --device cuda|cpu`.

The default simulator only books "GPU memory" in a JSON ledger. With `--device`
it holds real tensors on the device, so what llmux promises can be measured
with the tools a person would use (NVML / nvidia-smi on a GPU, the process RSS
on the CPU):

- start: the weights file (deterministic bytes, written once under the cache
  directory) is read into device memory; the KV cache takes what
  `--gpu-memory-utilization` leaves, as vLLM sizes it.
- sleep level 1: the weights are copied to host memory (pinned on CUDA, as
  vLLM's CuMemAllocator does), then weights and KV cache are freed on the device.
- sleep level 2: both are freed; the wake allocates fresh (uninitialised) weights
  and `reload_weights` reads the file again.
- every inference reads the weights through a small matmul; its result is the
  weights checksum, which the answer carries, so a wake that brought back the
  wrong bytes gives a different answer and the post-wake canary catches it.

A weights-out of one model and a weights-in of another (an overlapped switch,
issue #26) are copies in two simulator processes, so in two CUDA contexts with
streams of their own: they run at once, as two vLLM servers' copies do. The
host link's pacing (`--h2d-gbps`/`--d2h-gbps`, llmuxd/sim/link.py) runs beside
the real copy; the slower of the two sets the time.

torch is optional (`pip install 'llmux[torch]'`); only this module imports it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

from llmuxd.sim.weights import BLOCK

#: what `--device` says when torch is missing: one line, naming the extra
TORCH_MISSING = ("llmux-vllm-sim: --device needs PyTorch, which is not installed here; "
                 "install the extra: pip install 'llmux[torch]'")
#: bytes per sampled row of the checksum matmul, and rows sampled per MiB block
ROW = 4096
#: columns of the checksum matrix: small integers, so the float32 sums are exact
CHECK_COLUMNS = 4
#: what vLLM keeps back from the KV cache for activations (its profiling run)
ACTIVATION_RESERVE = 256 << 20
#: read the weights file in pieces this large
READ_CHUNK = 64 << 20
GIB = 1 << 30


def import_torch() -> Any:
    """torch, or SystemExit with the one-line hint naming the extra."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Failed to initialize NumPy": not needed here
            import torch
    except ImportError:
        raise SystemExit(TORCH_MISSING) from None
    return torch


class DeviceOutOfMemory(Exception):
    """An allocation on the device failed (torch.OutOfMemoryError's message)."""


@dataclass(frozen=True)
class DeviceSizes:
    weights_bytes: int
    kv_bytes: int


def kv_cache_bytes(*, device: str, weights_bytes: int, utilization: float, explicit_gib: float | None,
                   total_bytes: int | None, free_bytes: int | None, cpu_space_gib: float | None) -> int:
    """The KV cache size as vLLM arrives at it.

    CUDA: `utilization` x total device memory is this instance's share; the
    weights and an activation reserve come out of it, the KV cache gets the
    rest (an error like vLLM's when the share is not free, or leaves nothing).
    CPU: vLLM reads VLLM_CPU_KVCACHE_SPACE (GiB) instead; without it the
    simulator takes as much as the weights. `--sim-kv-cache-gib` overrides both.
    """
    if explicit_gib is not None:
        return int(explicit_gib * GIB)
    if device == "cpu":
        return int(cpu_space_gib * GIB) if cpu_space_gib is not None else weights_bytes
    assert total_bytes is not None and free_bytes is not None
    requested = int(utilization * total_bytes)
    if free_bytes < requested:
        raise ValueError(
            f"Free memory on device ({free_bytes / GIB:.2f}/{total_bytes / GIB:.2f} GiB) on startup is less "
            f"than desired GPU memory utilization ({utilization}, {requested / GIB:.2f} GiB). Decrease GPU "
            "memory utilization or reduce GPU memory used by other processes.")
    kv = requested - weights_bytes - ACTIVATION_RESERVE
    if kv <= 0:
        raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                         "when initializing the engine.")
    return kv


class DeviceState:
    """The tensors one simulated engine holds, and what sleep and wake do to them."""

    def __init__(self, torch: Any, device: str, weights_path: str, weights_bytes: int, *,
                 utilization: float = 0.9, kv_gib: float | None = None, drop_cache: bool = True):
        if weights_bytes <= 0 or weights_bytes % BLOCK:
            raise ValueError(f"weights size must be a positive number of MiB, got {weights_bytes} bytes")
        self.torch = torch
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.weights_path = weights_path
        self.weights_bytes = weights_bytes
        self.utilization = utilization
        self.kv_gib = kv_gib
        self.drop_cache = drop_cache
        self.kv_bytes = 0
        self.weights: Any = None  # uint8 tensor on the device
        self.host_copy: Any = None  # uint8 tensor in host memory (level 1)
        self.kv: Any = None
        self._probe: Any = None

    # -- allocation ------------------------------------------------------------

    def _alloc(self, nbytes: int, *, zero: bool) -> Any:
        torch = self.torch
        try:
            make = torch.zeros if zero else torch.empty
            return make(nbytes, dtype=torch.uint8, device=self.device)
        except torch.cuda.OutOfMemoryError as exc:  # also torch.OutOfMemoryError
            raise DeviceOutOfMemory(str(exc).splitlines()[0]) from None
        except RuntimeError as exc:  # CPU: "DefaultCPUAllocator: can't allocate memory"
            raise DeviceOutOfMemory(str(exc).splitlines()[0]) from None

    def _free_cached(self) -> None:
        """Give freed device memory back to the driver, as vLLM's sleep does."""
        if self.is_cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            host_empty = getattr(self.torch._C, "_host_emptyCache", None)
            if host_empty is not None:  # pinned host blocks are cached too
                host_empty()

    def sizes(self) -> DeviceSizes:
        return DeviceSizes(self.weights_bytes, self.kv_bytes)

    def load(self) -> None:
        """Cold start: weights from the file onto the device, then the KV cache."""
        if self.is_cuda:
            free, total = self.torch.cuda.mem_get_info(self.device)
        else:
            free = total = None
        self.weights = self._alloc(self.weights_bytes, zero=False)
        self._read_file_into(self.weights)
        cpu_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
        self.kv_bytes = kv_cache_bytes(
            device=self.device.type, weights_bytes=self.weights_bytes, utilization=self.utilization,
            explicit_gib=self.kv_gib, total_bytes=total, free_bytes=free,
            cpu_space_gib=float(cpu_space) if cpu_space else None)
        self.kv = self._alloc(self.kv_bytes, zero=True) if self.kv_bytes > 0 else None

    def _read_file_into(self, dst: Any) -> None:
        """Read the weights file into `dst` (device tensor), through a host buffer
        on CUDA (pinned) and straight into the tensor's memory on the CPU."""
        torch = self.torch
        with open(self.weights_path, "rb", buffering=0) as f:
            if self.drop_cache and hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass
            if not self.is_cuda:
                _read_exact(f, _writable_view(dst), self.weights_bytes, self.weights_path)
                return
            staging = torch.empty(min(READ_CHUNK, self.weights_bytes), dtype=torch.uint8, pin_memory=True)
            view = _writable_view(staging)
            pos = 0
            while pos < self.weights_bytes:
                n = min(len(view), self.weights_bytes - pos)
                _read_exact(f, view[:n], n, self.weights_path)
                dst[pos:pos + n].copy_(staging[:n])
                torch.cuda.synchronize(self.device)  # the staging buffer is reused
                pos += n
            del staging
        self._free_cached()  # the pinned staging buffer goes back to the OS

    # -- sleep and wake --------------------------------------------------------

    def offload_weights(self) -> None:
        """Level 1: keep a host copy of the weights, free them on the device."""
        if self.weights is None or self.host_copy is not None:
            return
        torch = self.torch
        host = torch.empty(self.weights_bytes, dtype=torch.uint8, pin_memory=self.is_cuda)
        host.copy_(self.weights)
        self.host_copy = host
        self.weights = None
        self._free_cached()

    def discard_weights(self) -> None:
        """Level 2: the weights are gone; a wake gets fresh memory."""
        self.weights = None
        self.host_copy = None
        self._free_cached()

    def free_kv(self) -> None:
        self.kv = None
        self._free_cached()

    def wake_weights(self) -> None:
        """Back on the device: the host copy after level 1, uninitialised memory after level 2."""
        if self.weights is not None:
            return
        weights = self._alloc(self.weights_bytes, zero=False)
        if self.host_copy is not None:
            weights.copy_(self.host_copy, non_blocking=False)
            self.host_copy = None
        self.weights = weights
        self._free_cached()  # the pinned copy goes back to the OS

    def wake_kv(self) -> None:
        if self.kv is None and self.kv_bytes > 0:
            self.kv = self._alloc(self.kv_bytes, zero=True)

    def reload(self, corrupt: bool = False) -> None:
        """`collective_rpc reload_weights`: read the file again into the weights.
        `corrupt` (the `wrong_reload` fault) zeroes the first MiB afterwards: a
        reload that answered 200 but brought back the wrong bytes."""
        if self.weights is None:
            raise RuntimeError("the weights are asleep")
        self._read_file_into(self.weights)
        if corrupt:
            self.weights[:BLOCK].zero_()

    def release(self) -> None:
        self.weights = self.host_copy = self.kv = None
        self._free_cached()

    # -- reading the weights ---------------------------------------------------

    def checksum(self) -> str:
        """A small matmul over one 4 KiB row of every MiB of the weights (the row
        moves from block to block): 16 hex digits, equal on every device for the
        same bytes, different after a wrong reload or a wake without one."""
        weights = self.weights  # a sleep in another thread may drop the attribute meanwhile
        if weights is None:
            return ""
        torch = self.torch
        blocks = self.weights_bytes // BLOCK
        rows_per_block = BLOCK // ROW
        if self._probe is None:
            picks = (torch.arange(blocks, device=self.device) * 7919) % rows_per_block
            matrix = (torch.arange(ROW * CHECK_COLUMNS, device=self.device) % 7 + 1).to(torch.float32)
            self._probe = (picks, matrix.reshape(ROW, CHECK_COLUMNS))
        picks, matrix = self._probe
        rows = weights.view(blocks, rows_per_block, ROW)[torch.arange(blocks, device=self.device), picks]
        sums = rows.to(torch.float32) @ matrix  # exact: at most 4096 * 255 * 7 < 2**24
        data = sums.to(torch.int64).cpu().tolist()
        return hashlib.sha256(repr(data).encode()).hexdigest()[:16]

    # -- report ------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        held = (self.weights_bytes if self.weights is not None else 0) + (self.kv_bytes if self.kv is not None else 0)
        out: dict[str, Any] = {
            "device": str(self.device),
            "device_bytes": held,
            "weights_on_device": self.weights is not None,
            "kv_cache_bytes": self.kv_bytes,
            "kv_cache_on_device": self.kv is not None,
            "host_copy_bytes": self.weights_bytes if self.host_copy is not None else 0,
            "host_copy_pinned": bool(self.host_copy is not None and self.host_copy.is_pinned()),
        }
        if self.is_cuda:
            out["torch_allocated_bytes"] = int(self.torch.cuda.memory_allocated(self.device))
            out["torch_reserved_bytes"] = int(self.torch.cuda.memory_reserved(self.device))
        return out


def _writable_view(tensor: Any) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor as a writable buffer (no numpy needed)."""
    n = tensor.numel()
    return memoryview((ctypes.c_ubyte * n).from_address(tensor.data_ptr())).cast("B")


def _read_exact(f: Any, view: memoryview, size: int, path: str) -> None:
    pos = 0
    while pos < size:
        n = f.readinto(view[pos:min(size, pos + READ_CHUNK)])
        if not n:
            raise OSError(f"weights file {path} ended after {pos} of {size} bytes")
        pos += n
