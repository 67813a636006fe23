"""llmux-vllm-sim as a process: command lines, cold start, weights, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from llmuxd.sim.settings import parse_args
from llmuxd.sim.weights import weights_path
from sim_fixtures import SimProcess, free_port, sim_cache, sim_env, sim_factory  # noqa: F401


@pytest.mark.parametrize("argv,model,names,port,tp", [
    ("serve /m/a --port 9 --gpu-memory-utilization 0.9 --enforce-eager", "/m/a", ["/m/a"], 9, 1),
    ("serve /m/a --served-model-name a --dtype bfloat16 -tp 2", "/m/a", ["a"], 8000, 2),
    ("--model /m/b --port=7 --runner pooling --tensor-parallel-size 4", "/m/b", ["/m/b"], 7, 4),
    ("serve /m/c --served-model-name c1 c2 --enable-sleep-mode --x-unknown", "/m/c", ["c1", "c2"],
     8000, 1),
])
def test_command_lines_vllm_accepts(argv, model, names, port, tp):
    s = parse_args(argv.split())
    assert (s.model, s.served_names, s.port, s.tp) == (model, names, port, tp)


def test_no_model_is_an_error_naming_the_usage():
    with pytest.raises(SystemExit, match="no model given"):
        parse_args(["--port", "1"])


def test_interpreter_form_with_model_flag_and_ignored_flags(sim_cache):  # noqa: F811
    argv = [sys.executable, "-m", "llmuxd.sim.server", "--model", "/models/direct", "--port", "0",
            "--served-model-name", "direct", "--gpu-memory-utilization", "0.5", "-tp", "2",
            "--enforce-eager", "--disable-custom-all-reduce", "--max-model-len", "512",
            "--some-future-flag", "value"]
    sim = SimProcess("direct", argv, sim_env(sim_cache)).wait_ready()
    try:
        st = sim.state()
        assert st["served_model_names"] == ["direct"] and st["tp"] == 2
        assert "--some-future-flag" in st["ignored_flags"]
        assert sim.json("GET", "/v1/models")[1]["data"][0]["max_model_len"] == 512
        assert sim.json("POST", "/collective_rpc", {"method": "x"})[1] == {"results": [None, None]}
    finally:
        sim.terminate()


def test_sleep_mode_flag_fails_on_cpu_platform(sim_factory):  # noqa: F811
    sim = sim_factory("cpu", env={"LLMUX_SIM_PLATFORM": "cpu"}, args=["--enable-sleep-mode"],
                      wait=False)
    assert sim.wait_exit() == 1
    assert "Sleep mode is not supported on current platform." in sim.output


def test_weights_are_read_into_host_ram_from_a_cached_file(sim_factory, sim_cache):  # noqa: F811
    sim = sim_factory("heavy")
    st = sim.state()
    assert st["weights_bytes"] == 8 << 20
    assert st["weights_path"] == weights_path(sim_cache, "/models/heavy", 8)
    assert os.path.getsize(st["weights_path"]) == 8 << 20
    with open(st["weights_path"], "rb") as f:
        first = f.read(64)
    sim.terminate()
    again = sim_factory("heavy")  # same file, same content
    with open(again.state()["weights_path"], "rb") as f:
        assert f.read(64) == first


def _connect(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_port_is_refused_while_loading_and_sigterm_stops_the_load(sim_factory):  # noqa: F811
    port = free_port()
    sim = sim_factory("loading", env={"LLMUX_SIM_LOAD_TIME": "600"}, port=port, wait=False)
    sim.wait_for_line(r"loading model /models/loading \(load time 600\.0s")
    assert not _connect(port)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.wait_exit(30) == 0


def test_sigterm_when_idle_exits_cleanly(sim_factory):  # noqa: F811
    sim = sim_factory("idle")
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.wait_exit(10) == 0
    assert "shutdown complete" in sim.output


def raw_long_request(sim: SimProcess) -> socket.socket:
    """A plain socket whose 1000-token completion the engine is running (the test hangs it up)."""
    client = socket.create_connection(("127.0.0.1", sim.port), timeout=30)
    body = b'{"prompt": "x", "max_tokens": 1000}'
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sim.wait_state(lambda st: st["requests_running"] == 1)
    return client


def test_sigterm_mid_request_waits_for_the_client(sim_factory):  # noqa: F811
    sim = sim_factory("busy", env={"LLMUX_SIM_TOKENS_PER_S": "10"})
    client = raw_long_request(sim)
    sim.proc.send_signal(signal.SIGTERM)
    sim.wait_for_line("Waiting for connections to close")
    assert sim.proc.poll() is None
    client.close()  # the client gives up, as curl -m did against vLLM
    assert sim.wait_exit(30) == 0


def test_term_hang_ignores_sigterm(sim_factory):  # noqa: F811
    sim = sim_factory("stubborn", env={"LLMUX_SIM_TERM_HANG": "1"})
    sim.proc.send_signal(signal.SIGTERM)
    sim.wait_for_line("SIGTERM ignored")
    assert sim.request("GET", "/health")[0] == 200
    assert sim.kill() == -signal.SIGKILL


def test_console_script_entry_point_is_declared():
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    assert 'llmux-vllm-sim = "llmuxd.sim.server:main"' in pyproject
    out = subprocess.run([sys.executable, "-m", "llmuxd.sim.server", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "serve MODEL" in out.stdout


def _cmdline(pid: int, timeout: float = 30.0) -> str:
    """/proc/PID/cmdline as one line; polled, as it reads empty for an instant while a child
    that was just started is still in exec."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read().replace(b"\0", b" ").decode().strip()
        if line or time.monotonic() > deadline:
            return line
        time.sleep(0.01)


def test_worker_processes_like_vllms_tree(sim_factory):  # noqa: F811
    sim = sim_factory("tree", env={"LLMUX_SIM_WORKERS": "3"}, args=["-tp", "2"])
    pids = sim.state()["worker_pids"]
    names = [_cmdline(p).split()[-1] for p in pids]
    assert names == ["VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"]
    assert all(os.getpgid(p) == os.getpgid(sim.pid) for p in pids)
    assert sim.terminate() == 0
    for p in pids:  # reaped by the server on a clean exit
        assert not os.path.exists(f"/proc/{p}") or "Z" in open(f"/proc/{p}/stat").read().split()[2]


def test_client_that_hangs_up_is_aborted(sim_factory):  # noqa: F811
    sim = sim_factory("hangup", env={"LLMUX_SIM_TOKENS_PER_S": "20"})
    client = raw_long_request(sim)
    client.close()
    sim.wait_state(lambda st: st["requests_running"] == 0 and st["requests_served"] == 1)
