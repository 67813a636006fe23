"""Stand-ins for the NVIDIA driver's user-space tools, so no test depends on the host's.

- `no_host_nvml(monkeypatch)`: `import pynvml` finds nvidia-ml-py whose driver does not answer
  (tests/stand-in/no-driver), whatever the host has installed;
- `NO_DRIVER`: the same directory, for a subprocess's PYTHONPATH;
- `GPU_HOST`: a GPU host's nvidia-smi (bin/) and pynvml, for tests/test_host_driver.py.
Fake tools reach a test only through its own PATH and environment (tests/fake-bin)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

STAND_IN = Path(__file__).resolve().parent / "stand-in"
NO_DRIVER = STAND_IN / "no-driver"
GPU_HOST = STAND_IN / "gpu-host"


def load_pynvml(directory: Path) -> Any:
    spec = importlib.util.spec_from_file_location("pynvml", directory / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_host_nvml(monkeypatch: Any) -> None:
    """In this process, `import pynvml` is nvidia-ml-py without a driver (the host's is hidden)."""
    monkeypatch.setitem(sys.modules, "pynvml", load_pynvml(NO_DRIVER))


def without_host_nvml(env: dict[str, str]) -> dict[str, str]:
    """`env` for a subprocess whose `import pynvml` must not reach the host's NVML."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(NO_DRIVER), env.get("PYTHONPATH")]))}
