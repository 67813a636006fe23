"""cuda_suspend (fake cuda-checkpoint), verified eviction and the post-wake canary,
on the vLLM simulator under the subprocess runtime (no root, no GPU needed)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from llmuxd.checkpoint.gpu_probe import Measurement
from llmuxd.checkpoint.manager import CheckpointManager, strip_expandable_segments
from llmuxd.config import Config
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import BackendState
from llmuxd.orchestrator import Orchestrator
from llmuxd.runtime.subprocess import SubprocessRuntime
from stand_in import no_host_nvml
from sysd.helpers import PYTHON, ahttp, completion, free_port

FAKE_BIN = Path(__file__).resolve().parent / "fake-bin"
FAKE_CUDA = str(FAKE_BIN / "cuda-checkpoint")
#: the simulator with its weights as real tensors on the CPU (32 MiB)
DEVICE_ARGS = ["--device", "cpu", "--sim-weights-gib", "0.03125"]
SIM_COMMAND = [PYTHON, "-m", "llmuxd.sim.server", "serve"]
PROMPT = "What is the capital of France?"


@pytest.fixture(autouse=True)
def _no_host_nvml(monkeypatch):
    """`gpu_probe: auto` must not find the host's NVML: nvidia-ml-py here has no driver."""
    no_host_nvml(monkeypatch)


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    d = tmp_path / "fake-cuda"
    d.mkdir()
    monkeypatch.setenv("FAKE_CUDA_CHECKPOINT_DIR", str(d))
    return d


def calls(fake_dir: Path) -> list[str]:
    path = fake_dir / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
async def make(tmp_path):
    made: list[Orchestrator] = []

    async def factory(*, eviction: str, checkpoint: bool = True, extra_args=(), env=None, unsafe=None,
                      gpu_probe: str = "ledger", command=SIM_COMMAND):
        runtime = SubprocessRuntime()
        await runtime.connect()
        data = {
            "gpu_probe": gpu_probe,
            "models": {"m": {
                "model_path": "/models/m", "command": list(command), "port": free_port(), "startup_timeout": 120,
                "eviction": eviction, "extra_args": list(extra_args), "env": dict(env or {}),
            }},
        }
        if checkpoint:
            data["checkpoint"] = {"cuda_checkpoint_path": FAKE_CUDA, "images_dir": str(tmp_path / "images")}
        orch = Orchestrator(Config.from_dict(data), runtime, stop_timeout=10)
        manager = CheckpointManager(orch.config, on_unsafe=unsafe).install(orch)
        made.append(orch)
        return orch, manager

    yield factory
    for orch in made:
        await orch.close()
        await orch.runtime.close()


async def answer(orch: Orchestrator) -> str:
    return await asyncio.to_thread(completion, orch.endpoint("m"), "m", PROMPT)


def log_rpcs(orch: Orchestrator, fake_dir: Path) -> None:
    """Record collective_rpc calls in the fake's call log, so one log shows the order."""
    engine = orch._get("m").engine
    real = engine.collective_rpc

    async def logged(method, *a, **kw):
        with open(fake_dir / "calls.log", "a") as f:
            f.write(f"rpc {method}\n")
        return await real(method, *a, **kw)

    engine.collective_rpc = logged


# -- cuda_suspend ---------------------------------------------------------------

async def test_cuda_suspend_toggles_every_cuda_process_out_and_back(make, fake_cuda):
    orch, _ = await make(eviction="offload+cuda_suspend")
    await orch.ensure_awake("m")
    before = await answer(orch)
    pid = orch.status("m").main_pid
    await orch.sleep("m", Eviction.parse("offload+cuda_suspend"))
    assert orch.state("m") is BackendState.SLEEPING
    assert calls(fake_cuda) == [f"get-state {pid} -> running", f"get-state {pid} -> running",
                                f"toggle {pid} -> checkpointed"]
    await orch.ensure_awake("m")
    assert calls(fake_cuda)[-2:] == [f"get-state {pid} -> checkpointed", f"toggle {pid} -> running"]
    assert await answer(orch) == before


async def test_tp2_suspends_nccl_before_and_resumes_after(make, fake_cuda):
    orch, _ = await make(eviction="retain+cuda_suspend", extra_args=["--tensor-parallel-size", "2"])
    await orch.ensure_awake("m")
    log_rpcs(orch, fake_cuda)
    await orch.sleep("m", Eviction.parse("retain+cuda_suspend"))
    await orch.ensure_awake("m")
    order = [c.split(" ->")[0].rsplit(" ", 1)[0] if c.startswith(("toggle", "get")) else c for c in calls(fake_cuda)]
    order = [c for c in order if c != "get-state"]
    assert order == ["rpc suspend_nccl", "toggle", "toggle", "rpc resume_nccl"]


async def test_failing_toggle_escalates_to_stop(make, fake_cuda):
    (fake_cuda / "fail").write_text("toggle\n")
    orch, _ = await make(eviction="offload+cuda_suspend")
    await orch.ensure_awake("m")
    await orch.sleep("m", Eviction.parse("offload+cuda_suspend"))
    assert orch.state("m") is BackendState.STOPPED
    assert "CUDA_ERROR_OUT_OF_MEMORY" in orch.status("m").reason
    await orch.ensure_awake("m")  # a cold start brings it back
    assert orch.state("m") is BackendState.READY


async def test_backend_without_cuda_process_cannot_be_suspended(make, fake_cuda):
    (fake_cuda / "cuda_pids").write_text("1\n")  # only PID 1 "is" CUDA: not ours
    orch, _ = await make(eviction="offload+cuda_suspend")
    await orch.ensure_awake("m")
    await orch.sleep("m", Eviction.parse("offload+cuda_suspend"))
    assert orch.state("m") is BackendState.STOPPED
    assert "no CUDA process" in orch.status("m").reason


# -- verified eviction ---------------------------------------------------------------

def ledger_env(tmp_path) -> dict:
    return {"LLMUX_SIM_GPU_LEDGER": str(tmp_path / "ledger.json"), "LLMUX_SIM_GPU_MB": "4000",
            "LLMUX_SIM_GPU_RESIDUE_MB": "500"}


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """tests/fake-bin/nvidia-smi first on PATH, reporting what the simulators hold
    (their ledger, where ledger_env puts it)."""
    monkeypatch.setenv("PATH", f"{FAKE_BIN}:{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_LEDGER", str(tmp_path / "ledger.json"))
    monkeypatch.setenv("FAKE_NVIDIA_SMI_LOG", str(tmp_path / "nvidia-smi.log"))
    return tmp_path / "nvidia-smi.log"


@pytest.mark.parametrize("gpu_probe", ["ledger", "nvidia-smi", "auto"])
async def test_sleep_is_measured_and_one_that_keeps_memory_escalates_to_stop(make, tmp_path, fake_nvidia_smi,
                                                                              gpu_probe, caplog):
    """The simulators' ledger read directly, or through nvidia-smi (tests/fake-bin) by PID."""
    orch, manager = await make(eviction="offload+keep_running", checkpoint=False, env=ledger_env(tmp_path),
                               gpu_probe=gpu_probe)
    await orch.ensure_awake("m")
    await orch.sleep("m", Eviction.parse("offload+keep_running"))
    assert orch.state("m") is BackendState.SLEEPING
    assert (manager.last_residue_mb["m"], manager.effectiveness["m"]) == (500, pytest.approx(0.875))
    await orch.ensure_awake("m")
    status, body = await ahttp("POST", f"{orch.endpoint('m')}/sim/fault", {"kind": "sleep_keeps_memory"})
    assert status == 200, body
    await orch.sleep("m", Eviction.parse("offload+keep_running"))
    assert orch.state("m") is BackendState.STOPPED
    assert "left 4000 MiB on the GPU" in orch.status("m").reason
    assert "still hold 4000 MiB on the GPU" in caplog.text and "escalating to retain+stop" in caplog.text
    assert manager.effectiveness["m"] == 1.0
    asked_nvidia_smi = fake_nvidia_smi.exists() and "--query-compute-apps" in fake_nvidia_smi.read_text()
    assert asked_nvidia_smi is (gpu_probe != "ledger")
    await orch.ensure_awake("m")
    assert orch.state("m") is BackendState.READY


async def test_escalation_tries_cuda_suspend_before_stop(make, tmp_path, fake_cuda):
    orch, _ = await make(eviction="offload+keep_running", env=ledger_env(tmp_path))
    await orch.ensure_awake("m")
    await ahttp("POST", f"{orch.endpoint('m')}/sim/fault", {"kind": "sleep_keeps_memory"})
    await orch.sleep("m", Eviction.parse("offload+keep_running"))
    # the fake toggle frees nothing in the ledger, so it goes on to stop
    assert any(c.startswith("toggle") for c in calls(fake_cuda))
    assert orch.state("m") is BackendState.STOPPED


@pytest.mark.parametrize("driver", [{"FAKE_NVIDIA_SMI_MEMORY": "na"}, {"FAKE_NVIDIA_SMI_PROCESSES": "none"}])
@pytest.mark.parametrize("keeps_memory", [False, True])
async def test_without_per_process_figures_the_device_level_is_named_and_never_escalates(
        make, tmp_path, fake_nvidia_smi, monkeypatch, caplog, driver, keeps_memory):
    """nvidia-smi answering "[N/A]" per process, or listing no process (gVisor-like): the
    GPU's used memory stands in, "device-level" in the journal line and the status; a sleep
    that seems to keep memory there is reported unverified, not escalated on that figure."""
    caplog.set_level("INFO", "llmuxd.checkpoint")
    for key, value in driver.items():
        monkeypatch.setenv(key, value)
    orch, manager = await make(eviction="offload+keep_running", checkpoint=False, env=ledger_env(tmp_path),
                               gpu_probe="nvidia-smi")
    await orch.ensure_awake("m")
    if keeps_memory:
        await ahttp("POST", f"{orch.endpoint('m')}/sim/fault", {"kind": "sleep_keeps_memory"})
    await orch.sleep("m", Eviction.parse("offload+keep_running"))
    assert orch.state("m") is BackendState.SLEEPING
    verdict = manager.verdicts["m"]
    assert verdict.after.method == "nvidia-smi device-level" and verdict.verified is not keeps_memory
    reason = orch.status("m").reason
    line = [r.getMessage() for r in caplog.records if "model m: sleep (offload+keep_running)" in r.getMessage()][-1]
    if keeps_memory:
        assert reason == "sleep not verified device-level: 4000 -> 4000 MiB by nvidia-smi device-level: " \
                         "4000 MiB left, at most 1024 expected"
        assert "not verified (device-level" in line and "escalating" not in caplog.text
    else:
        assert reason == "sleep verified device-level: 4000 -> 500 MiB by nvidia-smi device-level"
        assert "verified (device-level: the used memory of its GPUs" in line


class SeesNothing:
    """A probe that lists none of the backend's processes (a PID namespace hiding them)."""

    name = "nvml"

    async def measure(self, pids, gpus=()):
        return Measurement(0, "NVML per process")

    async def usage_mb(self, pids):
        return 0


async def test_a_sleep_whose_memory_was_never_seen_is_reported_unverified(make, tmp_path, caplog):
    """Negative control: 0 MiB before and after is not "freed": the model's expected 4000 MiB
    (its simulator's size) were never seen, so the sleep is unverified, in its status too."""
    orch, manager = await make(eviction="offload+keep_running", checkpoint=False, env=ledger_env(tmp_path))
    manager._probe_factory = lambda env: SeesNothing()
    await orch.ensure_awake("m")
    await orch.sleep("m", Eviction.parse("offload+keep_running"))
    assert orch.state("m") is BackendState.SLEEPING
    verdict = manager.verdicts["m"]
    assert (verdict.verified, verdict.seen) == (False, False)
    assert orch.status("m").reason == (
        "sleep not verified: could not see the backend's memory (0 -> 0 MiB by NVML per process; before the "
        "sleep it must hold at least 2000 MiB, half its expected 4000 MiB)")
    assert manager.effectiveness["m"] is None
    assert "model m: sleep (offload+keep_running) not verified: could not see the backend's memory" in caplog.text
    await orch.ensure_awake("m")
    assert orch.status("m").reason is None  # awake again: nothing left to report


async def test_a_measured_sleep_is_verified_in_one_line_naming_the_method(make, tmp_path, caplog):
    caplog.set_level("INFO", "llmuxd.checkpoint")
    orch, manager = await make(eviction="offload+keep_running", checkpoint=False, env=ledger_env(tmp_path))
    await orch.ensure_awake("m")
    await orch.sleep("m", Eviction.parse("offload+keep_running"))
    assert manager.verdicts["m"].verified
    assert ("model m: sleep (offload+keep_running) verified: 4000 -> 500 MiB by simulator ledger per process"
            in caplog.text)


def test_expandable_segments_is_stripped_with_a_warning(caplog):
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128", "X": "1"}
    assert strip_expandable_segments("m", env) == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "X": "1"}
    assert strip_expandable_segments("m", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}) == {}
    assert "vLLM sleep frees no memory" in caplog.text


async def test_backend_env_of_a_sleeping_model_has_no_expandable_segments(make):
    orch, _ = await make(eviction="offload+keep_running", checkpoint=False,
                         env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    await orch.ensure_awake("m")
    with open(f"/proc/{orch.status('m').main_pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    assert not any(e.startswith(b"PYTORCH_CUDA_ALLOC_CONF=") for e in environ)


# -- canary -------------------------------------------------------------------------

async def test_garbage_after_discard_wake_stops_marks_unsafe_and_cold_starts(make):
    verdicts = []
    orch, manager = await make(eviction="discard+keep_running", checkpoint=False,
                               unsafe=lambda *v: verdicts.append(v))
    await orch.ensure_awake("m")
    good = await answer(orch)
    old_pid = orch.status("m").main_pid
    await orch.sleep("m", Eviction.parse("discard+keep_running"))
    status, body = await ahttp("POST", f"{orch.endpoint('m')}/sim/fault", {"kind": "garbage", "count": -1})
    assert status == 200, body
    await orch.ensure_awake("m")
    assert orch.state("m") is BackendState.READY
    assert orch.status("m").main_pid != old_pid  # stopped and cold-started
    assert await answer(orch) == good
    assert verdicts and verdicts[0][:2] == ("m", "discard+keep_running")
    assert "deterministic answer changed" in verdicts[0][2]
    # the next sleep uses a safer eviction
    await orch.sleep("m", Eviction.parse("discard+keep_running"))
    assert str(orch.status("m").eviction) == "offload+keep_running"
    state = json.loads(json.dumps(manager.canary.unsafe, default=list))
    assert state == {"m": ["discard+keep_running"]}


@pytest.mark.parametrize("extra_args", [
    pytest.param([], id="ledger"), pytest.param(DEVICE_ARGS, id="torch-cpu", marks=pytest.mark.torch)])
async def test_good_discard_wake_passes_the_canary(make, extra_args):
    verdicts = []
    orch, _ = await make(eviction="discard+keep_running", checkpoint=False, unsafe=lambda *v: verdicts.append(v),
                         extra_args=extra_args)
    await orch.ensure_awake("m")
    pid = orch.status("m").main_pid
    for _ in range(2):
        await orch.sleep("m", Eviction.parse("discard+keep_running"))
        await orch.ensure_awake("m")
    assert orch.status("m").main_pid == pid and verdicts == []


@pytest.mark.torch
async def test_a_wrong_reload_after_discard_is_caught_by_the_canary(make):
    """reload_weights answers 200 but the weights hold other bytes: only the checksum
    the answer carries shows it, and the canary stops the model and cold-starts it."""
    verdicts = []
    orch, _ = await make(eviction="discard+keep_running", checkpoint=False, unsafe=lambda *v: verdicts.append(v),
                         extra_args=DEVICE_ARGS)
    await orch.ensure_awake("m")
    good = await answer(orch)
    old_pid = orch.status("m").main_pid
    await orch.sleep("m", Eviction.parse("discard+keep_running"))
    status, body = await ahttp("POST", f"{orch.endpoint('m')}/sim/fault", {"kind": "wrong_reload"})
    assert status == 200, body
    await orch.ensure_awake("m")
    assert orch.state("m") is BackendState.READY
    assert orch.status("m").main_pid != old_pid  # stopped and cold-started
    assert await answer(orch) == good
    assert [v[:2] for v in verdicts] == [("m", "discard+keep_running")]
    assert "deterministic answer changed" in verdicts[0][2]


def test_unsafe_verdicts_round_trip_through_the_daemon_state():
    from llmuxd.checkpoint.canary import Canary, record_unsafe, unsafe_from_quarantine
    from llmuxd.daemon.state import DaemonState

    state = DaemonState()
    canary = Canary(on_unsafe=lambda m, e, r: record_unsafe(state.quarantine, m, e, r))
    canary.mark_unsafe("m", Eviction.parse("discard+checkpoint"), "answer changed")
    restarted = DaemonState.from_dict(json.loads(json.dumps(state.to_dict())))
    fresh = Canary()
    fresh.load_unsafe(unsafe_from_quarantine(restarted.quarantine))
    assert fresh.effective("m", Eviction.parse("discard+checkpoint")) == Eviction.parse("retain+stop")
    assert fresh.effective("m", Eviction.parse("discard+keep_running")) == Eviction.parse("discard+keep_running")


async def test_old_driver_without_get_state_falls_back_to_gpu_mappings(make, fake_cuda):
    (fake_cuda / "no_get_state").write_text("")
    orch, _ = await make(eviction="offload+cuda_suspend")
    await orch.ensure_awake("m")
    pid = orch.status("m").main_pid
    await orch.sleep("m", Eviction.parse("offload+cuda_suspend"))
    # asked, got no answer, looked for /dev/nvidia mappings: the simulator has none
    assert f"get-state {pid} -> unsupported" in calls(fake_cuda)
    assert orch.state("m") is BackendState.STOPPED
    assert "no CUDA process" in orch.status("m").reason


async def test_preflight_names_missing_tools(tmp_path):
    config = Config.from_dict({
        "checkpoint": {"criu_path": "/nonexistent/criu", "cuda_checkpoint_path": "/nonexistent/cuda-checkpoint",
                       "images_dir": str(tmp_path)},
        "models": {
            "a": {"model_path": "/m/a", "command": SIM_COMMAND, "eviction": "discard+checkpoint"},
            "b": {"model_path": "/m/b", "command": SIM_COMMAND, "eviction": "retain+cuda_suspend"},
        },
    })
    problems = await CheckpointManager(config).preflight()
    assert problems[0].startswith("checkpoint evictions will stop models instead: cannot run '/nonexistent/criu'")
    assert "install cuda-checkpoint or set checkpoint.cuda_checkpoint_path" in problems[1]


def test_reload_deletes_the_images_of_removed_models(tmp_path):
    def config(*names):
        return Config.from_dict({"checkpoint": {"images_dir": str(tmp_path)},
                                 "models": {n: {"model_path": f"/m/{n}", "command": SIM_COMMAND} for n in names}})

    manager = CheckpointManager(config("a", "b"))
    for name in ("a", "b"):
        manager.catalogue.stage(name)
    assert manager.reload(config("a")) == ["b"]
    assert manager.catalogue.models() == ["a"]


async def test_an_unreadable_ledger_reads_as_cannot_tell(tmp_path):
    """Verified eviction must not turn a probe that cannot read into a failed sleep."""
    from llmuxd.checkpoint.gpu_probe import LedgerProbe

    assert await LedgerProbe(str(tmp_path)).usage_mb([1]) is None  # a directory, not a ledger


async def test_a_checkpointed_wake_gets_the_startup_timeout_not_just_wake_timeout(tmp_path):
    """A checkpointed model's wake may download its image, restore it, or cold-start
    when that fails: it is bounded by startup_timeout (as the switcher bounds it),
    not by the shorter wake_timeout."""
    from llmuxd.orchestrator import ModelPhase

    class SlowRestore:  # a download that takes longer than wake_timeout, then a cold start
        phase = ModelPhase.CHECKPOINTED

        async def apply(self, orchestrator, m):
            raise AssertionError("not used")

        async def revert(self, orchestrator, m):
            await asyncio.sleep(1.5)
            await orchestrator._start(m)
            return True

    runtime = SubprocessRuntime()
    await runtime.connect()
    config = Config.from_dict({
        "policy": {"wake_timeout": 1},
        "checkpoint": {"images_dir": str(tmp_path / "images")},
        "models": {"m": {"model_path": "/models/m", "command": SIM_COMMAND, "port": free_port(),
                         "startup_timeout": 60, "eviction": "discard+checkpoint"}},
    })
    orch = Orchestrator(config, runtime, stop_timeout=10)
    try:
        orch.process_steps[Eviction.parse("discard+checkpoint").process] = SlowRestore()
        orch._set(orch._get("m"), ModelPhase.CHECKPOINTED, eviction=Eviction.parse("discard+checkpoint"))
        await orch.ensure_awake("m")
        assert orch.state("m") is BackendState.READY, orch.status("m").reason
    finally:
        await orch.close()
        await runtime.close()
