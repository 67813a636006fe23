"""Faults, one test each (reference/vllm-api.md §E.3; DESIGN.md I5): the
backend or the client misbehaves, and the daemon must end each one in a
consistent, serving state, with the failure visible in its log, in
/v1/models (`last_error`) and, where it failed a switch or a request, in
/metrics.

Faults are armed in the simulators themselves (POST /sim/fault), so the daemon
sees what it would see from vLLM: a 500 from /wake_up, a /sleep that never
answers, a process that exits mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from harness import (
    Daemon, SimModel, backend_children, http, metric_sum, pid_alive,
    start_daemon, stop_and_check, write_config,
)

A, B = "alpha", "beta"
#: policy for fault tests: short sleep timeout (the hang test waits it out)
POLICY = {"sleep_timeout": 2, "wake_timeout": 10, "failure_backoff": 0.2}
ANSWER_TIMEOUT = 120.0


def fault_models() -> list[SimModel]:
    return [
        SimModel(A, eviction="offload+keep_running"),
        SimModel(B, eviction="discard+keep_running"),
        # a backend whose command exits at once (a unit that fails to start)
        SimModel("dud", command=["/bin/false"]),
        # a backend that loads for an hour: never healthy within its startup_timeout
        SimModel("stuck", load_time=3600, startup_timeout=2),
    ]


@pytest.fixture(scope="module")
def daemon(stress_tmp):
    d = start_daemon(stress_tmp, fault_models(), policy=POLICY)
    yield d
    stop_and_check(d)


def chat(daemon: Daemon, model: str, *, stream: bool = False, max_tokens: int = 2,
         timeout: float = ANSWER_TIMEOUT) -> tuple[int, dict, bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}],
            "max_tokens": max_tokens, "stream": stream}
    return http(daemon.base + "/v1/chat/completions", json.dumps(body).encode(), timeout=timeout,
                headers={"Content-Type": "application/json"})


def served_by(daemon: Daemon, model: str) -> None:
    """A request for `model` is answered 200 by `model`."""
    status, headers, body = chat(daemon, model)
    assert status == 200, (status, body[:300], daemon.log()[-3000:])
    assert headers.get("X-Sim-Model") == model and json.loads(body)["model"] == model


def error_of(body: bytes) -> str:
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["type"], err  # OpenAI's envelope
    return err["message"]


def assert_consistent(daemon: Daemon) -> None:
    """Serving both models again, at most one holding the GPU, nothing leaked."""
    served_by(daemon, A)
    served_by(daemon, B)
    served_by(daemon, A)
    daemon.wait_for("leases back", lambda m: all(not s["in_flight"] and not s["queue_depth"] for s in m.values()))
    full = [mb for mb in daemon.ledger()["by_pid"].values() if mb > 500]
    assert len(full) <= 1, daemon.ledger()
    on_gpu = [n for n, s in daemon.models().items() if s["state"] in ("active", "draining", "evicting", "waking")]
    assert len(on_gpu) <= 1, daemon.models()


def failed_switches(daemon: Daemon, to: str) -> float:
    return sum(float(v) for v in re.findall(
        r'llmux_switch_total\{[^}]*result="failed"[^}]*to="%s"[^}]*\} (\S+)' % to, daemon.metrics()))


def requests_with(daemon: Daemon, model: str, status: int) -> float:
    return metric_sum(daemon.metrics(), 'llmux_requests_total{key="",model="%s",status="%d",' % (model, status))


def wait_log(daemon: Daemon, pattern: str, since: int = 0, timeout: float = 60.0) -> str:
    """The first log line matching `pattern` after offset `since` (len(daemon.log()) earlier)."""
    rx = re.compile(pattern)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = rx.search(daemon.log(), since)
        if m:
            return m.group(0)
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{daemon.log()[-3000:]}")


def active(daemon: Daemon, model: str) -> None:
    served_by(daemon, model)
    daemon.wait_for(f"{model} active", lambda m: m[model]["state"] == "active")


def asleep(daemon: Daemon, model: str) -> None:
    """Make `model` sleep (by serving the other one)."""
    active(daemon, model)
    active(daemon, B if model == A else A)
    assert daemon.models()[model]["state"] == "asleep"


# --------------------------------------------------------------------------- backend faults


def test_backend_crash_mid_stream(daemon):
    active(daemon, A)
    mark = len(daemon.log())
    daemon.fault(A, "crash_mid_stream")
    status, _, body = chat(daemon, A, stream=True, max_tokens=50)
    text = body.decode()
    assert status == 200  # the stream had begun
    assert '"error"' in text and "[DONE]" not in text, "the client sees an error event, not a short stream"
    wait_log(daemon, r"model alpha: backend exited with status 1", mark)
    daemon.wait_for("alpha marked failed", lambda m: m[A]["state"] in ("failed", "asleep"))
    assert "exited unexpectedly" in (daemon.models()[A]["last_error"] or "")
    assert metric_sum(daemon.metrics(), 'llmux_active_model_info{model="alpha"}') == 0
    assert_consistent(daemon)


def test_backend_crash_while_asleep(daemon):
    asleep(daemon, A)
    pid_before = [p for p, m in daemon.ledger()["models"].items() if m == A]
    mark = len(daemon.log())
    daemon.fault(A, "crash")
    wait_log(daemon, r"model alpha: backend exited with status 1", mark)
    assert not any(pid_alive(p) for p in pid_before)
    served_by(daemon, A)  # a cold start, not a wake of a dead process
    assert_consistent(daemon)


def test_wake_returns_500(daemon):
    asleep(daemon, A)
    failed = failed_switches(daemon, A)
    errors = requests_with(daemon, A, 502)
    mark = len(daemon.log())
    daemon.fault(A, "fail_wake")
    status, _, body = chat(daemon, A)
    assert status == 502, body
    assert "alpha" in error_of(body) and "wake" in error_of(body)
    assert "simulated wake failure" in daemon.log()[mark:]
    assert failed_switches(daemon, A) == failed + 1
    assert requests_with(daemon, A, 502) == errors + 1
    assert "wake" in (daemon.models()[A]["last_error"] or "")
    assert_consistent(daemon)  # I5: the target was stopped; the next request cold-starts it


def test_sleep_hangs_past_its_timeout(daemon):
    active(daemon, A)
    mark = len(daemon.log())
    daemon.fault(A, "hang_sleep")
    served_by(daemon, B)  # alpha's sleep hangs for sleep_timeout, escalates to stop, beta wakes
    line = wait_log(daemon, r"sleeping 'alpha' \([^)]*\) failed: [^;]*; stopping it instead", mark)
    assert "2s" in line or "timed out" in line or "no answer" in line, line
    assert "stopped instead" in (daemon.models()[A]["last_error"] or "")
    assert_consistent(daemon)


def test_reload_weights_fails(daemon):
    asleep(daemon, B)  # level 2: its wake needs reload_weights
    failed = failed_switches(daemon, B)
    mark = len(daemon.log())
    daemon.fault(B, "fail_reload")
    status, _, body = chat(daemon, B)
    assert status == 502, body
    assert "beta" in error_of(body)
    assert "simulated reload_weights failure" in daemon.log()[mark:]
    assert failed_switches(daemon, B) == failed + 1
    assert_consistent(daemon)


def test_backend_command_exits_at_once(daemon):
    failed = failed_switches(daemon, "dud")
    mark = len(daemon.log())
    status, _, body = chat(daemon, "dud")
    assert status == 502, body
    assert "dud" in error_of(body) and "exited" in error_of(body)
    wait_log(daemon, r"model dud: backend exited with status 1", mark)
    assert failed_switches(daemon, "dud") == failed + 1
    assert daemon.models()["dud"]["last_error"]
    assert_consistent(daemon)


def test_backend_never_healthy(daemon):
    mark = len(daemon.log())
    status, _, body = chat(daemon, "stuck")
    assert status in (502, 504), body
    assert "stuck" in error_of(body)
    wait_log(daemon, r"switch .* -> stuck FAILED", mark)
    daemon.wait_for("stuck given up", lambda m: m["stuck"]["state"] in ("failed", "asleep"))
    assert daemon.models()["stuck"]["last_error"]
    # the loading process was stopped, not left behind
    assert [p for p in backend_children(daemon.pid) if "stuck-sim" in _cmdline(p)] == []
    assert_consistent(daemon)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- client faults


async def test_client_disconnects_during_the_switch_it_triggered(daemon):
    """The switch runs in its own task (DESIGN.md §3): the client going away
    while its model wakes neither cancels the wake nor leaks a lease."""
    active(daemon, A)
    async with aiohttp.ClientSession() as session:
        body = {"model": B, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        request = asyncio.ensure_future(session.post(daemon.base + "/v1/chat/completions", json=body))
        await asyncio.to_thread(daemon.wait_for, "beta waking",
                                lambda m: m[B]["state"] in ("waking", "active"))
        request.cancel()  # hang up mid-switch
        await asyncio.gather(request, return_exceptions=True)
    await asyncio.to_thread(daemon.wait_for, "beta active after its client left",
                            lambda m: m[B]["state"] == "active")
    await asyncio.to_thread(daemon.wait_for, "no lease held for the gone client",
                            lambda m: all(not s["in_flight"] and not s["queue_depth"] for s in m.values()))
    assert_consistent(daemon)


# --------------------------------------------------------------------------- daemon faults


def test_daemon_sigkilled_mid_switch_then_restarted(tmp_path):
    """Embedded mode's contract: backends are children and never outlive the
    daemon (no adoption in embedded mode, SubprocessRuntime.adopt() is empty).
    So after a SIGKILL in the middle of a switch the backends must die too —
    else they keep the GPU and their ports, and the restart cannot start
    them. Then the restarted daemon serves both models."""
    d = start_daemon(tmp_path, [SimModel(A, wake_time=0.5), SimModel(B, wake_time=0.5, load_time=1.0)])
    try:
        served_by(d, A)
        children = backend_children(d.pid)
        assert children
        import threading

        def trigger() -> None:
            try:
                chat(d, B)
            except OSError:
                pass  # the daemon is killed under this request: no answer is the point

        threading.Thread(target=trigger, daemon=True).start()
        d.wait_for("switch under way", lambda m: m[B]["state"] == "waking" or m[A]["state"] in ("draining", "evicting"))
        children = set(children) | set(backend_children(d.pid))
        d.kill()
        end = time.monotonic() + 30
        while time.monotonic() < end and any(pid_alive(p) for p in children):
            time.sleep(0.05)
        orphans = [p for p in children if pid_alive(p)]
        try:
            assert orphans == [], (
                f"backends {orphans} outlived the SIGKILLed embedded daemon (they hold the GPU and "
                "their ports; the restart cannot start them)")
        finally:
            for p in orphans:  # clean up what we just found, by pid
                try:
                    os.killpg(p, signal.SIGKILL)
                except OSError:
                    pass
        assert d.ledger()["used_mb"] == 0, f"GPU memory still held after the kill: {d.ledger()}"
        d.start()
        served_by(d, B)
        served_by(d, A)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            stop_and_check(d)


def _add_model(config: Path, model: SimModel) -> None:
    data = yaml.safe_load(config.read_text())
    env = data["models"][A]["env"]
    data["models"][model.name] = model.to_config(Path(env["LLMUX_SIM_GPU_LEDGER"]), env["LLMUX_SIM_CACHE"])
    config.write_text(yaml.safe_dump(data))


async def test_configuration_reloaded_by_sighup_during_a_switch(tmp_path):
    """SIGHUP while a switch is in flight: the switch finishes and serves its
    request, the added model is served, nothing leaks."""
    d = start_daemon(tmp_path, [SimModel(A), SimModel(B, wake_time=1.0)])
    try:
        served_by(d, A)
        pending = asyncio.ensure_future(asyncio.to_thread(chat, d, B))
        await asyncio.to_thread(d.wait_for, "beta waking", lambda m: m[B]["state"] == "waking")
        mark = len(d.log())
        _add_model(d.config_path, SimModel("gamma"))
        d.proc.send_signal(signal.SIGHUP)
        status, headers, body = await asyncio.wait_for(pending, ANSWER_TIMEOUT)
        assert (status, headers.get("X-Sim-Model")) == (200, B), body
        wait_log(d, r"reloaded .*added: gamma", mark)
        served_by(d, "gamma")
        served_by(d, A)
        d.wait_for("leases back", lambda m: all(not s["in_flight"] and not s["queue_depth"] for s in m.values()))
        assert set(d.models()) == {A, B, "gamma"}
    finally:
        stop_and_check(d)


def test_malformed_config_on_reload_changes_nothing(tmp_path):
    """SIGHUP with a broken file: refused with the file and key named in the
    log, the running configuration (and its API keys) stays, serving goes on."""
    d = start_daemon(tmp_path, [SimModel(A), SimModel(B)])
    try:
        served_by(d, A)
        mark = len(d.log())
        good = d.config_path.read_text()
        d.config_path.write_text(good.replace("request_timeout: 60.0", "request_timeout: soon")
                                 + "\nmodels_typo: [\n")
        d.proc.send_signal(signal.SIGHUP)
        line = wait_log(d, r"reload refused[^\n]*", mark)
        assert "the running configuration and API keys stay" in line
        assert str(d.config_path) in d.log()[mark:]
        mark2 = len(d.log())
        d.config_path.write_text(good.replace("request_timeout: 60.0", "request_timeout: soon"))
        d.proc.send_signal(signal.SIGHUP)
        wait_log(d, r"reload refused[^\n]*", mark2)
        assert "request_timeout" in d.log()[mark2:]
        served_by(d, B)
        served_by(d, A)
        assert set(d.models()) == {A, B}
        assert d.proc.poll() is None
    finally:
        d.config_path.write_text(good)
        stop_and_check(d)


def test_log_output_to_a_full_disk_does_not_stop_serving(tmp_path):
    """The daemon's own writes hit ENOSPC (its log goes to /dev/full): it must
    keep serving, switching and stopping cleanly."""
    path = write_config(tmp_path, [SimModel(A), SimModel(B)])
    d = Daemon(path, Path("/dev/full"))
    d.start()
    try:
        served_by(d, A)
        served_by(d, B)
        served_by(d, A)
    finally:
        assert d.stop() == 0
