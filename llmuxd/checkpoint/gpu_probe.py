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

A backend's memory is that of all its processes (its unit's cgroup in system
mode, its process group in embedded mode: the runtime's `pids()`), never one PID.
Where the driver gives no per-process figures (NVML lists no process, "[N/A]", or
the listed PIDs live in a PID namespace this one cannot see, as under gVisor-like
sandboxes), NVML and nvidia-smi fall back to the used memory of the model's GPUs:
a "device-level" measurement, meaningful only while llmux owns those GPUs, and
always named as such. A probe that cannot tell at all answers None.

A sleep is "freed" only when the memory before it was seen (`sleep_verdict`): at
least half the model's expected size. Otherwise the verdict is "could not see the
backend's memory", never a pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from llmuxd.gpu_ledger import LEDGER_ENV, read as read_ledger

log = logging.getLogger("llmuxd.checkpoint.gpu_probe")

NVIDIA_SMI_QUERY = ("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
NVIDIA_SMI_DEVICE_QUERY = ("--query-gpu=index,memory.used", "--format=csv,noheader,nounits")
#: the verdict when the memory before a sleep was not seen (gpu-check and the daemon say it alike)
COULD_NOT_SEE = "could not see the backend's memory"
PROBE_TIMEOUT = 20.0
_MIB_PER_UNIT = {"kib": 1 / 1024, "mib": 1, "gib": 1024}
_AMOUNT = re.compile(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)?", re.IGNORECASE)

#: {pid: MiB, or None where the driver cannot tell}
ProcessMemory = Mapping[int, "int | None"]
ProbeFactory = Callable[[Mapping[str, str]], "GpuProbe"]


@dataclass(frozen=True)
class Measurement:
    """What a probe saw: MiB (None: cannot tell) and how it was measured."""

    mib: int | None
    #: e.g. "NVML per process", "nvidia-smi device-level", "simulator ledger per process"
    method: str
    #: the used memory of the model's GPUs, not of its processes: valid only while llmux owns them
    device_level: bool = False


class GpuProbe(Protocol):
    name: str

    async def measure(self, pids: Sequence[int], gpus: Sequence[int] = ()) -> Measurement:
        """GPU memory held by `pids` together (a backend's processes); `gpus`: the model's
        GPU indices, for the device-level fallback (empty: every GPU)."""

    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        """measure(pids).mib"""


class _UsageMixin:
    async def usage_mb(self, pids: Sequence[int]) -> int | None:
        return (await self.measure(pids)).mib  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SleepVerdict:
    """The outcome of measuring one sleep. `verified`: the memory before was seen and what
    is left is at most the allowed residue; `seen` False: COULD_NOT_SEE."""

    verified: bool
    seen: bool
    before: Measurement
    after: Measurement
    detail: str

    @property
    def kept_mb(self) -> int | None:
        """MiB the sleep left behind when that is a fact about the backend's own processes
        (per-process, seen or not); None where it is not (cannot tell, device-level)."""
        after = self.after
        return after.mib if after.mib is not None and not after.device_level else None


def sleep_verdict(before: Measurement, after: Measurement, expected_mb: int | None, allowed_mb: int) -> SleepVerdict:
    """Judge a sleep from the memory before and after it. "Freed" needs the memory before
    to have been seen: at least half of `expected_mb` (the model's expected weights), or,
    with no expectation, more than the residue a sleep may leave."""
    method = after.method if after.method == before.method else f"{before.method}, then {after.method}"
    floor = expected_mb // 2 if expected_mb else allowed_mb + 1
    if before.mib is None or after.mib is None:
        return SleepVerdict(False, False, before, after,
                            f"{COULD_NOT_SEE} ({method} cannot tell the memory "
                            f"{'before' if before.mib is None else 'after'} the sleep)")
    numbers = f"{before.mib} -> {after.mib} MiB by {method}"
    if before.mib < floor:
        what = f"half its expected {expected_mb} MiB" if expected_mb else f"more than the {allowed_mb} MiB a sleep may leave"
        return SleepVerdict(False, False, before, after,
                            f"{COULD_NOT_SEE} ({numbers}; before the sleep it must hold at least {floor} MiB, {what})")
    if after.mib > allowed_mb:
        return SleepVerdict(False, True, before, after, f"{numbers}: {after.mib} MiB left, at most {allowed_mb} expected")
    return SleepVerdict(True, True, before, after, numbers)


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


class NullProbe(_UsageMixin):
    """No source configured (or found by `auto`): nothing is verified."""

    name = "none"
    #: False: no source at all, so no verdict either (the start log already said why)
    measures = False

    async def measure(self, pids: Sequence[int], gpus: Sequence[int] = ()) -> Measurement:
        return Measurement(None, "no GPU probe")


class UnavailableProbe(_UsageMixin):
    """A configured source that cannot work here; the reason is logged at start (preflight)."""

    measures = False

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    async def measure(self, pids: Sequence[int], gpus: Sequence[int] = ()) -> Measurement:
        return Measurement(None, f"{self.name} (unavailable)")


class LedgerProbe(_UsageMixin):
    """The simulators' GPU ledger (llmuxd/gpu_ledger.py): reservations by the simulator's own PID."""

    name = "ledger"
    method = "simulator ledger per process"

    def __init__(self, path: str):
        self.path = path

    async def measure(self, pids: Sequence[int], gpus: Sequence[int] = ()) -> Measurement:
        # read as it is, not pruned: entries of simulators in another PID namespace
        # (the test systemd) cannot be judged from here
        try:
            snapshot = await asyncio.to_thread(read_ledger, self.path)
        except (OSError, ValueError) as exc:  # unreadable: "cannot tell", never a failed sleep
            log.warning("GPU ledger %s unreadable: %s", self.path, exc)
            return Measurement(None, self.method)
        return Measurement(usage_of(snapshot["by_pid"], pids), self.method)


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


def parse_device_used(text: str) -> dict[int, int | None]:
    """nvidia-smi's `--query-gpu=index,memory.used --format=csv,noheader,nounits` → {index: MiB}."""
    used: dict[int, int | None] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            used[int(parts[0])] = parse_amount(parts[1])
    return used


def per_process_visible(memory: ProcessMemory, pids: Iterable[int]) -> bool:
    """Whether per-process figures can speak for `pids`: one of them is listed with a number,
    or the driver lists processes with numbers that all live in this PID namespace (so the
    backend's absence from the list means it holds nothing). An empty list, "[N/A]" for the
    backend, or PIDs this namespace cannot see (a sandbox, a container) are not enough."""
    ours = set(pids)
    if any(pid in memory and memory[pid] is None for pid in ours):
        return False
    if any(pid in memory for pid in ours):
        return True
    listed = [pid for pid, mb in memory.items() if mb is not None]
    return bool(listed) and all(os.path.exists(f"/proc/{pid}") for pid in listed)


def device_measurement(used: Mapping[int, int | None], gpus: Sequence[int], tool: str) -> Measurement:
    """The used memory of `gpus` (every listed GPU when empty), device-level."""
    indices = list(gpus) or sorted(used)
    values = [used.get(i) for i in indices]
    total = None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)
    return Measurement(total, f"{tool} device-level", device_level=True)


class NvidiaSmiProbe(_UsageMixin):
    """`nvidia-smi --query-compute-apps=pid,used_memory`: per-process MiB, else the GPUs' used memory."""

    name = "nvidia-smi"

    def __init__(self, path: str = "nvidia-smi"):
        self.path = path

    async def measure(self, pids: Sequence[int], gpus: Sequence[int] = ()) -> Measurement:
        out = await run_nvidia_smi(self.path, *NVIDIA_SMI_QUERY)
        if out is None:
            return Measurement(None, "nvidia-smi per process")
        memory = parse_compute_apps(out)
        if per_process_visible(memory, pids):
            return Measurement(usage_of(memory, pids), "nvidia-smi per process")
        devices = await run_nvidia_smi(self.path, *NVIDIA_SMI_DEVICE_QUERY)
        if devices is None:
            return Measurement(None, "nvidia-smi device-level", device_level=True)
        return device_measurement(parse_device_used(devices), gpus, "nvidia-smi")


class NvmlProbe(_UsageMixin):
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

    def device_used(self) -> dict[int, int | None]:
        """{GPU index: used MiB} (nvmlDeviceGetMemoryInfo)."""
        nvml = self._nvml
        return {index: int(nvml.nvmlDeviceGetMemoryInfo(  # type: ignore[attr-defined]
                    nvml.nvmlDeviceGetHandleByIndex(index)).used) >> 20  # type: ignore[attr-defined]
                for index in range(nvml.nvmlDeviceGetCount())}  # type: ignore[attr-defined]

    async def measure(self, pids: Sequence[int], gpus: Sequence[int] = ()) -> Measurement:
        try:
            memory = await asyncio.to_thread(self.memory)
        except Exception as exc:  # noqa: BLE001 - e.g. NVML_ERROR_NOT_SUPPORTED in a sandbox
            log.debug("NVML lists no processes (%s); using the GPUs' used memory", exc)
            memory = {}
        if per_process_visible(memory, pids):
            return Measurement(usage_of(memory, pids), "NVML per process")
        try:
            return device_measurement(await asyncio.to_thread(self.device_used), gpus, "NVML")
        except Exception as exc:  # noqa: BLE001
            log.warning("NVML query failed (%s); GPU memory after sleep not verified", exc)
            return Measurement(None, "NVML device-level", device_level=True)


class AutoProbe(_UsageMixin):
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

    async def measure(self, pids: Sequence[int], gpus: Sequence[int] = ()) -> Measurement:
        return await (await self.choose()).measure(pids, gpus)


async def measures(probe: GpuProbe) -> bool:
    """Whether `probe` has a source at all (`auto` decides on first use): without one there
    is no verdict to give, and none is logged (preflight said why at start)."""
    if isinstance(probe, AutoProbe):
        probe = await probe.choose()
    return bool(getattr(probe, "measures", True))


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
