"""scripts/gpu-check: its dry run on this machine, its pass/fail rules, and the whole flow
on the CPU (`--device cpu`: the same daemon, models and evictions, memory as process RSS)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmuxd.checkpoint.gpu_probe import Measurement
from skip_policy import HAVE_TORCH
from stand_in import without_host_nvml

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
    """A machine without the driver's tools: PATH has no nvidia-smi, pynvml no driver."""
    (tmp_path / "bin").mkdir()
    env = without_host_nvml({**os.environ, "PATH": str(tmp_path / "bin")})
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=env)
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

    env = without_host_nvml({**os.environ, "FAKE_NVIDIA_SMI_GPU": "NVIDIA H200, 143771, 0",
                             "PATH": f"{SCRIPT.parent.parent / 'tests' / 'fake-bin'}:{os.environ['PATH']}"})
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=env)
    out = result.stdout
    assert "[ok] GPU: GPU 0: NVIDIA H200, 143771 MiB, 0 MiB in use" in out
    assert "--gpu-memory-utilization 0.6 (~86262 MiB each): all three need 180% of the GPU" in out
    assert "weights 4096 MiB" in out
    assert "[ok] GPU memory per process: nvidia-smi --query-compute-apps (NVML not available)" in out
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


def seen(mib, method="NVML per process", device_level=False):
    return Measurement(mib, method, device_level)


@pytest.mark.parametrize("device,eviction,before,after,ok", [
    ("cpu", "offload+keep_running", 400, 345, True),    # the KV cache (60) left; the host copy stays in RAM
    ("cpu", "offload+keep_running", 400, 390, False),   # freed too little
    ("cpu", "discard+keep_running", 400, 245, True),    # weights and KV cache left
    ("cpu", "discard+keep_running", 400, 345, False),   # only the KV cache left
    ("cpu", "retain+stop", 400, 0, True),
    ("cpu", "retain+stop", 400, 12, False),
    ("cuda", "offload+keep_running", 48000, 600, True),  # the CUDA context may stay
    ("cuda", "offload+keep_running", 48000, 47500, False),  # vLLM #32714: 200, nothing freed
    ("cuda", "offload+keep_running", 48000, 48000, False),  # before and after unchanged
    ("cuda", "retain+cuda_suspend", 48000, 0, True),
    ("cuda", "retain+cuda_suspend", 48000, 600, False),
    # memory never seen: nothing measured is not "freed"
    ("cuda", "offload+keep_running", 0, 0, False),       # the probe sees no process of the backend
    ("cuda", "offload+keep_running", 40, 0, False),      # less than half the weights (100 MiB) before
    ("cuda", "offload+keep_running", None, None, False),  # the driver cannot tell
    ("cpu", "offload+keep_running", 0, 0, False),
])
def test_a_sleep_must_free_what_its_eviction_promises(device, eviction, before, after, ok):
    machine, p = plan(device)
    run = gpu_check.CheckRun(machine, p, http=None, daemon=None, ports={}, floor_s=0.01)
    assert run.freed_enough(eviction, seen(before), seen(after))[0] is ok


def sleep_row(run, eviction, before, after, log_text=""):
    ok, note, before_mib, after_mib, method = run.judge(eviction, "gc-a", before, after, log_text)
    return gpu_check.SleepRow(eviction, "gc-a", before_mib, after_mib, ok, 0.1, 0.2, 0.5, True, 0.01, note, method)


def check_report(tmp_path, machine, p, rows) -> tuple[bool, str]:
    run = SimpleNamespace(floor_s=0.01, sleeps=rows, loads=[gpu_check.LoadRow("offload+keep_running", 10, 0, 0, [0.5])])
    passed = gpu_check.report(machine, p, {"h2d_gbps": 10.0, "d2h_gbps": 10.0}, run, tmp_path, 1.0)
    return passed, (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("before,after", [(0, 0), (48000, 48000)])
def test_a_probe_that_sees_nothing_or_no_change_fails_the_check(tmp_path, before, after):
    """Negative controls: a probe that lists none of the backend's processes (0 -> 0), and one
    that sees the memory unchanged, fail the report (gpu-check exits 1), saying why."""
    machine, p = plan("cuda")
    run = gpu_check.CheckRun(machine, p, http=None, daemon=None, ports={}, floor_s=0.01)
    row = sleep_row(run, "offload+keep_running", seen(before), seen(after))
    passed, text = check_report(tmp_path, machine, p, [row])
    assert passed is False and row.freed_ok is False
    sentence = "could not see the backend's memory" if before == 0 else "48000 MiB left, at most 1024 expected"
    assert sentence in row.note and sentence in text
    assert "| NVML per process |" in text


DAEMON_LOG = ("2026-12-06 03:40:00 INFO llmuxd.checkpoint.manager: model gc-a: sleep (offload+keep_running) "
              "verified (device-level: the used memory of its GPUs, valid while llmux owns them): "
              "48200 -> 610 MiB by NVML device-level\n")


@pytest.mark.parametrize("log_text,ok,method", [
    (DAEMON_LOG, True, "NVML device-level, by llmuxd between sleep and wake"),
    ("", False, "NVML device-level"),  # llmuxd measured nothing: not a pass
    (DAEMON_LOG.replace("verified (device", "not verified (device").replace("-> 610", "-> 48000"), False,
     "NVML device-level, by llmuxd between sleep and wake"),
])
def test_device_level_passes_only_with_the_method_named(tmp_path, log_text, ok, method):
    """Where NVML lists no processes (gVisor-like sandboxes) the GPU's used memory stands in,
    taken by llmuxd between the sleep and the next wake; the row names that method."""
    machine, p = plan("cuda")
    run = gpu_check.CheckRun(machine, p, http=None, daemon=None, ports={}, floor_s=0.01)
    device = seen(48200, "NVML device-level", device_level=True)
    row = sleep_row(run, "offload+keep_running", device, seen(49000, "NVML device-level", True), log_text)
    passed, text = check_report(tmp_path, machine, p, [row])
    assert (passed, row.freed_ok, row.method) == (ok, ok, method)
    assert f"| {method} |" in text
    if ok:
        assert (row.before_mib, row.after_mib) == (48200, 610)
    elif not log_text:
        assert "could not see the backend's memory" in row.note


def test_rows_are_written_as_they_are_measured(tmp_path):
    """A run cut short keeps what it measured: each row is in OUT/rows.md when it is done."""
    machine, p = plan("cuda")
    run = gpu_check.CheckRun(machine, p, http=None, daemon=None, ports={}, floor_s=0.01)
    run.on_row = gpu_check.RowLog(tmp_path)
    run.add_row(sleep_row(run, "offload+keep_running", seen(48000), seen(600)))
    lines = (tmp_path / "rows.md").read_text().splitlines()
    assert lines[0].startswith("| eviction | model | memory measured by |")
    assert lines[-1].startswith("| offload+keep_running | gc-a | NVML per process | 48000 | 600 |")
    assert lines[-1].endswith("| PASS |")


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


# -- the bundle: gpu-check on a machine with torch but no package index ---------------------

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
#: what a plain scientific Python has (the GPU image: torch and what it imports, numpy)
SCIENTIFIC = ("torch", "numpy", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2",
              "MarkupSafe", "fsspec")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """`gpu-check --bundle` for the Python at hand: it downloads from PyPI (no skip without it)."""
    dest = tmp_path_factory.mktemp("bundle")
    result = run_script("--bundle", str(dest), "--python-version", PY, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return dest


def carried(bundle: Path, tmp_path: Path) -> Path:
    """The bundle as copied to the GPU machine (a directory of its own, no checkout beside it)."""
    copy = tmp_path / "carried"
    shutil.copytree(bundle, copy)
    return copy


@pytest.fixture
def scientific_python(tmp_path) -> str:
    """A clean venv that sees only torch, numpy and their own requirements, like the GPU image:
    no pydantic, dbus-fast, aiohttp, PyYAML or llmux."""
    from importlib import metadata

    venv = tmp_path / "scientific"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    system = tmp_path / "system-site"
    system.mkdir()
    for name in SCIENTIFIC:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # numpy: torch does not need it here
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (system / top).exists() and not top.endswith(".pth"):
                (system / top).symlink_to(source)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "scientific.pth").write_text(f"{system}\n")
    python = str(venv / "bin" / "python")
    return python


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_INDEX_URL"] = "http://127.0.0.1:9/simple"  # any use of an index would fail
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def importable(python: str, module: str, env: dict[str, str]) -> bool:
    """Whether `python` imports `module` (run from / so no checkout is on its path)."""
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, env=env, cwd="/").returncode == 0


@pytest.mark.network
@pytest.mark.torch
@pytest.mark.slow
def test_a_bundle_installs_with_no_index_and_the_check_runs_from_it(bundle, scientific_python, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = {w["name"].lower().replace("_", "-") for w in manifest["wheels"]}
    assert {"llmux", "pydantic", "pydantic-core", "dbus-fast", "aiohttp", "pyyaml", "prometheus-client"} <= names
    assert not names & {"torch", "numpy"}
    assert all(len(w["sha256"]) == 64 for w in manifest["wheels"])
    env = clean_env(tmp_path)
    # negative control: the plain scientific Python lacks llmux's dependencies, has torch
    assert importable(scientific_python, "torch", env)
    for module in ("pydantic", "dbus_fast", "aiohttp", "yaml", "llmuxd"):
        assert not importable(scientific_python, module, env), module
    copy, out = carried(bundle, tmp_path), tmp_path / "out"
    result = subprocess.run(
        [scientific_python, str(copy / "gpu-check"), "--wheels", str(copy), "--device", "cpu", "--out", str(out),
         "--load-s", "1", "--evictions", "offload+keep_running,retain+stop"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"[ok] llmux's dependencies: from {out / 'site-packages'} (the bundle)" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and {r["eviction"] for r in report["sleeps"]} == {
        "offload+keep_running", "retain+stop"}
    assert "| offload+keep_running | gc-a | process RSS (CPU) |" in (out / "rows.md").read_text()
    # llmux came from the private directory (this Python cannot import it, the copy has no checkout
    # beside it), and the Python itself is untouched
    assert (out / "site-packages" / "llmuxd" / "__init__.py").is_file()
    assert not importable(scientific_python, "pydantic", env)


@pytest.mark.network
def test_a_missing_wheel_is_one_line_naming_it_and_the_bundle_command(bundle, tmp_path):
    copy = carried(bundle, tmp_path)
    dbus = next(copy.glob("dbus_fast-*.whl"))
    dbus.unlink()
    result = run_script("--wheels", str(copy), "--device", "cpu", "--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpu-check: missing wheel dbus_fast {dbus.name.split('-')[1]} ({dbus.name}): run `scripts/gpu-check "
        f"--bundle {copy} --python-version {PY}` where PyPI is reachable and copy {copy} here again"]
    # also when the manifest does not list it either: pip's resolver names the requirement
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["wheels"] = [w for w in manifest["wheels"] if w["file"] != dbus.name]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_script("--wheels", str(copy), "--device", "cpu", "--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpu-check: missing wheel for dbus-fast>=1.84: run `scripts/gpu-check --bundle {copy} --python-version "
        f"{PY}` where PyPI is reachable and copy {copy} here again"]
