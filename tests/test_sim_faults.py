"""llmux-vllm-sim fault injection (POST /sim/fault) and the GPU ledger."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from llmuxd.sim.ledger import GpuLedger
from sim_fixtures import PROMPT, SimProcess, mode_sim_factory, sim_cache, sim_factory  # noqa: F401


@pytest.fixture
def sim(mode_sim_factory) -> SimProcess:  # noqa: F811
    """The fault tests run against both ways the simulator holds a model (SIM_MODES)."""
    return mode_sim_factory("faulty")


@pytest.mark.parametrize("kind,method,path,body", [
    ("fail_sleep", "POST", "/sleep?level=1", None),
    ("fail_reload", "POST", "/collective_rpc", {"method": "reload_weights"}),
])
def test_failure_fault_fires_once_with_a_500_envelope(sim, kind, method, path, body):
    sim.fault(kind)
    assert sim.state()["faults"] == {kind: {"count": 1, "seconds": 0.0}}
    status, data = sim.json(method, path, body)
    assert status == 500 and data["error"]["code"] == 500
    assert f"fault {kind}" in data["error"]["message"]
    assert sim.state()["faults"] == {}
    assert sim.json(method, path, body)[0] == 200


def test_fail_wake_leaves_it_asleep(sim):
    sim.json("POST", "/sleep?level=1")
    sim.fault("fail_wake", count=2)
    for _ in range(2):
        status, data = sim.json("POST", "/wake_up")
        assert status == 500 and data["error"]["type"] == "InternalServerError"
        assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}
    assert sim.json("POST", "/wake_up")[1]["status"] == "awake"


def test_hang_sleep_answers_only_when_cleared(sim):
    sim.fault("hang_sleep")
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        sim.request("POST", "/sleep?level=1", timeout=1.0)
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": False}
    assert sim.json("DELETE", "/sim/fault?kind=hang_sleep") == (200, {"faults": []})
    sim.wait_state(lambda st: st["is_sleeping"])  # the hung sleep went through


def test_garbage_fault_until_cleared(sim):
    good = sim.answer()
    sim.fault("garbage")
    assert sim.answer().startswith("\ufffdgarbage") and sim.answer() != good
    sim.json("DELETE", "/sim/fault")
    assert sim.answer() == good


def test_latency_fault_delays_requests(sim):
    sim.fault("latency", seconds=3600)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        sim.request("POST", "/v1/completions", PROMPT, timeout=1.0)
    assert sim.state()["requests_waiting"] == 1


def test_unknown_fault_is_a_400(sim):
    status, data = sim.json("POST", "/sim/fault", {"kind": "meteor"})
    assert status == 400 and "fail_sleep" in data["error"]["message"]


def test_crash_exits_with_code_1(sim):
    sim.fault("crash")
    assert sim.wait_exit(30) == 1
    assert "fault crash: exiting now" in sim.output


def test_crash_mid_stream_cuts_the_stream(sim):
    sim.fault("crash_mid_stream")
    req = urllib.request.Request(sim.url("/v1/completions"), method="POST",
                                 data=json.dumps({"prompt": "x", "max_tokens": 50,
                                                  "stream": True}).encode())
    with pytest.raises(Exception):
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
            assert b"[DONE]" in body  # a complete stream fails the test
    assert sim.wait_exit(30) == 1


def test_slow_start_applies_to_the_next_start_of_that_name(sim_factory):  # noqa: F811
    first = sim_factory("slowpoke")
    first.fault("slow_start", seconds=0.3)
    first.terminate()
    second = sim_factory("slowpoke")
    second.wait_for_line(r"load time 0\.3s")
    third = sim_factory("slowpoke")  # consumed: only the next start
    third.wait_for_line(r"load time 0\.0s")


# --------------------------------------------------------------------------- GPU ledger


@pytest.fixture
def ledger_env(tmp_path):
    path = str(tmp_path / "gpu.json")

    def env(gpu_mb: int, capacity: int = 1000, residue: int = 100) -> dict[str, str]:
        return {"LLMUX_SIM_GPU_LEDGER": path, "LLMUX_SIM_GPU_MB": str(gpu_mb),
                "LLMUX_SIM_GPU_CAPACITY_MB": str(capacity),
                "LLMUX_SIM_GPU_RESIDUE_MB": str(residue)}
    env.path = path  # type: ignore[attr-defined]
    return env


def test_ledger_tracks_start_sleep_and_wake(sim_factory, ledger_env):  # noqa: F811
    ledger = GpuLedger(ledger_env.path)
    a = sim_factory("ga", env=ledger_env(600))
    assert ledger.snapshot()["by_pid"] == {a.pid: 600}
    a.json("POST", "/sleep?level=0")
    assert ledger.snapshot()["used_mb"] == 600  # level 0 frees nothing
    a.json("POST", "/wake_up")
    a.json("POST", "/sleep?level=1")
    snap = ledger.snapshot()
    assert snap["by_pid"] == {a.pid: 100} and snap["free_mb"] == 900
    assert a.state()["gpu_reserved_mb"] == 100
    a.json("POST", "/wake_up")
    assert ledger.snapshot()["by_pid"] == {a.pid: 600}


def test_start_over_capacity_fails_like_cuda_oom(sim_factory, ledger_env):  # noqa: F811
    sim_factory("gb", env=ledger_env(600))
    late = sim_factory("gc", env=ledger_env(600), wait=False)
    assert late.wait_exit(60) == 1
    assert "CUDA out of memory" in late.output
    assert late.port is None


def test_wake_over_capacity_is_a_500_and_stays_asleep(sim_factory, ledger_env):  # noqa: F811
    a = sim_factory("gd", env=ledger_env(600))
    a.json("POST", "/sleep?level=1")
    b = sim_factory("ge", env=ledger_env(600))  # fits now that a sleeps
    status, data = a.json("POST", "/wake_up")
    assert status == 500 and "CUDA out of memory" in data["error"]["message"]
    assert a.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}
    assert GpuLedger(ledger_env.path).snapshot()["by_pid"] == {a.pid: 100, b.pid: 600}
    b.json("POST", "/sleep?level=2")
    assert a.json("POST", "/wake_up")[1]["status"] == "awake"


def test_sleep_keeps_memory_fault(sim_factory, ledger_env):  # noqa: F811
    a = sim_factory("gf", env=ledger_env(600))
    a.fault("sleep_keeps_memory")
    assert a.json("POST", "/sleep?level=1")[0] == 200
    assert a.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}
    assert GpuLedger(ledger_env.path).snapshot()["by_pid"] == {a.pid: 600}


def test_killed_simulator_is_pruned_and_stopped_one_released(sim_factory, ledger_env):  # noqa: F811
    ledger = GpuLedger(ledger_env.path)
    a = sim_factory("gg", env=ledger_env(300))
    b = sim_factory("gh", env=ledger_env(300))
    assert ledger.snapshot()["used_mb"] == 600
    a.kill()
    assert ledger.snapshot()["by_pid"] == {b.pid: 300}
    assert b.terminate() == 0
    assert ledger.snapshot()["used_mb"] == 0


def test_ledger_api_directly(tmp_path):
    path = str(tmp_path / "l.json")
    ledger = GpuLedger(path, capacity_mb=100)
    ledger.reserve(60, model="x")
    with pytest.raises(Exception, match="CUDA out of memory"):
        ledger.reserve(50, model="y", pid=1)  # pid 1 is alive in any namespace
    snap = ledger.snapshot()
    assert snap == {"capacity_mb": 100, "used_mb": 60, "free_mb": 40,
                    "by_pid": {os.getpid(): 60}, "models": {os.getpid(): "x"}}
    ledger.release()
    assert GpuLedger(path).snapshot()["used_mb"] == 0


def test_engine_dead_fault_until_cleared(sim):
    sim.fault("engine_dead")
    assert sim.request("GET", "/health")[0] == 503
    status, data = sim.json("POST", "/v1/completions", PROMPT)
    assert status == 500 and "EngineCore encountered an issue" in data["error"]["message"]
    sim.json("DELETE", "/sim/fault?kind=engine_dead")
    assert sim.request("GET", "/health")[0] == 200
    assert sim.answer()


def test_legacy_503_while_asleep(sim_factory):  # noqa: F811
    sim = sim_factory("legacy", env={"LLMUX_SIM_LEGACY_503": "1"})
    sim.json("POST", "/sleep")
    status, data = sim.json("POST", "/v1/completions", PROMPT)
    assert status == 503 and data["error"]["message"] == "Model is sleeping"
    sim.json("POST", "/wake_up")
    assert sim.answer()


@pytest.fixture
def read_only_fs(tmp_path, monkeypatch):
    """`tmp_path` as llmuxd.service sees /tmp (ProtectSystem=strict): opening
    for writing or creating anything there fails with EROFS, even for root."""
    import errno

    real_open, real_mkdir = os.open, os.mkdir
    root = str(tmp_path)

    def refuse(path) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", str(path))

    def open_(path, flags, *args, **kwargs):
        if str(path).startswith(root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(root):
            raise refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


EMPTY_LEDGER = {"capacity_mb": 81920, "used_mb": 0, "free_mb": 81920, "by_pid": {}, "models": {}}


@pytest.mark.parametrize("written,expected", [
    (True, {"capacity_mb": 1000, "used_mb": 600, "free_mb": 400, "by_pid": {1: 600}, "models": {1: "a"}}),
    (False, EMPTY_LEDGER),  # no simulator has written one yet
], ids=["ledger written by a simulator", "no ledger yet"])
def test_reading_the_ledger_needs_no_write_access(tmp_path, request, written, expected):
    """llmuxd's GPU probe reads the ledger (snapshot without pruning) from a
    sandbox where it is read-only; a write there made every sleep fail."""
    path = tmp_path / "gpu.json"
    if written:
        path.write_text(json.dumps({"capacity_mb": 1000, "reservations": {
            "1": {"mb": 600, "model": "a", "ns": "pid:[1]", "start": 1, "updated": 0.0}}}))
    request.getfixturevalue("read_only_fs")
    assert GpuLedger(str(path)).snapshot(prune=False) == expected
    assert path.exists() == written
