"""Stand-in nvidia-ml-py of a GPU host (tests/test_host_driver.py): one 80 GB GPU whose driver
answers, with one process of someone else's on it. Tests run with this first on PYTHONPATH
must pass as they do where there is no GPU at all."""

from types import SimpleNamespace


class NVMLError(Exception):
    pass


def nvmlInit() -> None:  # noqa: N802 - nvidia-ml-py's names below
    pass


def nvmlShutdown() -> None:  # noqa: N802
    pass


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802
    return index


def nvmlDeviceGetName(handle: int) -> str:  # noqa: N802
    return "NVIDIA H100 80GB HBM3 (stand-in)"


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list:  # noqa: N802
    return [SimpleNamespace(pid=1, usedGpuMemory=1000 << 20)]


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:  # noqa: N802
    return SimpleNamespace(total=81559 << 20, used=1000 << 20, free=80559 << 20)


def nvmlSystemGetDriverVersion() -> str:  # noqa: N802
    return "550.54.15"


def nvmlSystemGetCudaDriverVersion() -> int:  # noqa: N802
    return 12040
