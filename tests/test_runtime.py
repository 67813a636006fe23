"""Runtimes: the same guarantees from a transient unit (real test systemd) and a process group.

The systemd cases run against the real systemd 252 of tests/sysd (root only;
skipped with the reason elsewhere). Backends here are plain commands, so these
tests know nothing of vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid

import pytest

from llmuxd.errors import BackendError
from llmuxd.runtime.base import ExitStatus, ForeignUnit, LaunchSpec, RunState, RuntimeUnavailable, check_port_free
from llmuxd.runtime.subprocess import SubprocessRuntime
from llmuxd.runtime.systemd import SystemdRuntime
from sysd.helpers import PYTHON, ahttp, free_port, wait_http, wait_until

BURN = "import sys; sys.stdout.write('burning\\n'); sys.stdout.flush()\nwhile True: pass"
IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\nwhile True: time.sleep(0.1)"


@pytest.fixture(params=["subprocess", "systemd"])
async def runtime(request):
    if request.param == "systemd":
        bed = request.getfixturevalue("real_systemd")
        rt = SystemdRuntime(bus_address=bed.bus_address)
        rt.bed = bed
    else:
        rt = SubprocessRuntime()
        rt.bed = None
    await rt.connect()
    rt.exits = []
    rt.on_exit(lambda handle, status: rt.exits.append((handle.model, status)))
    rt.started = []
    yield rt
    for handle in rt.started:
        await rt.stop(handle, timeout=5)
    await rt.close()


def model_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def start(rt, argv, model=None, **kw):
    handle = await rt.start(LaunchSpec(model=model or model_name("t"), argv=tuple(argv), **kw))
    rt.started.append(handle)
    return handle


def http_server(port: int) -> list[str]:
    return [PYTHON, "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1"]


async def cpu_ticks(rt, handle) -> int:
    """CPU time used by the backend so far (cgroup for units, /proc for process groups)."""
    if rt.bed is not None:
        return int(rt.bed.unit_property(handle.name, "CPUUsageNSec"))
    total = 0
    for pid in await rt.pids(handle):
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


async def test_start_serves_http_and_reports_its_pids(runtime):
    port = free_port()
    handle = await start(runtime, http_server(port))
    await wait_http(f"http://127.0.0.1:{port}/")
    assert handle.state is RunState.RUNNING
    pids = await runtime.pids(handle)
    assert pids and pids[0] == handle.main_pid


async def test_freeze_stops_cpu_and_holds_requests_until_thaw(runtime):
    port = free_port()
    server = await start(runtime, http_server(port))
    burner = await start(runtime, [PYTHON, "-c", BURN])
    await wait_http(f"http://127.0.0.1:{port}/")

    await runtime.freeze(burner)
    assert burner.state is RunState.FROZEN
    before = await cpu_ticks(runtime, burner)
    await asyncio.sleep(1.0)
    assert await cpu_ticks(runtime, burner) == before, "a frozen backend used CPU"

    await runtime.freeze(server)
    request = asyncio.ensure_future(ahttp("GET", f"http://127.0.0.1:{port}/", timeout=120))
    done, _ = await asyncio.wait({request}, timeout=1.0)
    assert not done, "a frozen backend answered"
    await runtime.thaw(server)
    status, _ = await request
    assert status == 200 and server.state is RunState.RUNNING

    await runtime.thaw(burner)
    before = await cpu_ticks(runtime, burner)
    await asyncio.sleep(1.0)
    assert await cpu_ticks(runtime, burner) > before


async def test_stop_ends_the_backend_and_is_not_an_unexpected_exit(runtime):
    port = free_port()
    handle = await start(runtime, http_server(port))
    await wait_http(f"http://127.0.0.1:{port}/")
    status = await runtime.stop(handle)
    assert handle.state is RunState.EXITED and status is not None
    assert runtime.exits == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    if runtime.bed is not None:  # collected: no unit left behind
        assert runtime.bed.unit_property(handle.name, "LoadState") == "not-found"


async def test_stop_of_a_frozen_backend_does_not_wait_for_the_kill_timeout(runtime):
    handle = await start(runtime, [PYTHON, "-c", BURN], stop_timeout=120)
    await runtime.freeze(handle)
    status = await asyncio.wait_for(runtime.stop(handle), 60)
    assert status is not None and status.signal == signal.SIGTERM


async def test_an_exiting_backend_is_reported_with_its_status(runtime):
    # the sleep lets the start finish first (an exit during start is a start error)
    handle = await start(runtime, ["sh", "-c", "sleep 1; echo bye; exit 3"], model="dies")
    await asyncio.wait_for(handle.exited.wait(), 60)
    await wait_until(lambda: runtime.exits, what="exit callback")
    assert runtime.exits == [("dies", ExitStatus(code=3, result="exit-code"))]
    assert str(runtime.exits[0][1]) == "exited with status 3"


async def test_a_backend_ignoring_sigterm_is_killed_after_the_grace(runtime):
    handle = await start(runtime, [PYTHON, "-u", "-c", IGNORE_TERM], stop_timeout=1)
    await asyncio.sleep(0.5)  # let it install the handler
    status = await asyncio.wait_for(runtime.stop(handle), 60)
    assert status.signal == signal.SIGKILL, status


async def test_a_command_that_does_not_exist_fails_at_start(runtime):
    with pytest.raises(BackendError) as err:
        await runtime.start(LaunchSpec(model="ghost", argv=("/nonexistent/vllm", "serve")))
    assert err.value.phase == "start"
    assert "/nonexistent/vllm" in str(err.value) and "model 'ghost'" in str(err.value)


def test_a_port_in_use_is_refused_before_spawning():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BackendError) as err:
            check_port_free("m", "127.0.0.1", port)
    assert f"port {port}" in str(err.value) and "already in use" in str(err.value)
    check_port_free("m", "127.0.0.1", port)  # free again: no error


async def test_subprocess_output_goes_to_the_log_with_the_model_name(caplog):
    rt = SubprocessRuntime()
    caplog.set_level(logging.INFO, logger="llmuxd.backend")
    handle = await rt.start(LaunchSpec(model="chatty", argv=("sh", "-c", "echo hello from the backend")))
    await asyncio.wait_for(handle.exited.wait(), 60)
    await rt.stop(handle)
    lines = [r for r in caplog.records if r.name == "llmuxd.backend"]
    assert any(r.getMessage() == "[chatty] hello from the backend" and r.llmux_model == "chatty" for r in lines)


async def test_subprocess_freeze_covers_the_whole_process_group():
    rt = SubprocessRuntime()
    handle = await rt.start(LaunchSpec(model="tree", argv=("sh", "-c", "sleep 300 & sleep 300 & wait")))
    try:
        await wait_until(lambda: len(_group(handle.main_pid)) >= 3, what="children started")
        await rt.freeze(handle)
        assert {_proc_state(pid) for pid in await rt.pids(handle)} == {"T"}
        await rt.thaw(handle)
        pids = await rt.pids(handle)
    finally:
        await rt.stop(handle, timeout=5)
    assert not any(os.path.exists(f"/proc/{pid}") and _proc_state(pid) != "Z" for pid in pids)


def _group(pgid: int) -> list[int]:
    from llmuxd.runtime.subprocess import _group_pids

    return _group_pids(pgid)


def _proc_state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# -- systemd only -----------------------------------------------------------


@pytest.fixture
async def systemd_rt(real_systemd):  # noqa: F811
    rt = SystemdRuntime(bus_address=real_systemd.bus_address)
    await rt.connect()
    yield rt
    await rt.close()


async def test_unit_output_is_in_the_journal_under_the_model_field(systemd_rt, real_systemd):  # noqa: F811
    model = model_name("journal")
    handle = await systemd_rt.start(LaunchSpec(model=model, argv=("sh", "-c", f"echo hello from {model}")))
    await asyncio.wait_for(handle.exited.wait(), 60)
    await wait_until(lambda: f"hello from {model}" in real_systemd.journal(f"LLMUX_MODEL={model}"), what="journal line")
    assert f"hello from {model}" in real_systemd.journal(f"SYSLOG_IDENTIFIER=llmux-{model}")


async def test_a_second_runtime_adopts_running_and_frozen_units(systemd_rt, real_systemd):  # noqa: F811
    port = free_port()
    running = await systemd_rt.start(LaunchSpec(model=model_name("run"), argv=tuple(http_server(port))))
    frozen = await systemd_rt.start(LaunchSpec(model=model_name("frz"), argv=(PYTHON, "-c", BURN)))
    await systemd_rt.freeze(frozen)
    try:
        other = SystemdRuntime(bus_address=real_systemd.bus_address)
        await other.connect()
        adopted = {h.model: h for h in await other.adopt()}
        assert adopted[running.model].state is RunState.RUNNING
        assert adopted[running.model].main_pid == running.main_pid
        assert adopted[frozen.model].state is RunState.FROZEN
        assert all(h.adopted for h in adopted.values())
        await other.close()
        await wait_http(f"http://127.0.0.1:{port}/")  # not restarted, still serving
    finally:
        await systemd_rt.stop(running, timeout=5)
        await systemd_rt.stop(frozen, timeout=5)


async def test_a_foreign_unit_with_our_name_is_refused_and_left_alone(systemd_rt, real_systemd):  # noqa: F811
    unit = "llmux-model-foreign.service"
    real_systemd.run("systemd-run", "--unit", unit, "sleep", "600")
    try:
        assert all(h.model != "foreign" for h in await systemd_rt.adopt())
        with pytest.raises(ForeignUnit) as err:
            await systemd_rt.start(LaunchSpec(model="foreign", argv=("sleep", "1")))
        assert unit in str(err.value) and "not created by llmux" in str(err.value)
        assert real_systemd.unit_property(unit, "ActiveState") == "active"
    finally:
        real_systemd.run("systemctl", "stop", unit, check=False)


@pytest.mark.parametrize("address", ["unix:path=/nonexistent/llmux-test-bus", "tcp:host=127.0.0.1,port=1"])
async def test_systemd_not_reachable_is_a_clear_startup_error(address):
    with pytest.raises(RuntimeUnavailable) as err:
        await SystemdRuntime(bus_address=address).connect()
    assert address in str(err.value) and "embedded mode" in str(err.value)


async def test_a_unit_that_cannot_exec_fails_at_start_with_systemds_status(systemd_rt):
    with pytest.raises(BackendError) as err:
        await systemd_rt.start(LaunchSpec(model="nobody", argv=("sleep", "60"), user="no-such-llmux-user"))
    assert err.value.phase == "start" and "systemd exit status 217/USER" in str(err.value)
    assert "user 'no-such-llmux-user': it does not exist here" in str(err.value)  # the cause, then the fix
