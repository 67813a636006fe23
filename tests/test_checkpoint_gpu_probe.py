"""GPU probes: nvidia-smi's output as drivers print it, NVML's answers, and the explicit
`gpu_probe` choice. The probe itself runs `nvidia-smi` for real: tests/fake-bin/nvidia-smi
stands in for the driver's tool and reports what the simulators hold."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmuxd.checkpoint.gpu_probe import (
    COULD_NOT_SEE,
    AutoProbe,
    LedgerProbe,
    Measurement,
    NullProbe,
    NvidiaSmiProbe,
    NvmlProbe,
    UnavailableProbe,
    make_probe_factory,
    parse_compute_apps,
    per_process_visible,
    probe_problem,
    sleep_verdict,
    usage_of,
)
from llmuxd.config import Config, ConfigError
from stand_in import GPU_HOST, load_pynvml, no_host_nvml, without_host_nvml

FAKE_BIN = Path(__file__).resolve().parent / "fake-bin"
FAKE_SMI = str(FAKE_BIN / "nvidia-smi")


@pytest.fixture(autouse=True)
def _no_host_nvml(monkeypatch):
    """Whatever this host has, `import pynvml` here is nvidia-ml-py without a driver."""
    no_host_nvml(monkeypatch)


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


def fake_nvml(processes_per_gpu: list[list[tuple[int, int | None]]], used_mib: list[int] | None = None
              ) -> SimpleNamespace:
    """The NVML calls NvmlProbe makes, answering like nvidia-ml-py (bytes; None = N/A)."""
    used = used_mib or [0] * len(processes_per_gpu)
    return SimpleNamespace(
        nvmlDeviceGetCount=lambda: len(processes_per_gpu),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes_per_gpu[h]],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=used[h] << 20),
    )


@pytest.mark.parametrize("gpus,pids,expected", [
    ([[(10, 5 << 30)], [(10, 1 << 30), (11, 2 << 30)]], [10], 6144),
    ([[(10, 5 << 30)], [(11, None)]], [10, 11], None),
    ([[(10, 5 << 30)]], [99], 0),
])
def test_nvml_answers_are_summed_per_process(gpus, pids, expected):
    assert usage_of(NvmlProbe(fake_nvml(gpus)).memory(), pids) == expected


MINE = os.getpid()


@pytest.mark.parametrize("memory,pids,visible", [
    ({MINE: 4000}, [MINE], True),
    ({1: 300}, [MINE], True),              # others listed, all in this namespace: the backend holds nothing
    ({}, [MINE], False),                   # NVML lists no process at all (gVisor-like sandboxes)
    ({MINE: None}, [MINE], False),         # listed without a number ("[N/A]")
    ({4_000_000: 4000}, [MINE], False),    # a PID this namespace cannot see (the driver's namespace)
])
def test_per_process_figures_speak_only_when_the_driver_lists_processes_we_can_see(memory, pids, visible):
    assert per_process_visible(memory, pids) is visible


@pytest.mark.parametrize("gpus,memory,used,gpu_list,expected", [
    # NVML lists no process: the used memory of the model's GPU, named device-level
    ([[]], None, [47000], [0], Measurement(47000, "NVML device-level", True)),
    ([[], []], None, [500, 47000], [1], Measurement(47000, "NVML device-level", True)),
    ([[], []], None, [500, 47000], [], Measurement(47500, "NVML device-level", True)),  # no gpus: all of them
    # a process of a PID namespace this one cannot see
    ([[(4_000_000, 9 << 30)]], None, [9300], [0], Measurement(9300, "NVML device-level", True)),
    # the backend listed: per process, whatever the device holds
    ([[(MINE, 5 << 30)]], None, [9300], [0], Measurement(5120, "NVML per process")),
])
async def test_nvml_falls_back_to_the_devices_used_memory_and_says_so(gpus, memory, used, gpu_list, expected):
    assert await NvmlProbe(fake_nvml(gpus, used)).measure([MINE], gpu_list) == expected


async def test_nvml_that_cannot_list_processes_falls_back_to_the_device_level():
    """Sandboxes where nvmlDeviceGetComputeRunningProcesses fails (NVML_ERROR_NOT_SUPPORTED)."""
    nvml = fake_nvml([[]], [47000])

    def not_supported(handle):
        raise RuntimeError("Not Supported")

    nvml.nvmlDeviceGetComputeRunningProcesses = not_supported
    assert await NvmlProbe(nvml).measure([MINE], [0]) == Measurement(47000, "NVML device-level", True)
    nvml.nvmlDeviceGetMemoryInfo = not_supported
    assert await NvmlProbe(nvml).measure([MINE], [0]) == Measurement(None, "NVML device-level", True)


MB_4000 = Measurement(4000, "NVML per process")


@pytest.mark.parametrize("before,after,expected_mb,verified,seen,says", [
    (MB_4000, Measurement(500, "NVML per process"), 4000, True, True, "4000 -> 500 MiB by NVML per process"),
    (MB_4000, MB_4000, 4000, False, True, "4000 MiB left, at most 1024 expected"),  # unchanged
    # negative controls: memory never seen is never "freed"
    (Measurement(0, "NVML per process"), Measurement(0, "NVML per process"), 4000, False, False, COULD_NOT_SEE),
    (Measurement(1500, "NVML per process"), Measurement(0, "NVML per process"), 4000, False, False,
     "at least 2000 MiB, half its expected 4000 MiB"),
    (Measurement(0, "NVML per process"), Measurement(0, "NVML per process"), None, False, False, COULD_NOT_SEE),
    (Measurement(None, "NVML"), Measurement(0, "NVML per process"), 4000, False, False, COULD_NOT_SEE),
    (MB_4000, Measurement(None, "NVML"), 4000, False, False, "cannot tell the memory after the sleep"),
    # no expectation: more than a sleep's residue must have been seen
    (MB_4000, Measurement(500, "NVML per process"), None, True, True, "4000 -> 500 MiB"),
    # device-level: verified with the method named
    (Measurement(47000, "nvidia-smi device-level", True), Measurement(600, "nvidia-smi device-level", True), 40000,
     True, True, "47000 -> 600 MiB by nvidia-smi device-level"),
])
def test_a_sleep_is_freed_only_when_its_memory_was_seen(before, after, expected_mb, verified, seen, says):
    verdict = sleep_verdict(before, after, expected_mb, 1024)
    assert (verdict.verified, verdict.seen) == (verified, seen)
    assert says in verdict.detail


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
    # the driver cannot tell per process: the GPU's used memory, named device-level
    ({"FAKE_NVIDIA_SMI_MEMORY": "na"}, Measurement(4500, "nvidia-smi device-level", True)),
    ({"FAKE_NVIDIA_SMI_PROCESSES": "none"}, Measurement(4500, "nvidia-smi device-level", True)),
    ({"FAKE_NVIDIA_SMI_FAIL": "1"}, Measurement(None, "nvidia-smi per process")),  # the driver does not answer
    ({}, Measurement(4000, "nvidia-smi per process")),
])
async def test_nvidia_smi_probe_says_how_it_measured_and_never_guesses(fake_smi, monkeypatch, env, expected):
    write_ledger(fake_smi, {MINE: 4000, 1: 500})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert await NvidiaSmiProbe().measure([MINE], [0]) == expected


async def test_missing_nvidia_smi_cannot_tell(monkeypatch):
    assert await NvidiaSmiProbe("/nonexistent/nvidia-smi").usage_mb([1]) is None


@pytest.mark.parametrize("path_has_smi,fail,chosen", [
    (True, False, "nvidia-smi"),
    (True, True, "none"),    # on PATH but the driver does not answer
    (False, False, "none"),
])
async def test_auto_takes_nvml_else_a_working_nvidia_smi_else_none(fake_smi, monkeypatch, path_has_smi, fail,
                                                                    chosen):
    """NVML does not answer (tests/stand-in/no-driver), so auto goes on to nvidia-smi."""
    if not path_has_smi:
        monkeypatch.setenv("PATH", "/nonexistent")
    if fail:
        monkeypatch.setenv("FAKE_NVIDIA_SMI_FAIL", "1")
    write_ledger(fake_smi, {100: 700})
    probe = AutoProbe()
    assert (await probe.choose()).name == chosen
    assert await probe.usage_mb([100]) == (700 if chosen == "nvidia-smi" else None)


async def test_auto_takes_nvml_where_a_driver_answers(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", load_pynvml(GPU_HOST))
    probe = AutoProbe("/nonexistent/nvidia-smi")
    assert (await probe.choose()).name == "nvml"
    # the stand-in lists PID 1 (1000 MiB): visible here, not ours, so ours hold nothing
    assert await probe.measure([os.getpid()], [0]) == Measurement(0, "NVML per process")


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


@pytest.mark.parametrize("driver,check", [
    # gVisor-like: no process listed; the GPU's used memory stands in, named device-level
    ({"FAKE_NVIDIA_SMI_PROCESSES": "none"}, "sleep verified device-level: 4000 -> 500 MiB by nvidia-smi device-level"),
    # per process, seen: verified, nothing to add to the status
    ({}, None),
])
def test_the_daemons_status_says_how_a_sleep_was_verified(tmp_path, driver, check):
    """`llmuxd run` with `gpu_probe: nvidia-smi`: a sleeping model's /v1/models entry carries
    the verdict where it is not plainly verified per process."""
    from daemon_process import DaemonProcess, daemon_env, http_json, sim_model, write_config

    ledger = tmp_path / "gpu.json"
    models = {"alpha": sim_model("org/alpha", ledger, 4000), "beta": sim_model("org/beta", ledger, 4000)}
    config = write_config(tmp_path, models, gpu_probe="nvidia-smi")
    env = without_host_nvml(daemon_env())
    env.update(PATH=f"{FAKE_BIN}:{env['PATH']}", FAKE_NVIDIA_SMI_LEDGER=str(ledger), **driver)
    daemon = DaemonProcess(config, tmp_path / "llmuxd.log", env=env).wait_ready()
    try:
        for model in ("alpha", "beta"):  # beta's request puts alpha to sleep
            body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode()
            assert http_json(daemon.base + "/v1/completions", body, {"Content-Type": "application/json"})[0] == 200
        _, _, listing = http_json(daemon.base + "/v1/models")
        alpha = next(m["llmux"] for m in listing["data"] if m["id"] == "alpha")
        assert alpha["process_state"].startswith("sleeping"), alpha
        assert alpha.get("sleep_check") == check
        if check:
            assert "device-level" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


#: a backend whose worker leaves its process group (a session of its own), as some launchers do
ESCAPING_BACKEND = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


async def test_a_backends_processes_are_its_group_and_its_whole_tree(tmp_path):
    """Embedded mode: verified eviction measures every process of the backend, also a child
    that left its process group (one PID, or the group alone, would miss its memory)."""
    from llmuxd.runtime.base import LaunchSpec
    from llmuxd.runtime.subprocess import SubprocessRuntime, _group_pids

    runtime = SubprocessRuntime()
    await runtime.connect()
    out, child = tmp_path / "child.pid", None
    handle = await runtime.start(LaunchSpec(model="tree", argv=(
        "/bin/sh", "-c", f"exec {sys.executable} -c '{ESCAPING_BACKEND}' > {out}")))
    try:
        for _ in range(200):
            if out.exists() and out.read_text().strip():
                break
            await asyncio.sleep(0.05)
        child = int(out.read_text())
        assert child not in _group_pids(handle.main_pid)  # control: it did leave the group
        assert set(await runtime.pids(handle)) == {handle.main_pid, child}
    finally:
        if child:
            os.kill(child, 9)  # first: it holds the backend's output pipe open
        await runtime.stop(handle, timeout=5)
        await runtime.close()
