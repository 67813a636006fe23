"""llmuxctl against the service running in-process on a private bus: what a
person sees, and the exit status a script sees."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from llmuxd import ctl
from test_bus_support import NOBODY, PrivateBus, start_service, system_bus  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


class Result:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self) -> str:
        return f"rc={self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"


async def llmuxctl(*args: str, env: dict, user: int | None = None) -> Result:
    argv = [sys.executable, "-m", "llmuxd.ctl", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd="/",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def running(system_bus):
    system_bus.mock_call("SetAllowed", "as", [[]])
    r = await start_service(system_bus.address)
    yield r
    await r.close()


@pytest.fixture
def env(system_bus):
    return {"DBUS_SYSTEM_BUS_ADDRESS": system_bus.address}


async def test_status_table(running, env):
    r = await llmuxctl("status", env=env)
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert lines[0] == "llmux 0.1.0-test: idle, mode auto"
    assert lines[2].split() == ["MODEL", "STATE", "PROCESS", "EVICTION", "IN-FLIGHT", "QUEUE", "WAIT", "UNIT"]
    assert lines[3].split() == ["llama", "not_started", "not_started", "offload+keep_running", "0", "0", "0s",
                                "llmux-model-llama.service"]
    assert lines[4].split()[0] == "qwen-7b"


async def test_status_json(running, env):
    r = await llmuxctl("--json", "status", env=env)
    assert r.rc == 0, r
    status = json.loads(r.out)
    assert status["state"] == "idle"
    assert status["models"]["qwen-7b"]["unit"] == "llmux-model-qwen\\x2d7b.service"


async def test_switch_shows_progress_and_succeeds(running, env):
    sw = running.switcher
    sw.proceed.clear()  # hold the switch half-way until 'starting' went out
    task = asyncio.ensure_future(llmuxctl("switch", "llama", env=env))
    await asyncio.wait_for(sw.started.wait(), 120)

    async def starting_sent():
        while running.service.model_cache["llama"]["State"] != "starting":
            await asyncio.sleep(0.01)

    await asyncio.wait_for(starting_sent(), 60)
    sw.proceed.set()
    r = await task
    assert r.rc == 0, r
    assert r.out.splitlines()[0] == "switching none -> llama ..."
    assert "  llama: starting" in r.out.splitlines()
    assert r.out.splitlines()[-1].startswith("llama is active in 0.")
    assert running.switcher.active == "llama"


async def test_switch_json_and_timeout(running, env):
    r = await llmuxctl("--json", "switch", "qwen-7b", "--timeout", "30", env=env)
    assert r.rc == 0, r
    assert json.loads(r.out) == {"model": "qwen-7b", "ok": True, "duration_usec": 250000}
    assert running.switcher.calls[-1] == ("switch", "qwen-7b", True, 30.0)


async def test_failed_switch_exits_1_with_one_line(running, env):
    running.switcher.fail_next = "CUDA out of memory"
    r = await llmuxctl("switch", "llama", env=env)
    assert r.rc == 1, r
    assert r.err == "llmuxctl: model 'llama' failed to wake: CUDA out of memory\n"


COMMANDS = [
    # (argv, rc, stdout or stderr fragment, switcher call expected)
    (["pin", "llama"], 0, "pinned to llama (manual mode)", ("pin", "llama")),
    (["unpin"], 0, "unpinned (auto mode)", ("unpin",)),
    (["mode", "manual"], 0, "mode manual", ("set_mode", "manual")),
    (["sleep", "llama"], 0, "llama put to sleep (its configured eviction)", ("sleep", "llama", None)),
    (["wake", "qwen-7b"], 0, "qwen-7b is awake", ("wake", "qwen-7b")),
    (["eviction", "llama"], 0, "llama: offload+keep_running", None),
    (["eviction", "llama", "discard+stop"], 0, "llama: discard+stop", None),
    (["eviction", "llama", "--reset"], 0, "llama: offload+keep_running", ("set_eviction", "llama", None)),
    (["switch", "nope"], 1, "llmuxctl: model 'nope' does not exist; known models: llama, qwen-7b", None),
    (["sleep", "llama", "offload+nap"], 1, "llmuxctl: unknown process strategy 'nap'", None),
    (["reload"], 1, "llmuxctl: reload failed, the running configuration stays: /etc/llmux/config.yaml: models.x.port", None),
    (["mode", "turbo"], 2, "invalid choice: 'turbo'", None),
    (["switch", "--no-wait", "qwen-7b"], 0, "switch to qwen-7b queued", ("switch", "qwen-7b", False, None)),
]


@pytest.mark.parametrize("argv,rc,fragment,expected_call", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
async def test_commands(running, env, argv, rc, fragment, expected_call):
    r = await llmuxctl(*argv, env=env)
    assert r.rc == rc, r
    assert fragment in (r.out if rc == 0 else r.err)
    if rc == 1:
        assert r.err.count("\n") == 1 and "Traceback" not in r.err
    if expected_call:
        assert expected_call in running.switcher.calls


async def test_json_errors_carry_the_error_name(running, env):
    r = await llmuxctl("--json", "pin", "nope", env=env)
    assert r.rc == 1
    assert json.loads(r.out)["error"] == "io.llmux.LLMux1.Error.NoSuchModel"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as nobody")
async def test_not_authorized_exits_4(running, env):
    r = await llmuxctl("pin", "llama", env=env, user=NOBODY)
    assert r.rc == 4, r
    assert r.err == "llmuxctl: not authorized for io.llmux.LLMux1.control; ask an administrator or use sudo\n"
    r = await llmuxctl("status", env=env, user=NOBODY)  # reads are public
    assert r.rc == 0, r


async def test_daemon_not_running_exits_3(system_bus, env):
    r = await llmuxctl("status", env=env)
    assert r.rc == 3, r
    assert r.err == (
        "llmuxctl: llmuxd is not running on the system bus (io.llmux.LLMux1 has no owner); "
        "start it with: systemctl start llmuxd\n"
    )


async def test_no_bus_exits_3():
    r = await llmuxctl("status", env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/bus"})
    assert r.rc == 3, r
    assert r.err.startswith("llmuxctl: cannot connect to the system bus: ")


async def test_user_talks_to_the_session_bus():
    bus = PrivateBus("session")
    try:
        r = await start_service(bus.address, names=("tiny",), unit_names=False)
        try:
            res = await llmuxctl("--user", "status", env={"DBUS_SESSION_BUS_ADDRESS": bus.address})
            assert res.rc == 0, res
            assert res.out.splitlines()[3].split() == ["tiny", "not_started", "not_started", "offload+keep_running",
                                                       "0", "0", "0s", "-"]
        finally:
            await r.close()
    finally:
        bus.close()


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["logs", "qwen-7b"], ["journalctl", "-u", "llmux-model-qwen\\x2d7b.service"]),
        (["logs", "llama", "-f", "-n", "50"], ["journalctl", "-u", "llmux-model-llama.service", "-f", "-n", "50"]),
        (["--user", "logs", "llama"], ["journalctl", "LLMUX_MODEL=llama"]),
    ],
)
def test_logs_execs_journalctl(monkeypatch, argv, expected):
    seen = []
    monkeypatch.setattr(ctl.os, "execvp", lambda prog, args: seen.append(args))
    assert ctl.main(argv) == 0
    assert seen == [expected]


def test_logs_rejects_a_bad_name(capsys):
    assert ctl.main(["logs", "../etc"]) == 2
    assert capsys.readouterr().err.startswith("llmuxctl: invalid model name '../etc'")


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        ctl.main([])
    assert exc.value.code == 2


def test_status_table_shows_idle_countdown_and_preload():
    """issue 25: time left before an idle eviction and the preload progress, under the table."""
    from llmuxd.ctl import format_status

    model = {"state": "active", "process_state": "running", "eviction": "offload+keep_running",
             "in_flight": 0, "queue_depth": 0, "wait_estimate_usec": 0, "unit": ""}
    text = format_status({"version": "x", "state": "active:a", "mode": "auto",
                          "models": {"a": {**model, "idle_left_usec": 42_000_000}, "b": model},
                          "preload": {"a": "awake", "b": "failed: no weights"}})
    lines = text.splitlines()
    assert "a: idle, put to sleep in 42s (idle_timeout)" in lines
    assert not any(line.startswith("b: idle") for line in lines)  # no countdown: no line
    assert lines[-1] == "preload: a awake, b failed: no weights"
    assert "preload" not in format_status({"version": "x", "state": "idle", "mode": "auto", "models": {}})
