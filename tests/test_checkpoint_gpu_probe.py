"""GPU probes: nvidia-smi's output as drivers print it, NVML's answers, and the explicit
`gpu_probe` choice. The probe itself runs `nvidia-smi` for real: tests/fake-bin/nvidia-smi
stands in for the driver's tool and reports what the simulators hold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmuxd.checkpoint.gpu_probe import (
    AutoProbe,
    LedgerProbe,
    NullProbe,
    NvidiaSmiProbe,
    NvmlProbe,
    UnavailableProbe,
    make_probe_factory,
    parse_compute_apps,
    probe_problem,
    usage_of,
)
from llmuxd.config import Config, ConfigError

FAKE_BIN = Path(__file__).resolve().parent / "fake-bin"
FAKE_SMI = str(FAKE_BIN / "nvidia-smi")


@pytest.mark.parametrize("text,expected", [
    # --format=csv,noheader,nounits (what llmux asks for)
    ("1234, 5120\n5678, 300\n", {1234: 5120, 5678: 300}),
    # without nounits every number carries MiB
    ("1234, 5120 MiB\n5678, 300 MiB\n", {1234: 5120, 5678: 300}),
    # with a header (no noheader), in both spellings
    ("pid, used_gpu_memory [MiB]\n1234, 5120 MiB\n", {1234: 5120}),
    ("pid, used_gpu_memory\n1234, 5120\n", {1234: 5120}),
    # drivers that cannot attribute memory to a process (containers, vGPU, WSL, MIG)
    ("1234, [N/A]\n", {1234: None}),
    ("1234, [Not Supported]\n5678, 10\n", {1234: None, 5678: 10}),
    # one process on two GPUs (tensor parallel in one process): summed; unknown on one is unknown
    ("1234, 5120\n1234, 100\n", {1234: 5220}),
    ("1234, 5120\n1234, [N/A]\n", {1234: None}),
    # nothing on the GPU
    ("", {}),
    ("No running processes found\n", {}),
    # noise is skipped, not guessed at
    ("bogus\n, 12\n1234\n", {}),
])
def test_nvidia_smi_compute_apps_output_is_parsed(text, expected):
    assert parse_compute_apps(text) == expected


@pytest.mark.parametrize("memory,pids,expected", [
    ({1: 100, 2: 200, 3: 400}, [1, 2], 300),
    ({1: 100}, [1, 1, 7], 100),       # duplicates count once; an unlisted PID holds nothing
    ({}, [1, 2], 0),
    ({1: 100, 2: None}, [1, 2], None),  # one unknown: the total is unknown, not "freed"
    ({1: 100, 2: None}, [1], 100),
])
def test_usage_of_a_units_processes(memory, pids, expected):
    assert usage_of(memory, pids) == expected


def fake_nvml(processes_per_gpu: list[list[tuple[int, int | None]]]) -> SimpleNamespace:
    """The four NVML calls NvmlProbe makes, answering like nvidia-ml-py (bytes; None = N/A)."""
    return SimpleNamespace(
        nvmlDeviceGetCount=lambda: len(processes_per_gpu),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes_per_gpu[h]],
    )


@pytest.mark.parametrize("gpus,pids,expected", [
    ([[(10, 5 << 30)], [(10, 1 << 30), (11, 2 << 30)]], [10], 6144),
    ([[(10, 5 << 30)], [(11, None)]], [10, 11], None),
    ([[(10, 5 << 30)]], [99], 0),
])
async def test_nvml_answers_are_summed_per_process(gpus, pids, expected):
    assert await NvmlProbe(fake_nvml(gpus)).usage_mb(pids) == expected


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """tests/fake-bin first on PATH; returns the ledger file it reports from."""
    ledger = tmp_path / "ledger.json"
    monkeypatch.setenv("PATH", f"{FAKE_BIN}:{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_LEDGER", str(ledger))
    return ledger


def write_ledger(path: Path, by_pid: dict[int, int]) -> None:
    path.write_text(json.dumps({"capacity_mb": 81920, "reservations": {
        str(pid): {"mb": mb, "ns": "pid:[other]"} for pid, mb in by_pid.items()}}))


async def test_nvidia_smi_probe_runs_the_tool_and_reads_its_pids(fake_smi, tmp_path, monkeypatch):
    write_ledger(fake_smi, {100: 4000, 101: 500, 200: 9000})
    monkeypatch.setenv("FAKE_NVIDIA_SMI_LOG", str(tmp_path / "calls"))
    assert await NvidiaSmiProbe().usage_mb([100, 101]) == 4500
    assert (tmp_path / "calls").read_text() == "--query-compute-apps=pid,used_memory --format=csv,noheader,nounits\n"


@pytest.mark.parametrize("env,expected", [
    ({"FAKE_NVIDIA_SMI_MEMORY": "na"}, None),  # the driver cannot tell
    ({"FAKE_NVIDIA_SMI_FAIL": "1"}, None),     # the driver does not answer
    ({}, 4000),
])
async def test_nvidia_smi_probe_cannot_tell_rather_than_guess(fake_smi, monkeypatch, env, expected):
    write_ledger(fake_smi, {100: 4000})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert await NvidiaSmiProbe().usage_mb([100]) == expected


async def test_missing_nvidia_smi_cannot_tell(monkeypatch):
    assert await NvidiaSmiProbe("/nonexistent/nvidia-smi").usage_mb([1]) is None


@pytest.mark.parametrize("path_has_smi,fail,chosen", [
    (True, False, "nvidia-smi"),
    (True, True, "none"),    # on PATH but the driver does not answer
    (False, False, "none"),
])
async def test_auto_takes_nvml_else_a_working_nvidia_smi_else_none(fake_smi, monkeypatch, path_has_smi, fail,
                                                                    chosen):
    """pynvml is not installed here, so auto goes on to nvidia-smi."""
    if not path_has_smi:
        monkeypatch.setenv("PATH", "/nonexistent")
    if fail:
        monkeypatch.setenv("FAKE_NVIDIA_SMI_FAIL", "1")
    write_ledger(fake_smi, {100: 700})
    probe = AutoProbe()
    assert (await probe.choose()).name == chosen
    assert await probe.usage_mb([100]) == (700 if chosen == "nvidia-smi" else None)


@pytest.mark.parametrize("kind,env,probe_type", [
    ("none", {}, NullProbe),
    ("nvidia-smi", {}, NvidiaSmiProbe),
    ("auto", {}, AutoProbe),
    ("nvml", {}, UnavailableProbe),  # nvidia-ml-py / a driver: not on this machine
    ("ledger", {"LLMUX_SIM_GPU_LEDGER": "/x.json"}, LedgerProbe),
    ("ledger", {}, NullProbe),       # a model whose simulator keeps no ledger
    # the simulator's variable chooses nothing: only `gpu_probe: ledger` reads the ledger
    ("auto", {"LLMUX_SIM_GPU_LEDGER": "/x.json"}, AutoProbe),
    ("none", {"LLMUX_SIM_GPU_LEDGER": "/x.json"}, NullProbe),
])
def test_the_probe_is_the_configured_one(kind, env, probe_type):
    assert type(make_probe_factory(kind)(env)) is probe_type


@pytest.mark.parametrize("kind,smi,problem", [
    ("nvml", "nvidia-smi", "gpu_probe: nvml, but NVML is not available (install nvidia-ml-py"),
    ("nvidia-smi", "/nonexistent/nvidia-smi", "gpu_probe: nvidia-smi, but '/nonexistent/nvidia-smi' is not on PATH"),
    ("nvidia-smi", FAKE_SMI, None),
    ("auto", "nvidia-smi", None),
    ("ledger", "nvidia-smi", None),
])
def test_a_probe_that_cannot_work_is_named_at_start(kind, smi, problem):
    found = probe_problem(kind, nvidia_smi=smi)
    assert (found is None) if problem is None else found.startswith(problem)


def test_gpu_probe_is_explicit_config_with_a_fix_for_typos():
    assert Config.from_dict({}).gpu_probe == "auto"
    assert Config.from_dict({"gpu_probe": "nvidia-smi"}).gpu_probe == "nvidia-smi"
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"gpu_probe": "nvidia_smi"}, source="/etc/llmux/llmux.yaml")
    assert str(err.value) == ("/etc/llmux/llmux.yaml: gpu_probe: unknown GPU probe 'nvidia_smi'; "
                              "allowed: auto, nvml, nvidia-smi, ledger, none")


def test_the_daemon_verifies_sleeps_through_the_configured_nvidia_smi(tmp_path):
    """`gpu_probe: nvidia-smi` in a real `llmuxd run`: the sleep of a backend that keeps its
    memory is seen through nvidia-smi (by the backend's PID) and escalated to stop."""
    from daemon_process import DaemonProcess, daemon_env, http_json, sim_model, wait_until, write_config

    ledger = tmp_path / "gpu.json"
    models = {"alpha": sim_model("org/alpha", ledger, 4000), "beta": sim_model("org/beta", ledger, 4000)}
    config = write_config(tmp_path, models, gpu_probe="nvidia-smi")
    env = daemon_env()
    env.update(PATH=f"{FAKE_BIN}:{env['PATH']}", FAKE_NVIDIA_SMI_LEDGER=str(ledger),
               FAKE_NVIDIA_SMI_LOG=str(tmp_path / "nvidia-smi.log"))
    daemon = DaemonProcess(config, tmp_path / "llmuxd.log", env=env).wait_ready()
    try:
        def ask(model: str) -> int:
            body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode()
            return http_json(daemon.base + "/v1/completions", body, {"Content-Type": "application/json"})[0]

        assert ask("alpha") == 200
        backend = f"http://127.0.0.1:{models['alpha']['port']}"
        fault = json.dumps({"kind": "sleep_keeps_memory"}).encode()
        assert http_json(backend + "/sim/fault", fault, {"Content-Type": "application/json"})[0] == 200
        assert ask("beta") == 200  # alpha sleeps, keeps its 4000 MiB, is stopped
        wait_until("the escalation", lambda: "escalating to retain+stop" in daemon.log())
        assert "still hold 4000 MiB on the GPU" in daemon.log()
        assert "--query-compute-apps=pid,used_memory" in (tmp_path / "nvidia-smi.log").read_text()
        with pytest.raises(OSError):
            http_json(backend + "/health", timeout=2)  # its process is gone
    finally:
        assert daemon.stop() == 0, daemon.log()
