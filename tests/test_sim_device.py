"""llmux-vllm-sim --device: weights and KV cache as real torch tensors.

On this machine the device is the CPU, so "device memory" is the simulator's
own resident memory: what sleep frees must show in /proc/PID/status (VmRSS),
not only in what the simulator says about itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmuxd.sim.device import ACTIVATION_RESERVE, GIB, TORCH_MISSING, kv_cache_bytes
from sim_fixtures import PROMPT, SimProcess, sim_cache, sim_env, sim_factory  # noqa: F401

MIB = 1 << 20
WEIGHTS_MIB = 96
KV_MIB = 64
#: freed memory may come back to the OS a little short of the tensor size (allocator pages)
SLACK = 0.85


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def answer_and_checksum(sim: SimProcess) -> tuple[str, str]:
    import json

    status, headers, raw = sim.request("POST", "/v1/completions", PROMPT)
    assert status == 200, raw
    return json.loads(raw)["choices"][0]["text"], headers.get("X-Sim-Weights-Checksum", "")


@pytest.fixture
def big_sim(sim_factory) -> SimProcess:  # noqa: F811
    return sim_factory("tensors", device="cpu",
                       args=["--sim-weights-gib", str(WEIGHTS_MIB / 1024), "--sim-kv-cache-gib", str(KV_MIB / 1024)])


# -- sizing (pure; no torch needed) -----------------------------------------------------

@pytest.mark.parametrize("kw,expected", [
    (dict(device="cpu", explicit_gib=0.5), GIB // 2),
    (dict(device="cpu", cpu_space_gib=2.0), 2 * GIB),
    (dict(device="cpu"), 3 * GIB),  # no VLLM_CPU_KVCACHE_SPACE: as much as the weights
    (dict(device="cuda", total_bytes=80 * GIB, free_bytes=79 * GIB, utilization=0.5),
     40 * GIB - 3 * GIB - ACTIVATION_RESERVE),
    (dict(device="cuda", total_bytes=80 * GIB, free_bytes=10 * GIB, explicit_gib=1.0), GIB),
])
def test_kv_cache_is_sized_as_vllm_does(kw, expected):
    args = dict(weights_bytes=3 * GIB, utilization=0.9, explicit_gib=None, total_bytes=None, free_bytes=None,
                cpu_space_gib=None)
    assert kv_cache_bytes(**{**args, **kw}) == expected


@pytest.mark.parametrize("kw,message", [
    (dict(total_bytes=80 * GIB, free_bytes=30 * GIB, utilization=0.5),
     "Free memory on device (30.00/80.00 GiB) on startup is less than desired GPU memory utilization (0.5"),
    (dict(total_bytes=8 * GIB, free_bytes=8 * GIB, utilization=0.3),
     "No available memory for the cache blocks. Try increasing `gpu_memory_utilization`"),
])
def test_kv_cache_that_cannot_be_sized_fails_with_vllms_message(kw, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        kv_cache_bytes(device="cuda", weights_bytes=3 * GIB, explicit_gib=None, cpu_space_gib=None, **kw)


# -- without torch ----------------------------------------------------------------------

def test_device_without_torch_is_one_line_naming_the_extra(sim_cache, tmp_path):  # noqa: F811
    """Debian's venv has no torch; where torch is installed a shadowing package hides it."""
    hide = tmp_path / "no-torch" / "torch"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    env = sim_env(sim_cache)
    env["PYTHONPATH"] = f"{hide.parent}:{Path(__file__).resolve().parent.parent}"
    result = subprocess.run([sys.executable, "-m", "llmuxd.sim.server", "serve", "/models/x", "--device", "cpu",
                             "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == TORCH_MISSING
    assert "llmux[torch]" in TORCH_MISSING and "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "--device 'tpu' is not one of cuda, cpu"),
    (["--device", "cpu", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5 must be in (0, 1]"),
])
def test_bad_device_flags_are_one_line_errors(argv, message, sim_cache):  # noqa: F811
    result = subprocess.run([sys.executable, "-m", "llmuxd.sim.server", "serve", "/models/x", *argv],
                            env=sim_env(sim_cache), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr.splitlines()[0]


# -- with torch, on the CPU ---------------------------------------------------------------

@pytest.mark.torch
def test_device_cuda_without_a_gpu_says_so(sim_cache):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = subprocess.run([sys.executable, "-m", "llmuxd.sim.server", "serve", "/models/x", "--device", "cuda"],
                            env=sim_env(sim_cache), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("finds no CUDA device (a CPU build, or no driver); use --device cpu")


@pytest.mark.torch
def test_start_holds_weights_and_kv_cache_as_tensors(big_sim):
    st = big_sim.state()
    dev = st["device"]
    assert dev["device"] == "cpu" and dev["weights_on_device"] and dev["kv_cache_on_device"]
    assert (st["weights_bytes"], dev["kv_cache_bytes"]) == (WEIGHTS_MIB * MIB, KV_MIB * MIB)
    assert dev["device_bytes"] == (WEIGHTS_MIB + KV_MIB) * MIB
    assert st["gpu_reserved_mb"] == WEIGHTS_MIB + KV_MIB
    assert Path(st["weights_path"]).stat().st_size == WEIGHTS_MIB * MIB  # the file reloads read


@pytest.mark.torch
def test_level_1_frees_the_kv_cache_and_keeps_a_host_copy_of_the_weights(big_sim):
    before_answer = answer_and_checksum(big_sim)
    awake = rss_bytes(big_sim.pid)
    assert big_sim.json("POST", "/sleep?level=1")[0] == 200
    asleep = rss_bytes(big_sim.pid)
    dev = big_sim.state()["device"]
    assert (dev["device_bytes"], dev["host_copy_bytes"]) == (0, WEIGHTS_MIB * MIB)
    assert not dev["host_copy_pinned"]  # pinned memory only on CUDA
    # on the CPU the host copy is the same RAM again: only the KV cache leaves
    assert awake - asleep >= SLACK * KV_MIB * MIB
    assert awake - asleep < (KV_MIB + WEIGHTS_MIB * SLACK) * MIB
    assert big_sim.json("POST", "/wake_up")[0] == 200
    assert rss_bytes(big_sim.pid) - asleep >= SLACK * KV_MIB * MIB
    assert big_sim.state()["device"]["host_copy_bytes"] == 0
    assert answer_and_checksum(big_sim) == before_answer


@pytest.mark.torch
def test_level_2_frees_weights_and_kv_cache_and_reload_brings_the_same_answer(big_sim):
    good, checksum = answer_and_checksum(big_sim)
    awake = rss_bytes(big_sim.pid)
    assert big_sim.json("POST", "/sleep?level=2")[0] == 200
    assert awake - rss_bytes(big_sim.pid) >= SLACK * (WEIGHTS_MIB + KV_MIB) * MIB
    dev = big_sim.state()["device"]
    assert (dev["device_bytes"], dev["host_copy_bytes"]) == (0, 0)
    assert big_sim.json("POST", "/wake_up")[0] == 200
    garbage, fresh = answer_and_checksum(big_sim)  # uninitialised weights: vLLM #29341
    assert garbage.startswith("\ufffdgarbage") and fresh != checksum
    assert big_sim.request("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    assert answer_and_checksum(big_sim) == (good, checksum)


@pytest.mark.torch
def test_a_wrong_reload_changes_the_answer_through_the_checksum(big_sim):
    """The reload answers 200 and the engine believes its weights: only the bytes
    differ, and the answer shows it (what the post-wake canary compares)."""
    good, checksum = answer_and_checksum(big_sim)
    assert big_sim.state()["weights_checksum"] == checksum
    big_sim.fault("wrong_reload")
    big_sim.json("POST", "/sleep?level=2")
    big_sim.json("POST", "/wake_up")
    assert big_sim.request("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    st = big_sim.state()
    assert st["weights_valid"] and st["weights_checksum"] != checksum
    wrong, wrong_sum = answer_and_checksum(big_sim)
    assert wrong != good and not wrong.startswith("\ufffdgarbage") and wrong_sum == st["weights_checksum"]
    # a correct reload brings the right bytes back
    assert big_sim.request("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    assert answer_and_checksum(big_sim) == (good, checksum)


@pytest.mark.torch
def test_sleep_keeps_memory_fault_keeps_the_tensors(big_sim):
    awake = rss_bytes(big_sim.pid)
    big_sim.fault("sleep_keeps_memory")
    assert big_sim.json("POST", "/sleep?level=1")[0] == 200
    st = big_sim.state()
    assert st["is_sleeping"] and st["device"]["device_bytes"] == (WEIGHTS_MIB + KV_MIB) * MIB
    assert awake - rss_bytes(big_sim.pid) < SLACK * KV_MIB * MIB


@pytest.mark.torch
def test_same_model_same_checksum_across_processes(sim_factory):  # noqa: F811
    """The checksum is a function of the weights file alone: a cold start of the
    same model agrees with the first process, another model does not."""
    first = answer_and_checksum(sim_factory("same", device="cpu"))
    second = answer_and_checksum(sim_factory("same", device="cpu", port=0))
    other = answer_and_checksum(sim_factory("other", device="cpu"))
    assert first == second and other[1] != first[1]
