"""How much GPU memory a backend's processes hold, behind one small interface.

vLLM's /sleep answers 200 even when it freed nothing (vLLM #32714, #47654,
expandable_segments), so llmux measures instead of trusting the answer. The
source is configuration (`gpu_probe:`), never guessed from a backend's
environment:

- `nvml`: NVML through nvidia-ml-py (`import pynvml`), per process and GPU;
- `nvidia-smi`: `nvidia-smi --query-compute-apps=pid,used_memory`;
- `ledger`: llmux-vllm-sim's JSON ledger, the file a model's
  LLMUX_SIM_GPU_LEDGER names (tests and demos without a GPU);
- `none`; and `auto`: NVML when pynvml and a driver answer, else nvidia-smi
  when it runs and answers the query, else none.

A probe that cannot tell (no driver, "[N/A]" for a process) answers None, and
the caller skips the check rather than guessing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from typing import Callable, Iterable, Mapping, Protocol, Sequence

log = logging.getLogger("llmuxd.checkpoint.gpu_probe")

#: the model environment variable where `gpu_probe: ledger` finds the simulator's ledger
LEDGER_ENV = "LLMUX_SIM_GPU_LEDGER"
NVIDIA_SMI_QUERY = ("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
PROBE_TIMEOUT = 20.0
_MIB_PER_UNIT = {"kib": 1 / 1024, "mib": 1, "gib": 1024}
_AMOUNT = re.compile(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)?", re.IGNORECASE)

#: {pid: MiB, or None where the driver cannot tell}
ProcessMemory = Mapping[int, "int | None"]
ProbeFactory = Callable[[Mapping[str, str]], "GpuProbe"]


class GpuProbe(Protocol):
    name: str

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        """MiB of GPU memory held by `pids` together; None when unknown."""


def usage_of(memory: ProcessMemory, pids: Iterable[int]) -> int | None:
    """What `pids` hold together: 0 for a PID the GPU does not list (it holds
    nothing there), None as soon as one of them is listed without a number."""
    total = 0
    for pid in set(pids):
        if pid not in memory:
            continue
        mb = memory[pid]
        if mb is None:
            return None
        total += mb
    return total


def _add(memory: dict[int, int | None], pid: int, mb: int | None) -> None:
    """A PID on several GPUs is summed; unknown on any of them makes it unknown."""
    if mb is None or (pid in memory and memory[pid] is None):
        memory[pid] = None
    else:
        memory[pid] = (memory.get(pid) or 0) + mb


def parse_amount(field: str) -> int | None:
    """`5120`, `5120 MiB`, `1.5 GiB` → MiB; `[N/A]`, `[Not Supported]` and the like → None."""
    match = _AMOUNT.fullmatch(field.strip())
    if match is None:
        return None
    unit = (match.group(2) or "MiB").lower()
    return int(float(match.group(1)) * _MIB_PER_UNIT[unit])


def parse_compute_apps(text: str) -> dict[int, int | None]:
    """nvidia-smi's `--query-compute-apps=pid,used_memory --format=csv,noheader[,nounits]`:
    `1234, 5120` lines → {1234: 5120}. Headers and "No running processes found" are skipped."""
    memory: dict[int, int | None] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        _add(memory, int(parts[0]), parse_amount(parts[1]))
    return memory


class NullProbe:
    """No source configured (or found by `auto`): nothing is verified."""

    name = "none"

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        return None


class UnavailableProbe:
    """A configured source that cannot work here; the reason is logged at start (preflight)."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        return None


class LedgerProbe:
    """The simulator's GPU ledger: reservations by the simulator's own PID."""

    name = "ledger"

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
        return usage_of(snapshot["by_pid"], pids)


async def run_nvidia_smi(path: str, *args: str) -> str | None:
    """stdout of one nvidia-smi call, or None (logged) when it does not run or fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            path, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("%s failed (%s); GPU memory after sleep not verified", path, exc)
        return None
    if proc.returncode != 0:
        log.warning("%s exited %s: %s", path, proc.returncode, err.decode(errors="replace").strip()[:200])
        return None
    return out.decode(errors="replace")


class NvidiaSmiProbe:
    """`nvidia-smi --query-compute-apps=pid,used_memory`: per-process MiB."""

    name = "nvidia-smi"

    def __init__(self, path: str = "nvidia-smi"):
        self.path = path

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        out = await run_nvidia_smi(self.path, *NVIDIA_SMI_QUERY)
        return None if out is None else usage_of(parse_compute_apps(out), pids)


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

    def memory(self) -> dict[int, int | None]:
        """{pid: MiB} over every GPU; usedGpuMemory is None where NVML cannot tell (N/A)."""
        nvml = self._nvml
        memory: dict[int, int | None] = {}
        for index in range(nvml.nvmlDeviceGetCount()):  # type: ignore[attr-defined]
            handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):  # type: ignore[attr-defined]
                used = proc.usedGpuMemory
                _add(memory, int(proc.pid), None if used is None else int(used) >> 20)
        return memory

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        try:
            return usage_of(await asyncio.to_thread(self.memory), pids)
        except Exception as exc:  # noqa: BLE001
            log.warning("NVML query failed (%s); GPU memory after sleep not verified", exc)
            return None


class AutoProbe:
    """`gpu_probe: auto`: NVML, else a working nvidia-smi, else none; decided on
    first use (one nvidia-smi run), then kept."""

    name = "auto"

    def __init__(self, nvidia_smi: str = "nvidia-smi"):
        self.nvidia_smi = nvidia_smi
        self.chosen: GpuProbe | None = None
        self._lock = asyncio.Lock()

    async def choose(self) -> GpuProbe:
        async with self._lock:
            if self.chosen is None:
                self.chosen = await self._find()
                log.info("GPU probe (auto): %s", self.chosen.name)
            return self.chosen

    async def _find(self) -> GpuProbe:
        nvml = await asyncio.to_thread(NvmlProbe.try_create)
        if nvml is not None:
            return nvml
        if shutil.which(self.nvidia_smi) and await run_nvidia_smi(self.nvidia_smi, *NVIDIA_SMI_QUERY) is not None:
            return NvidiaSmiProbe(self.nvidia_smi)
        return NullProbe()

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        return await (await self.choose()).usage_mb(pids)


NVML_MISSING = ("NVML is not available (install nvidia-ml-py, Debian: python3-pynvml, and an NVIDIA driver "
                "must answer)")


def make_probe_factory(kind: str, *, nvidia_smi: str = "nvidia-smi") -> ProbeFactory:
    """The probe of each model (given its environment) for `gpu_probe: kind`. One
    probe serves every model, except `ledger`: each model's simulator names its ledger."""
    if kind == "ledger":
        return lambda env: LedgerProbe(env[LEDGER_ENV]) if env.get(LEDGER_ENV) else NullProbe()
    probe: GpuProbe
    if kind == "nvml":
        probe = NvmlProbe.try_create() or UnavailableProbe("nvml", NVML_MISSING)
    elif kind == "nvidia-smi":
        probe = NvidiaSmiProbe(nvidia_smi)
    elif kind == "auto":
        probe = AutoProbe(nvidia_smi)
    elif kind == "none":
        probe = NullProbe()
    else:
        raise ValueError(f"unknown GPU probe {kind!r}")
    return lambda env: probe


def probe_problem(kind: str, *, nvidia_smi: str = "nvidia-smi") -> str | None:
    """Why a configured probe cannot work here, as a line for the start log (None: fine)."""
    if kind == "nvml" and NvmlProbe.try_create() is None:
        return f"gpu_probe: nvml, but {NVML_MISSING}; sleeps are not verified (or set gpu_probe: auto)"
    if kind == "nvidia-smi" and shutil.which(nvidia_smi) is None:
        return (f"gpu_probe: nvidia-smi, but '{nvidia_smi}' is not on PATH; sleeps are not verified "
                "(install the NVIDIA driver utilities or set gpu_probe: auto)")
    return None


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
