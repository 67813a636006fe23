"""The suite passes on a GPU host (issue 22): tests that concern the GPU probe, gpu-check and
verified eviction see fake tools only through their own PATH and environment, never the
host's nvidia-smi or nvidia-ml-py. Shown by running them where a stand-in GPU host's
`nvidia-smi` and `pynvml` come first (tests/stand-in/gpu-host): they must pass there as here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stand_in import GPU_HOST

TESTS = Path(__file__).resolve().parent
#: the files whose tests once assumed no nvidia-smi, no pynvml
AFFECTED = ("test_checkpoint_gpu_probe.py", "test_gpu_check.py", "test_checkpoint_orchestrator.py")


def gpu_host_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS")}
    env["PATH"] = f"{GPU_HOST / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GPU_HOST), env.get("PYTHONPATH")]))
    return env


def test_the_stand_in_gpu_host_is_what_a_test_would_see():
    """Negative control: under gpu_host_env() a test that looked at the host would find a GPU."""
    env = gpu_host_env()
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, env=env)
    assert smi.stdout.startswith("GPU 0: NVIDIA H100 80GB HBM3")
    nvml = subprocess.run([sys.executable, "-c", "from llmuxd.checkpoint.gpu_probe import NvmlProbe; "
                           "print(NvmlProbe.try_create() is not None)"],
                          capture_output=True, text=True, env=env, cwd=TESTS.parent)
    assert nvml.stdout.strip() == "True", nvml.stderr


def inner_markers() -> str:
    """The inner run's selection: never the slow or network tests, and the torch tests only
    where this venv has torch (Debian 12's has none; scripts/test deselects them there too)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "not slow and not network and not torch"
    return "not slow and not network"


@pytest.mark.slow
def test_the_probe_tests_pass_where_a_gpu_hosts_nvidia_smi_and_pynvml_are_on_the_path():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", inner_markers(),
         *(str(TESTS / name) for name in AFFECTED)],
        capture_output=True, text=True, env=gpu_host_env(), cwd=TESTS.parent, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
