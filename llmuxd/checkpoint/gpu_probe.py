"""How much GPU memory a backend's processes hold, behind one small interface.

vLLM's /sleep answers 200 even when it freed nothing (vLLM #32714, #47654,
expandable_segments), so llmux measures instead of trusting the answer. Sources,
best first: NVML (nvidia-ml-py, optional), `nvidia-smi --query-compute-apps`,
and on machines without a GPU the simulator's ledger. A probe that cannot tell
answers None, and the caller skips the check rather than guessing.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Mapping, Protocol, Sequence

log = logging.getLogger("llmuxd.checkpoint.gpu_probe")

#: the simulator's ledger path variable (llmuxd/sim/server.py)
SIM_LEDGER_ENV = "LLMUX_SIM_GPU_LEDGER"
NVIDIA_SMI_QUERY = ("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
PROBE_TIMEOUT = 20.0


class GpuProbe(Protocol):
    name: str

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        """MiB of GPU memory held by `pids` together; None when unknown."""


class NullProbe:
    """No way to measure here (no GPU, no simulator ledger)."""

    name = "none"

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        return None


class LedgerProbe:
    """The simulator's GPU ledger: reservations by the simulator's own PID."""

    name = "sim-ledger"

    def __init__(self, path: str):
        self.path = path

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        from llmuxd.sim.ledger import GpuLedger  # the simulator room; only needed without a GPU

        # prune=False: entries of simulators in another PID namespace (the test
        # systemd) must be read as they are, not judged from here
        try:
            snapshot = await asyncio.to_thread(GpuLedger(self.path).snapshot, False)
        except (OSError, ValueError) as exc:  # unreadable: "cannot tell", never a failed sleep
            log.warning("GPU ledger %s unreadable: %s", self.path, exc)
            return None
        return sum(mb for pid, mb in snapshot["by_pid"].items() if pid in set(pids))


class NvidiaSmiProbe:
    """`nvidia-smi --query-compute-apps=pid,used_memory`: per-process MiB."""

    name = "nvidia-smi"

    def __init__(self, path: str = "nvidia-smi"):
        self.path = path

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.path, *NVIDIA_SMI_QUERY, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("nvidia-smi failed (%s); GPU memory after sleep not verified", exc)
            return None
        if proc.returncode != 0:
            log.warning("nvidia-smi exited %s: %s", proc.returncode, err.decode(errors="replace").strip()[:200])
            return None
        return sum(parse_compute_apps(out.decode(errors="replace")).get(pid, 0) for pid in set(pids))


def parse_compute_apps(text: str) -> dict[int, int]:
    """`1234, 5120` lines → {1234: 5120}; a PID on several GPUs is summed."""
    used: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        try:
            mb = int(float(parts[1]))
        except ValueError:
            continue  # "[N/A]" on some drivers
        used[int(parts[0])] = used.get(int(parts[0]), 0) + mb
    return used


class NvmlProbe:
    """NVML through nvidia-ml-py (`import pynvml`), when installed and a driver answers."""

    name = "nvml"

    def __init__(self, nvml: object):
        self._nvml = nvml

    @classmethod
    def try_create(cls) -> "NvmlProbe | None":
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - not installed, or no driver: try the next source
            return None
        return cls(pynvml)

    def _usage(self, pids: Sequence[int]) -> int:
        nvml = self._nvml
        wanted = set(pids)
        total = 0
        for index in range(nvml.nvmlDeviceGetCount()):  # type: ignore[attr-defined]
            handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):  # type: ignore[attr-defined]
                if proc.pid in wanted and proc.usedGpuMemory:
                    total += proc.usedGpuMemory // (1 << 20)
        return total

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        try:
            return await asyncio.to_thread(self._usage, pids)
        except Exception as exc:  # noqa: BLE001
            log.warning("NVML query failed (%s); GPU memory after sleep not verified", exc)
            return None


def default_probe(backend_env: Mapping[str, str] | None = None, *, nvidia_smi: str = "nvidia-smi") -> GpuProbe:
    """The best source for one backend: its simulator ledger when it is a simulator
    with one, else NVML, else nvidia-smi, else nothing."""
    ledger = (backend_env or {}).get(SIM_LEDGER_ENV)
    if ledger:
        return LedgerProbe(ledger)
    nvml = NvmlProbe.try_create()
    if nvml is not None:
        return nvml
    if shutil.which(nvidia_smi):
        return NvidiaSmiProbe(nvidia_smi)
    return NullProbe()


async def driver_versions(nvidia_smi: str = "nvidia-smi") -> tuple[str | None, str | None]:
    """(driver version, CUDA version) of this host when a GPU driver answers, else (None, None).

    Recorded in image manifests: a CUDA checkpoint does not restore under another driver."""
    nvml = NvmlProbe.try_create()
    if nvml is not None:
        try:
            lib = nvml._nvml
            driver = lib.nvmlSystemGetDriverVersion()  # type: ignore[attr-defined]
            cuda = lib.nvmlSystemGetCudaDriverVersion()  # type: ignore[attr-defined]
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
            return driver, f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception:  # noqa: BLE001 - fall back to nvidia-smi
            pass
    if not shutil.which(nvidia_smi):
        return None, None
    try:
        proc = await asyncio.create_subprocess_exec(
            nvidia_smi, "--query-gpu=driver_version", "--format=csv,noheader",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return None, None
    lines = out.decode(errors="replace").split()
    return (lines[0] if proc.returncode == 0 and lines else None), None
