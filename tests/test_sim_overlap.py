"""llmux-vllm-sim's partial sleep and wake steps, as vLLM 0.32 does them
(reference/vllm-api.md §3.3): `/sleep?level=0`, `/release_kv_cache_memory`
(only after a pause; refused on the CPU), `/wake_up?tags=...`, and the host
link that weights cross (llmuxd/sim/link.py). Timings are benchmarks
(benchmarks/overlap_switch.py), never asserted here."""

from __future__ import annotations

import json
import os

import pytest

from llmuxd.sim.ledger import GpuLedger
from llmuxd.sim.link import D2H, H2D, HostLink
from sim_fixtures import mode_sim_factory, sim_cache, sim_factory  # noqa: F401

NOT_PAUSED = ("Call to release_kv_cache_memory method failed: "
              "release_kv_cache_memory() requires a completed pause first")
CPU_REFUSAL = "Selective discard is not supported on CPU"
GPU_MB, WEIGHTS_MB, RESIDUE_MB = 3000, 1600, 200


def ledger_env(tmp_path, **extra: str) -> dict[str, str]:
    ledger = tmp_path / "gpu.json"
    ledger.write_text(json.dumps({"capacity_mb": 20000, "reservations": {}}))
    return {"LLMUX_SIM_GPU_LEDGER": str(ledger), "LLMUX_SIM_GPU_MB": str(GPU_MB),
            "LLMUX_SIM_GPU_WEIGHTS_MB": str(WEIGHTS_MB), "LLMUX_SIM_GPU_RESIDUE_MB": str(RESIDUE_MB), **extra}


def reserved(tmp_path) -> int:
    return GpuLedger(str(tmp_path / "gpu.json")).snapshot()["used_mb"]


def error_message(sim, method: str, path: str) -> tuple[int, str]:
    status, body = sim.json(method, path)
    return status, body["error"]["message"]


def test_release_before_a_pause_is_refused_like_vllm(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("alpha")
    assert error_message(sim, "POST", "/release_kv_cache_memory") == (500, NOT_PAUSED)
    assert sim.json("POST", "/sleep?level=1")[0] == 200
    assert sim.json("POST", "/wake_up")[0] == 200
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": False}
    assert sim.answer()


def test_partial_steps_free_and_bring_back_memory_one_part_at_a_time(sim_factory, tmp_path):  # noqa: F811
    sim = sim_factory("alpha", env=ledger_env(tmp_path))
    before = sim.answer()
    assert reserved(tmp_path) == GPU_MB
    assert sim.json("POST", "/sleep?level=0") == (200, {"status": "sleeping", "level": 0})
    assert reserved(tmp_path) == GPU_MB  # level 0 only pauses
    assert sim.request("POST", "/release_kv_cache_memory")[0] == 200
    assert reserved(tmp_path) == RESIDUE_MB + WEIGHTS_MB  # the KV cache is gone, the weights stay
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}
    assert sim.json("POST", "/sleep?level=1")[0] == 200  # the weights leave after it
    assert reserved(tmp_path) == RESIDUE_MB
    assert sim.state()["sleep_state"] == "weights_offloaded"
    assert sim.json("POST", "/wake_up?tags=weights") == (200, {"status": "sleeping", "tags": ["weights"]})
    assert reserved(tmp_path) == RESIDUE_MB + WEIGHTS_MB
    assert sim.json("POST", "/wake_up?tags=kv_cache") == (200, {"status": "awake", "tags": ["kv_cache"]})
    assert sim.json("POST", "/wake_up?tags=scheduling") == (200, {"status": "awake", "tags": ["scheduling"]})
    assert reserved(tmp_path) == GPU_MB
    assert sim.answer() == before


def test_discard_after_release_needs_the_reload(sim_factory, tmp_path):  # noqa: F811
    sim = sim_factory("alpha", env=ledger_env(tmp_path))
    before = sim.answer()
    assert sim.json("POST", "/sleep?level=0")[0] == 200
    assert sim.request("POST", "/release_kv_cache_memory")[0] == 200
    assert sim.json("POST", "/sleep?level=2")[0] == 200
    assert sim.state()["sleep_state"] == "discard_all"
    assert sim.json("POST", "/wake_up?tags=weights")[1]["status"] == "sleeping"
    assert sim.json("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    for tag in ("kv_cache", "scheduling"):
        assert sim.json("POST", f"/wake_up?tags={tag}")[0] == 200
    assert sim.answer() == before


@pytest.mark.parametrize("env", [{"LLMUX_SIM_PLATFORM": "cpu"}, {"LLMUX_SIM_SELECTIVE_DISCARD": "0"}],
                         ids=["platform-cpu", "selective-discard-0"])
def test_cpu_refuses_the_release_and_the_sequential_way_still_works(sim_factory, tmp_path, env):  # noqa: F811
    """What vLLM 0.32 does on the CPU: the release is refused, the rest works
    and the model answers as before."""
    sim = sim_factory("alpha", env=ledger_env(tmp_path, **env))
    before = sim.answer()
    assert sim.json("POST", "/sleep?level=0")[0] == 200
    status, message = error_message(sim, "POST", "/release_kv_cache_memory")
    assert status == 500 and CPU_REFUSAL in message
    assert reserved(tmp_path) == GPU_MB  # nothing was freed
    assert sim.json("POST", "/sleep?level=1")[0] == 200
    assert sim.json("POST", "/wake_up?tags=weights")[1]["status"] == "sleeping"
    assert sim.json("POST", "/wake_up?tags=kv_cache")[1]["status"] == "awake"
    assert sim.json("POST", "/wake_up?tags=scheduling")[1]["status"] == "awake"
    assert sim.answer() == before


def test_fault_fail_wake_midway_keeps_the_memory_it_mapped(sim_factory, tmp_path):  # noqa: F811
    """vLLM PR #34600: a failed wake leaks what it mapped; llmux must stop the model."""
    sim = sim_factory("alpha", env=ledger_env(tmp_path))
    assert sim.json("POST", "/sleep?level=1")[0] == 200
    assert sim.json("POST", "/sim/fault", {"kind": "fail_wake_midway"})[0] == 200
    status, message = error_message(sim, "POST", "/wake_up?tags=weights")
    assert status == 500 and "fail_wake_midway" in message
    assert reserved(tmp_path) == RESIDUE_MB + WEIGHTS_MB
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}


def test_link_counts_transfers_per_direction_across_processes(tmp_path):
    """Each direction is its own lane; the same direction is shared by every
    live process's transfers (markers of dead processes do not count)."""
    link = HostLink(25, 25, str(tmp_path))
    assert (link.running(H2D), link.running(D2H)) == (0, 0)
    (tmp_path / f"h2d-{os.getpid()}-0").touch()
    (tmp_path / f"h2d-{os.getppid()}-1").touch()
    (tmp_path / "h2d-999999999-2").touch()  # no such process
    assert (link.running(H2D), link.running(D2H)) == (2, 0)
    assert link.seconds_alone(H2D, 25 * 10**9) == pytest.approx(1.0)
    assert HostLink(0, 0).seconds_alone(H2D, 10**12) == 0.0


@pytest.mark.parametrize("flag", ["--h2d-gbps", "--d2h-gbps"])
def test_negative_bandwidth_is_refused_at_start(flag):
    from llmuxd.sim.settings import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", "m", flag, "-1"])
    assert "must not be negative" in str(exc.value)
