"""Runtimes: the same guarantees from a transient unit (real test systemd) and a process group.

The systemd cases run against the real systemd 252 of tests/sysd (root only;
skipped with the reason elsewhere). Backends here are plain commands, so these
tests know nothing of vLLM.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import stat
import uuid

import pytest

from llmuxd.errors import BackendError
from llmuxd.runtime.base import ExitStatus, ForeignUnit, LaunchSpec, RunState, RuntimeUnavailable, check_port_free
from llmuxd.runtime.subprocess import SubprocessRuntime
from llmuxd.runtime.systemd import SystemdRuntime
from sysd.helpers import PYTHON, ahttp, free_port, wait_http, wait_until

BURN = "import sys; sys.stdout.write('burning\\n'); sys.stdout.flush()\nwhile True: pass"
IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True)\nwhile True: time.sleep(0.1)"


class BackendLines(logging.Handler):
    """What subprocess backends printed, as the `llmuxd.backend` logger got it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []  # (model, line)

    def emit(self, record: logging.LogRecord) -> None:
        model = getattr(record, "llmux_model", "")
        self.lines.append((model, record.getMessage().removeprefix(f"[{model}] ")))


@pytest.fixture(params=["subprocess", pytest.param("systemd", marks=pytest.mark.systemd)])
async def runtime(request):
    backend_log = logging.getLogger("llmuxd.backend")
    lines, level = BackendLines(), backend_log.level
    if request.param == "systemd":
        bed = request.getfixturevalue("real_systemd")
        rt = SystemdRuntime(bus_address=bed.bus_address)
        rt.bed = bed
    else:
        rt = SubprocessRuntime()
        rt.bed = None
        backend_log.addHandler(lines)
        backend_log.setLevel(logging.INFO)
    rt.lines = lines
    await rt.connect()
    rt.exits = []
    rt.on_exit(lambda handle, status: rt.exits.append((handle.model, status)))
    rt.started = []
    yield rt
    for handle in rt.started:
        await rt.stop(handle, timeout=5)
    await rt.close()
    backend_log.removeHandler(lines)
    backend_log.setLevel(level)


async def wait_for_line(rt, handle, line: str) -> None:
    """Until the backend printed `line` (its journal under the test systemd,
    the backend logger otherwise): synchronisation on what the child says,
    not on how long it usually takes."""
    if rt.bed is not None:
        printed = lambda: line in rt.bed.journal(f"LLMUX_MODEL={handle.model}").splitlines()  # noqa: E731
    else:
        printed = lambda: (handle.model, line) in rt.lines.lines  # noqa: E731
    await wait_until(printed, what=f"{handle.model} printing {line!r}")


async def open_gate(fifo: str) -> None:
    """Let a child blocked in `read < fifo` go on: write a line once it has
    the FIFO open (a non-blocking open fails with ENXIO until then)."""
    def try_write() -> bool:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
        return True

    await wait_until(try_write, what=f"a reader on {fifo}")


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


async def test_an_exiting_backend_is_reported_with_its_status(runtime, tmp_path):
    # it exits only once start() has returned (an exit during start is a start
    # error): it waits on a FIFO that the test writes to after the start
    gate = str(tmp_path / "gate")
    os.mkfifo(gate)
    handle = await start(runtime, ["sh", "-c", f"read go < {gate}; echo bye; exit 3"], model="dies")
    assert runtime.exits == []
    await open_gate(gate)
    await asyncio.wait_for(handle.exited.wait(), 60)
    await wait_until(lambda: runtime.exits, what="exit callback")
    assert runtime.exits == [("dies", ExitStatus(code=3, result="exit-code"))]
    assert str(runtime.exits[0][1]) == "exited with status 3"


async def test_a_backend_ignoring_sigterm_is_killed_after_the_grace(runtime):
    handle = await start(runtime, [PYTHON, "-u", "-c", IGNORE_TERM], stop_timeout=1)
    await wait_for_line(runtime, handle, "ready")  # its SIGTERM handler is in place
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


@pytest.mark.systemd
async def test_unit_output_is_in_the_journal_under_the_model_field(systemd_rt, real_systemd):  # noqa: F811
    model = model_name("journal")
    handle = await systemd_rt.start(LaunchSpec(model=model, argv=("sh", "-c", f"echo hello from {model}")))
    await asyncio.wait_for(handle.exited.wait(), 60)
    await wait_until(lambda: f"hello from {model}" in real_systemd.journal(f"LLMUX_MODEL={model}"), what="journal line")
    assert f"hello from {model}" in real_systemd.journal(f"SYSLOG_IDENTIFIER=llmux-{model}")


@pytest.mark.systemd
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


@pytest.mark.systemd
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


@pytest.mark.systemd
async def test_a_unit_that_cannot_exec_fails_at_start_with_systemds_status(systemd_rt):
    with pytest.raises(BackendError) as err:
        await systemd_rt.start(LaunchSpec(model="nobody", argv=("sleep", "60"), user="no-such-llmux-user"))
    assert err.value.phase == "start" and "systemd exit status 217/USER" in str(err.value)
    assert "user 'no-such-llmux-user': it does not exist here" in str(err.value)  # the cause, then the fix


@pytest.mark.systemd
async def test_a_daemon_reload_does_not_look_like_an_exit(systemd_rt, real_systemd):  # noqa: F811
    """`systemctl daemon-reload` (any package install runs one) sends UnitRemoved
    for every unit, running ones included, and UnitNew after: the backend is
    still running and must still be ours to serve, stop and freeze."""
    exits = []
    systemd_rt.on_exit(lambda handle, status: exits.append((handle.model, status)))
    port = free_port()
    handle = await systemd_rt.start(LaunchSpec(model=model_name("reload"), argv=tuple(http_server(port))))
    try:
        await wait_http(f"http://127.0.0.1:{port}/")
        real_systemd.run("systemctl", "daemon-reload")
        await wait_http(f"http://127.0.0.1:{port}/")  # the backend never stopped
        # a round trip to systemd: its reload signals, sent before this reply, have been handled
        assert handle.main_pid in await systemd_rt.pids(handle)
        assert handle.main_pid in await systemd_rt.pids(handle)  # and the runtime's re-read of the unit
        assert exits == [] and not handle.exited.is_set(), exits
        assert handle.state is RunState.RUNNING
        await systemd_rt.freeze(handle)
        assert handle.state is RunState.FROZEN
        await systemd_rt.thaw(handle)
    finally:
        status = await systemd_rt.stop(handle, timeout=5)
    assert status is not None and exits == []
    assert real_systemd.unit_property(handle.name, "LoadState") == "not-found"


# -- GPU device access --------------------------------------------------------


@pytest.mark.parametrize("table,indices,minors", [
    (None, [0, 2], [0, 2]),                                        # no driver loaded: minor = index
    ({"0000:3b:00.0": 0, "0000:86:00.0": 1}, [1], [1]),
    # minors need not follow the PCI order the indices count in
    ({"0000:86:00.0": 0, "0000:3b:00.0": 3, "0000:af:00.0": 1}, [0, 1, 2], [3, 0, 1]),
    ({"0000:3b:00.0": 5}, [0, 1], [5, 1]),                         # beyond the table: the index
])
def test_gpu_indices_map_to_the_drivers_minor_numbers(tmp_path, table, indices, minors):
    from llmuxd.runtime.systemd import gpu_minors

    root = tmp_path / "gpus"
    for address, minor in (table or {}).items():
        (root / address).mkdir(parents=True)
        (root / address / "information").write_text(
            f"Model: \t\t NVIDIA H100\nIRQ:   \t\t 42\nDevice Minor: \t {minor}\nBus Location: \t {address}\n")
    assert gpu_minors(indices, str(root)) == minors


@pytest.mark.parametrize("gpus,env,expected", [
    ([2, 0], {}, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,0"}),
    ([1], {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "1"}),
    ([], {}, {}),
])
def test_gpu_indices_reach_cuda_in_pci_bus_order(gpus, env, expected):
    """The indices a model names are the ones nvidia-smi shows and DeviceAllow maps."""
    from llmuxd.config import Config
    from llmuxd.orchestrator import backend_env

    model = Config.from_dict({"models": {"m": {"model_path": "x", "gpus": gpus, "env": env}}}).models["m"]
    got = backend_env(model)
    assert {k: got[k] for k in ("CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES") if k in got} == expected


#: opens each stand-in node and prints "name errno" (0: opened); ENXIO means the devices
#: cgroup let the open through to the (absent) driver, EPERM that the unit's policy refused it
OPEN_NODES = """
import errno, os, sys
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR)); code = 0
    except OSError as exc:
        code = exc.errno
    print(os.path.basename(path), errno.errorcode.get(code, code), flush=True)
"""


@pytest.fixture
def nvidia_nodes(tmp_path):
    """Stand-in NVIDIA character devices with the driver's real numbers, in a directory
    of this test (the devices cgroup checks major:minor, not the path; /dev stays untouched)."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    numbers = {"nvidiactl": 255, "nvidia-modeset": 254, "nvidia0": 0, "nvidia1": 1, "nvidia2": 2}
    for name, minor in numbers.items():
        os.mknod(nodes / name, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    os.chmod(tmp_path, 0o755)
    return nodes


@pytest.mark.systemd
async def test_a_unit_opens_its_gpu_and_is_refused_another(systemd_rt, real_systemd, nvidia_nodes):  # noqa: F811
    """DevicePolicy=closed + DeviceAllow under the real systemd (BPF device control of
    cgroup v2): the model on GPU 1 reaches GPU 1 and the driver's shared nodes, not GPU 0 or 2."""
    names = ["nvidiactl", "nvidia-modeset", "nvidia0", "nvidia1", "nvidia2"]
    model = model_name("gpu")
    handle = await systemd_rt.start(LaunchSpec(
        model=model, argv=(PYTHON, "-c", OPEN_NODES, *(str(nvidia_nodes / n) for n in names)), gpus=(1,)))
    await asyncio.wait_for(handle.exited.wait(), 60)
    await wait_until(lambda: "nvidia2" in real_systemd.journal(f"LLMUX_MODEL={model}"), what="journal lines")
    lines = [line.split()[-2:] for line in real_systemd.journal(f"LLMUX_MODEL={model}").splitlines()
             if line.split() and line.split()[-2:][0] in names]
    assert dict(lines) == {"nvidiactl": "ENXIO", "nvidia-modeset": "ENXIO", "nvidia1": "ENXIO",
                           "nvidia0": "EPERM", "nvidia2": "EPERM"}


@pytest.mark.systemd
async def test_a_unit_without_gpus_has_no_device_policy(systemd_rt, real_systemd, nvidia_nodes):  # noqa: F811
    model = model_name("nogpu")
    handle = await systemd_rt.start(LaunchSpec(
        model=model, argv=(PYTHON, "-c", OPEN_NODES, str(nvidia_nodes / "nvidia2"))))
    await asyncio.wait_for(handle.exited.wait(), 60)
    await wait_until(lambda: "nvidia2 ENXIO" in real_systemd.journal(f"LLMUX_MODEL={model}"), what="journal line")
