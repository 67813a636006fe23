"""scripts/gpu-check: its dry run on this machine, its pass/fail rules, and the whole flow
on the CPU (`--device cpu`: the same daemon, models and evictions, memory as process RSS)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from skip_policy import HAVE_TORCH

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


gpu_check = load_script()


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_the_steps_and_names_what_this_machine_lacks(tmp_path):
    result = run_script("--dry-run", "--out", str(tmp_path / "out"))
    out = result.stdout
    assert result.returncode == 2, out + result.stderr  # no GPU here
    assert "[MISSING] nvidia-smi: not found on PATH: install the NVIDIA driver utilities" in out
    for step in ("measure host-to-device bandwidth", "start `llmuxd run` with three models gc-a, gc-b, gc-c",
                 "eviction offload+keep_running", "eviction discard+keep_running", "eviction offload+freeze",
                 "eviction retain+stop", "retain+cuda_suspend is checked only where a cuda-checkpoint binary",
                 "write report.json and report.md"):
        assert step in out, step
    assert "nothing was started" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_sizes_the_models_from_nvidia_smis_total(tmp_path):
    """With a GPU that nvidia-smi reports (tests/fake-bin/nvidia-smi), the plan is 60% of it
    per model and weights of total / 16 (at most 4 GiB); torch here still has no CUDA."""
    import os

    env = {**os.environ, "PATH": f"{SCRIPT.parent.parent / 'tests' / 'fake-bin'}:{os.environ['PATH']}",
           "FAKE_NVIDIA_SMI_GPU": "NVIDIA H200, 143771, 0"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=env)
    out = result.stdout
    assert "[ok] GPU: GPU 0: NVIDIA H200, 143771 MiB, 0 MiB in use" in out
    assert "--gpu-memory-utilization 0.6 (~86262 MiB each): all three need 180% of the GPU" in out
    assert "weights 4096 MiB" in out
    assert "[ok] GPU memory per process: nvidia-smi --query-compute-apps (pynvml not installed)" in out
    assert result.returncode == (0 if "[MISSING]" not in out else 2)


def test_dry_run_on_the_cpu_is_ready_where_torch_is():
    result = run_script("--dry-run", "--device", "cpu")
    if HAVE_TORCH:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[ok] torch: torch " in result.stdout
    else:
        assert result.returncode == 2
        assert "[MISSING] torch: not importable" in result.stdout and "llmux[torch]" in result.stdout


def plan(device: str = "cpu") -> tuple:
    machine = gpu_check.Machine(device, total_mib=80000)
    return machine, gpu_check.Plan(weights_mib=100, kv_mib=60, evictions=[], load_s=1)


@pytest.mark.parametrize("device,eviction,before,after,ok", [
    ("cpu", "offload+keep_running", 400, 345, True),    # the KV cache (60) left; the host copy stays in RAM
    ("cpu", "offload+keep_running", 400, 390, False),   # freed too little
    ("cpu", "discard+keep_running", 400, 245, True),    # weights and KV cache left
    ("cpu", "discard+keep_running", 400, 345, False),   # only the KV cache left
    ("cpu", "retain+stop", 400, 0, True),
    ("cpu", "retain+stop", 400, 12, False),
    ("cuda", "offload+keep_running", 48000, 600, True),  # the CUDA context may stay
    ("cuda", "offload+keep_running", 48000, 47500, False),  # vLLM #32714: 200, nothing freed
    ("cuda", "retain+cuda_suspend", 48000, 0, True),
    ("cuda", "retain+cuda_suspend", 48000, 600, False),
])
def test_a_sleep_must_free_what_its_eviction_promises(device, eviction, before, after, ok):
    machine, p = plan(device)
    run = gpu_check.CheckRun(machine, p, http=None, daemon=None, ports={}, floor_s=0.01)
    assert run.freed_enough(eviction, before, after)[0] is ok


@pytest.mark.parametrize("sleeps,loads,passed", [
    ([dict(freed_ok=True, answer_same=True)], [dict(lost=0, wrong=0)], True),
    ([dict(freed_ok=False, answer_same=True)], [dict(lost=0, wrong=0)], False),
    ([dict(freed_ok=True, answer_same=False)], [dict(lost=0, wrong=0)], False),
    ([dict(freed_ok=True, answer_same=True)], [dict(lost=1, wrong=0)], False),
    ([dict(freed_ok=True, answer_same=True)], [dict(lost=0, wrong=1)], False),
    ([], [], False),  # nothing measured is not a pass
])
def test_the_report_fails_on_any_failed_sleep_changed_answer_or_lost_request(tmp_path, sleeps, loads, passed):
    machine, p = plan()
    run = SimpleNamespace(
        floor_s=0.01,
        sleeps=[gpu_check.SleepRow("offload+keep_running", "gc-a", 400, 340, s["freed_ok"], 0.1, 0.2, 0.5,
                                   s["answer_same"], 0.01) for s in sleeps],
        loads=[gpu_check.LoadRow("offload+keep_running", 10, x["lost"], x["wrong"], [0.5]) for x in loads])
    bandwidth = {"h2d_gbps": 10.0, "d2h_gbps": 10.0}
    assert gpu_check.report(machine, p, bandwidth, run, tmp_path, 1.0) is passed
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is passed
    assert (tmp_path / "report.md").read_text().rstrip().splitlines()[-1].startswith("PASS" if passed else "FAIL")


@pytest.mark.torch
@pytest.mark.slow
def test_the_whole_check_passes_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    result = run_script("--device", "cpu", "--out", str(out), "--load-s", "2", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    rows = {(r["eviction"], r["model"]) for r in report["sleeps"]}
    for eviction in ("offload+keep_running", "discard+keep_running", "offload+freeze", "retain+stop"):
        assert {(eviction, "gc-a"), (eviction, "gc-b")} <= rows
    assert all(r["answer_same"] and r["freed_ok"] for r in report["sleeps"])
    assert [r["lost"] for r in report["loads"]] == [0, 0, 0, 0]
    assert all(r["requests"] > 0 and r["switch_under_load_s"] for r in report["loads"])
    stop = [r for r in report["sleeps"] if r["eviction"] == "retain+stop"]
    assert all(r["after_mib"] == 0 for r in stop)
    assert report["bandwidth"]["h2d_gbps"] > 0 and report["floor_s"] > 0
