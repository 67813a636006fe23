"""llmuxd as a system service, under a real systemd 252 (tests/sysd).

The units in systemd/ run the daemon from this checkout (a drop-in points
ExecStart at the test venv); tests/test_package.py runs the same scenarios
against the installed .deb. Each scenario drives the daemon the way an
operator would: systemctl, busctl, curl on the socket's port, journalctl.

The scenarios run in file order on one booted daemon (module fixture `svc`):
each leaves it serving for the next, except the last ones, which break it on
purpose. Waits poll with generous deadlines (2 shared cores); nothing asserts
a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from skip_policy import require_marker
from sysd.helpers import free_port, http
from sysd.testbed import TestSystemd, unavailable_reason

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 90.0
#: short enough for the watchdog scenario, long enough for a loaded CI box
TEST_WATCHDOG_SEC = 10
BUS_NAME = "io.llmux.LLMux1"
MANAGER = ("/io/llmux/LLMux1", "io.llmux.LLMux1.Manager")
UNITS = ("llmuxd.service", "llmux.socket", "llmux.slice")


def wait_for(predicate: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    """Poll until predicate() is truthy; its value, or AssertionError naming `what`."""
    end = time.monotonic() + deadline
    last: Any = None
    while time.monotonic() < end:
        try:
            last = predicate()
        except (OSError, subprocess.SubprocessError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not reached within {deadline:.0f}s (last: {last!r})")


@dataclass
class ServiceBed:
    """A booted test systemd with llmux's units installed and a config to edit."""

    bed: TestSystemd
    port: int  # llmux.socket's port (a drop-in replaces 127.0.0.1:3000)
    config_file: str  # as the daemon sees it
    state_dir: str  # as the daemon sees it
    user: str | None  # User= of the backends
    sim_command: list[str]
    model_ports: dict[str, int] = field(default_factory=dict)

    # -- paths ------------------------------------------------------------
    def host_path(self, inner: str) -> Path:
        """A path inside the test systemd, seen from here (its /run is private)."""
        if inner == "/run" or inner.startswith("/run/"):
            return Path(self.bed.state_dir) / inner.lstrip("/")
        return Path(inner)

    @property
    def models_dir(self) -> Path:
        return self.host_path(str(Path(self.config_file).parent / "models.d"))

    @property
    def unit_dir(self) -> Path:
        return self.host_path("/run/systemd/system")

    # -- commands -----------------------------------------------------------
    def systemctl(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        try:
            return self.bed.run("systemctl", *args, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"systemctl {' '.join(args)} did not return within {timeout:.0f}s; "
                                 f"llmuxd's journal:\n{self.journal('-u', 'llmuxd.service')[-6000:]}\n"
                                 f"dbus's journal:\n{self.journal('-u', 'dbus.service')[-2000:]}") from None

    def enable_now(self) -> subprocess.CompletedProcess:
        """`systemctl enable --runtime --now llmux.socket llmuxd.service`, which
        returns once READY=1 arrived (Type=notify); AssertionError with the journal if not."""
        result = self.systemctl("enable", "--runtime", "--now", "llmux.socket", "llmuxd.service")
        assert result.returncode == 0, result.stderr + self.journal("-u", "llmuxd.service")
        return result

    def shut_down(self) -> None:
        """Stop llmux's units, then the test systemd itself."""
        self.systemctl("stop", "llmuxd.service", "llmux.socket")
        self.bed.down()

    def prop(self, unit: str, name: str) -> str:
        return self.bed.unit_property(unit, name)

    def busctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["busctl", "--system", *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bed.bus_address},
        )

    def manager_call(self, method: str, signature: str = "", *args: str) -> subprocess.CompletedProcess:
        call = ["call", BUS_NAME, *MANAGER, method]
        if signature:
            call += [signature, *args]
        return self.busctl(*call)

    def journal(self, *matches: str) -> str:
        return self.bed.journal(*matches)

    def request(self, model: str, prompt: str = "What is 2+2?", timeout: float = 120) -> tuple[int, Any]:
        return http("POST", f"http://127.0.0.1:{self.port}/v1/completions",
                    {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}, timeout=timeout)

    def models_listed(self) -> list[str]:
        status, body = http("GET", f"http://127.0.0.1:{self.port}/v1/models", timeout=60)
        assert status == 200, body
        return sorted(entry["id"] for entry in body["data"])

    # -- config -----------------------------------------------------------
    def model_yaml(self, name: str, **extra: Any) -> dict[str, Any]:
        port = self.model_ports.setdefault(name, free_port())
        entry: dict[str, Any] = {
            "model_path": f"sim/{name}",
            "command": self.sim_command,
            "port": port,
            "startup_timeout": 120,
            "env": {"LLMUX_SIM_TOKENS_PER_S": "0"},
        }
        entry.update(extra)
        return {"models": {name: entry}}

    def write_model(self, name: str, **extra: Any) -> Path:
        path = self.models_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(self.model_yaml(name, **extra)))
        return path

    def remove_model(self, name: str) -> None:
        (self.models_dir / f"{name}.yaml").unlink(missing_ok=True)

    def unit_pid(self, model: str) -> int:
        return int(self.prop(f"llmux-model-{model}.service", "MainPID") or 0)

    def llmux_units(self) -> dict[str, str]:
        """llmux-model-*.service units -> ActiveState."""
        out = self.systemctl("list-units", "--all", "--plain", "--no-legend", "llmux-model-*.service").stdout
        units = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3:
                units[parts[0]] = parts[2]
        return units

    def backend_sleeping(self, model: str) -> bool | None:
        """The backend's own /is_sleeping (None: not answering)."""
        try:
            status, body = http("GET", f"http://127.0.0.1:{self.model_ports[model]}/is_sleeping", timeout=10)
        except OSError:
            return None
        return bool(body["is_sleeping"]) if status == 200 else None

    def wait_active(self, what: str = "llmuxd active") -> None:
        try:
            wait_for(lambda: self.prop("llmuxd.service", "ActiveState") == "active", what)
        except AssertionError as exc:
            status = self.systemctl("status", "--no-pager", "-n", "0", "llmuxd.service").stdout
            owner = self.bed.run("busctl", "status", "--no-pager", BUS_NAME, check=False).stdout[:400]
            procs = self.bed.run("ps", "-eo", "pid,ppid,user,stat,cgroup,cmd", check=False).stdout
            raise AssertionError(f"{exc}\n{status}\nbus name owner:\n{owner}\nprocesses:\n{procs}\n"
                                 f"llmuxd's journal:\n"
                                 f"{self.journal('-u', 'llmuxd.service')[-6000:]}") from None

    def status_text(self) -> str:
        return self.prop("llmuxd.service", "StatusText")


def install_bus_policy(bed: TestSystemd, tree: Path) -> None:
    """The daemon's bus policy, from the checkout, into the test bus."""
    policy_dir = Path(bed.env["SYSD_TEST_DBUS_POLICY_DIR"])
    shipped = tree / "dbus" / "io.llmux.LLMux1.conf"
    if shipped.exists():
        shutil.copy(shipped, policy_dir / shipped.name)
    else:  # the bus room's file has not landed: the least the daemon needs
        (policy_dir / "io.llmux.LLMux1.conf").write_text(textwrap.dedent("""\
            <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
             "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
            <busconfig>
              <policy user="root"><allow own="io.llmux.LLMux1"/>
                <allow send_destination="io.llmux.LLMux1"/></policy>
            </busconfig>
            """))
    activation = tree / "dbus" / "io.llmux.LLMux1.service"
    if activation.exists():  # bus activation from the checkout: an extra service dir
        services = Path(bed.state_dir) / "run" / "llmux-test-dbus-services"
        services.mkdir(parents=True, exist_ok=True)
        shutil.copy(activation, services / activation.name)
        (policy_dir / "llmux-test-servicedir.conf").write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            "<busconfig><servicedir>/run/llmux-test-dbus-services</servicedir></busconfig>\n")
    bed.run("systemctl", "reload", "dbus.service", check=False)


def install_units(svc: ServiceBed, source: Path) -> None:
    """Copies, not symlinks: a symlink to a file outside the unit path makes a
    "linked" unit, and then the enabled Alias=dbus-io.llmux.LLMux1.service
    would be a second unit (bus activation would start a second llmuxd)."""
    svc.unit_dir.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        shutil.copy(source / unit, svc.unit_dir / unit)


def write_dropins(svc: ServiceBed, service_lines: list[str]) -> None:
    socket_dir = svc.unit_dir / "llmux.socket.d"
    socket_dir.mkdir(parents=True, exist_ok=True)
    (socket_dir / "50-test-port.conf").write_text(
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{svc.port}\n")
    service_dir = svc.unit_dir / "llmuxd.service.d"
    service_dir.mkdir(parents=True, exist_ok=True)
    (service_dir / "50-test.conf").write_text("\n".join(
        ["[Service]", f"WatchdogSec={TEST_WATCHDOG_SEC}s", "TimeoutAbortSec=5s", "RestartSec=1s",
         "StartLimitBurst=50", *service_lines]) + "\n")


def base_config(svc: ServiceBed) -> str:
    return yaml.safe_dump({
        "listen": f"127.0.0.1:{svc.port}",
        "state_dir": svc.state_dir,
        "user": svc.user,
        "port_range": [20000, 20999],
        "policy": {"min_active": 0, "drain_timeout": 10, "request_timeout": 120,
                   "failure_backoff": 0},
    })


def boot_from_tree() -> ServiceBed:
    """Units from systemd/, daemon and simulator from this checkout's venv (in a
    fixture: skips with the reason where the test systemd cannot boot)."""
    require_marker("systemd", "boots the test systemd")
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    bed = TestSystemd.boot()
    try:
        venv_bin = Path(sys.executable).parent
        run_dir = "/run/llmux-test"
        svc = ServiceBed(bed, free_port(), f"{run_dir}/llmux.yaml", f"{run_dir}/state", None,
                         [str(venv_bin / "llmux-vllm-sim"), "serve"])
        svc.models_dir.mkdir(parents=True)
        svc.unit_dir.mkdir(parents=True, exist_ok=True)
        install_units(svc, ROOT / "systemd")
        write_dropins(svc, [
            "ExecStartPre=",
            "ExecStart=",
            f"ExecStart={venv_bin / 'llmuxd'} --config {svc.config_file}",
            f"ReadWritePaths={run_dir}",
            # the checkout (and so the venv) may live under /home or /tmp (a CI clone)
            "ProtectHome=no",
            "PrivateTmp=no",
        ])
        svc.host_path(svc.config_file).write_text(base_config(svc))
        install_bus_policy(bed, ROOT)
        bed.run("systemctl", "daemon-reload")
        return svc
    except BaseException:
        bed.down()
        raise


@pytest.fixture(scope="module")
def svc():
    service = boot_from_tree()
    try:
        yield service
    finally:
        service.shut_down()


# --------------------------------------------------------------- scenarios


def test_enable_now_reaches_ready(svc):
    svc.write_model("alpha")
    svc.write_model("beta", env={"LLMUX_SIM_TOKENS_PER_S": "0", "LLMUX_SIM_SLEEP_TIME": "2"})
    svc.enable_now()
    # Type=notify: `start` returned, so READY=1 arrived
    assert svc.prop("llmuxd.service", "ActiveState") == "active"
    assert svc.status_text().startswith("active: "), svc.status_text()
    assert "daemon_ready" in svc.journal("-u", "llmuxd.service", "-o", "verbose", "LLMUX_EVENT=daemon_ready")


def test_request_through_the_socket_is_answered_by_the_simulator(svc):
    status, body = svc.request("alpha")
    assert status == 200, body
    assert body["model"] == "alpha"
    assert svc.llmux_units().get("llmux-model-alpha.service") == "active"
    assert wait_for(lambda: "active: alpha" in svc.status_text(), "STATUS= names alpha")


def test_second_model_switches_and_the_journal_tells(svc):
    status, body = svc.request("beta")
    assert status == 200, body
    assert body["model"] == "beta"
    assert svc.backend_sleeping("alpha") is True
    finished = wait_for(lambda: svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=switch_finished",
                                            "LLMUX_MODEL=beta"), "switch_finished in the journal")
    assert "beta" in finished
    assert svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=switch_started", "LLMUX_MODEL=beta")
    # the backend's own output, found by its model field (LogExtraFields of its unit)
    assert svc.journal("LLMUX_MODEL=beta", "_SYSTEMD_UNIT=llmux-model-beta.service")


def test_pin_refuses_the_other_model_with_503(svc):
    result = svc.manager_call("Pin", "s", "beta")
    assert result.returncode == 0, result.stderr
    try:
        status, body = svc.request("alpha")
        assert status == 503, body
        assert "pinned" in json.dumps(body)
        status, _ = svc.request("beta")
        assert status == 200
    finally:
        assert svc.manager_call("Unpin").returncode == 0


def test_reload_adds_a_model(svc):
    svc.write_model("gamma")
    result = svc.systemctl("reload", "llmuxd.service")
    assert result.returncode == 0, result.stderr
    assert "gamma" in svc.models_listed()
    assert svc.prop("llmuxd.service", "ActiveState") == "active"


def test_reload_with_a_broken_config_fails_and_keeps_serving(svc):
    broken = svc.models_dir / "zz-broken.yaml"
    broken.write_text("models:\n  delta:\n    model_path: sim/delta\n    eviction: offload+nap\n")
    try:
        result = svc.systemctl("reload", "llmuxd.service")
        assert result.returncode != 0
        assert svc.prop("llmuxd.service", "ActiveState") == "active"
        assert "delta" not in svc.models_listed()
        status, _ = svc.request("beta")
        assert status == 200
        log = svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=reload_failed")
        assert "zz-broken.yaml" in log and "models.delta.eviction" in log, log
    finally:
        broken.unlink()


def test_reload_removes_a_model_and_stops_its_unit(svc):
    status, _ = svc.request("gamma")
    assert status == 200
    svc.remove_model("gamma")
    assert svc.systemctl("reload", "llmuxd.service").returncode == 0
    assert "gamma" not in svc.models_listed()
    wait_for(lambda: svc.llmux_units().get("llmux-model-gamma.service") in (None, "inactive", "failed"),
             "gamma's unit stopped")


def test_restart_keeps_backends_and_serves_without_cold_start(svc):
    status, _ = svc.request("beta")
    assert status == 200
    pids = {m: svc.unit_pid(m) for m in ("alpha", "beta")}
    assert all(pids.values()), pids
    daemon_pid = svc.prop("llmuxd.service", "MainPID")
    result = svc.systemctl("restart", "llmuxd.service")
    assert result.returncode == 0, result.stderr
    assert svc.prop("llmuxd.service", "MainPID") != daemon_pid
    assert {m: svc.unit_pid(m) for m in ("alpha", "beta")} == pids
    assert "adopted" in svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=units_adopted")
    status, body = svc.request("beta")
    assert status == 200, body
    assert svc.unit_pid("beta") == pids["beta"]  # served by the same process: no cold start


def test_runtime_overrides_survive_a_restart(svc):
    assert svc.manager_call("SetEviction", "ss", "alpha", "discard+keep_running").returncode == 0
    assert svc.manager_call("Pin", "s", "beta").returncode == 0
    state_file = svc.host_path(svc.state_dir) / "state.json"
    wait_for(lambda: json.loads(state_file.read_text()).get("pinned") == "beta", "state.json has the pin")
    assert svc.systemctl("restart", "llmuxd.service").returncode == 0
    mode = svc.busctl("get-property", BUS_NAME, *MANAGER, "PinnedModel").stdout
    assert '"beta"' in mode
    status, _ = svc.request("alpha")
    assert status == 503
    assert svc.manager_call("Unpin").returncode == 0
    state = json.loads(state_file.read_text())
    assert state["evictions"]["alpha"] == "discard+keep_running"


def test_corrupt_state_file_is_ignored_with_a_warning(svc):
    state_file = svc.host_path(svc.state_dir) / "state.json"
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0  # it saves on the way out
    state_file.write_text("{ this is not json")
    assert svc.systemctl("start", "llmuxd.service").returncode == 0
    assert "state.json" in svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=state_corrupt")
    status, _ = svc.request("alpha")
    assert status == 200


def test_missing_state_directory_is_created(svc):
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0
    shutil.rmtree(svc.host_path(svc.state_dir))
    assert svc.systemctl("start", "llmuxd.service").returncode == 0
    assert svc.host_path(svc.state_dir).is_dir()
    assert svc.manager_call("SetMode", "s", "auto").returncode == 0
    wait_for(lambda: (svc.host_path(svc.state_dir) / "state.json").exists(), "state.json written")


def test_foreign_unit_with_our_name_is_never_touched(svc):
    foreign = "llmux-model-alpha2.service"
    svc.bed.run("systemd-run", f"--unit={foreign}", "--quiet", "sleep", "infinity")
    pid = svc.prop(foreign, "MainPID")
    svc.write_model("alpha2")
    try:
        assert svc.systemctl("restart", "llmuxd.service").returncode == 0
        assert svc.systemctl("reload", "llmuxd.service").returncode == 0
        assert svc.prop(foreign, "MainPID") == pid
        assert svc.prop(foreign, "ActiveState") == "active"
        status, body = svc.request("alpha2", timeout=60)
        assert status >= 500, body  # its unit name is taken by someone else: an error, not a takeover
        assert svc.prop(foreign, "MainPID") == pid
    finally:
        svc.remove_model("alpha2")
        svc.systemctl("reload", "llmuxd.service")
        svc.systemctl("stop", foreign)


def test_sigkill_mid_switch_then_start_is_consistent(svc):
    assert svc.request("beta")[0] == 200  # beta awake; its sleep takes 2 s (LLMUX_SIM_SLEEP_TIME)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 1))
    answered: list[Any] = []
    client = threading.Thread(target=lambda: answered.append(_safe_request(svc, "alpha")), daemon=True)
    client.start()
    wait_for(lambda: svc.journal("-u", "llmuxd.service", "--since", since,
                                 "LLMUX_EVENT=switch_started", "LLMUX_MODEL=alpha"), "switch to alpha started")
    restarts = int(svc.prop("llmuxd.service", "NRestarts"))
    svc.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", "llmuxd.service")
    client.join(timeout=DEADLINE)
    assert not client.is_alive(), "the client of the killed daemon is still waiting"
    [outcome] = answered
    # a killed daemon cannot answer: the client's connection drops at once (a
    # timeout would be a hang); only if the switch won the race may alpha answer
    assert isinstance(outcome, ConnectionError) or (
        isinstance(outcome, tuple) and outcome[0] == 200 and outcome[1]["model"] == "alpha"), outcome
    # Restart=on-failure brings it back; `start` is what an operator would type
    wait_for(lambda: int(svc.prop("llmuxd.service", "NRestarts")) > restarts
             or svc.prop("llmuxd.service", "ActiveState") == "failed", "llmuxd restarted")
    svc.systemctl("start", "llmuxd.service")
    svc.wait_active()
    units = svc.llmux_units()
    assert set(units) <= {"llmux-model-alpha.service", "llmux-model-beta.service"}, units
    awake = [m for m in ("alpha", "beta") if svc.backend_sleeping(m) is False]
    assert len(awake) <= 1, f"two models awake after the restart: {awake}"
    status, body = svc.request("alpha")
    assert status == 200, body
    assert [m for m in ("alpha", "beta") if svc.backend_sleeping(m) is False] == ["alpha"]


def _safe_request(svc: ServiceBed, model: str) -> Any:
    try:
        return svc.request(model, timeout=60)
    except OSError as exc:  # the daemon died under it: expected here
        return exc


def test_watchdog_restarts_a_wedged_daemon(svc):
    svc.wait_active()
    pid = svc.prop("llmuxd.service", "MainPID")
    restarts = int(svc.prop("llmuxd.service", "NRestarts"))
    backend_pids = {m: svc.unit_pid(m) for m in ("alpha", "beta")}
    # a stopped process cannot ping: to systemd this is a wedged event loop
    svc.bed.run("kill", "-STOP", pid)
    wait_for(lambda: int(svc.prop("llmuxd.service", "NRestarts")) > restarts,
             "watchdog restart", deadline=DEADLINE + 2 * TEST_WATCHDOG_SEC)
    svc.wait_active()
    assert svc.prop("llmuxd.service", "MainPID") != pid
    assert "watchdog" in svc.journal("-u", "llmuxd.service", "_PID=1").lower() or \
        "watchdog" in svc.journal("-u", "llmuxd.service").lower()
    assert {m: svc.unit_pid(m) for m in ("alpha", "beta")} == backend_pids
    assert svc.request("alpha")[0] == 200


def test_stop_leaves_backends_running(svc):
    pids = {m: svc.unit_pid(m) for m in ("alpha", "beta")}
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0
    assert {m: svc.unit_pid(m) for m in ("alpha", "beta")} == pids
    assert "STOPPING" not in svc.status_text()
    assert svc.systemctl("start", "llmuxd.service").returncode == 0


def test_a_connection_to_the_socket_starts_the_stopped_service(svc):
    """Socket activation on demand: with llmuxd.service stopped and
    llmux.socket listening, a client's connection starts the service, and
    its first request (sent at once, waiting in the backlog) is answered,
    here by a model whose backend was stopped too (a cold start)."""
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0
    assert svc.systemctl("stop", "llmux-model-alpha.service").returncode == 0
    assert svc.prop("llmuxd.service", "ActiveState") == "inactive"
    assert svc.prop("llmux.socket", "ActiveState") == "active"  # systemd listens alone
    assert svc.prop("llmux.socket", "SubState") == "listening"
    started = int(svc.prop("llmuxd.service", "ExecMainStartTimestampMonotonic") or 0)
    status, body = svc.request("alpha")
    assert status == 200, f"{status} {body}\n{svc.journal('-u', 'llmuxd.service')[-3000:]}"
    assert body["model"] == "alpha"
    assert svc.prop("llmuxd.service", "ActiveState") == "active"
    assert int(svc.prop("llmuxd.service", "ExecMainStartTimestampMonotonic")) > started  # a new start
    assert svc.prop("llmux.socket", "SubState") == "running"  # the socket handed over to the service
    assert f"socket activation: serving on 127.0.0.1:{svc.port}" in svc.journal("-u", "llmuxd.service",
                                                                f"_PID={svc.prop('llmuxd.service', 'MainPID')}")


def test_bus_activation_starts_the_one_llmuxd(svc):
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0
    # the activation file names the Alias=, which is llmuxd.service itself
    assert svc.prop("dbus-io.llmux.LLMux1.service", "Id") == "llmuxd.service"
    result = svc.busctl("get-property", BUS_NAME, *MANAGER, "Version")
    assert result.returncode == 0, result.stderr
    svc.wait_active()
    daemons = svc.bed.run("pgrep", "-f", "llmuxd --config", check=False).stdout.split()
    assert len(daemons) == 1, daemons


def test_unreadable_config_at_boot_names_file_and_key(svc):
    config = svc.host_path(svc.config_file)
    good = config.read_text()
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0
    config.write_text(good + "max_body_bytes: 16 megs\n")
    try:
        result = svc.systemctl("start", "llmuxd.service")
        assert result.returncode != 0
        log = svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=config_invalid")
        assert svc.config_file in log and "max_body_bytes" in log, log
        status = svc.systemctl("status", "--no-pager", "-n", "20", "llmuxd.service").stdout
        assert "max_body_bytes" in status, status
        # exit status 78 (EX_CONFIG) is not restarted in a loop
        assert svc.prop("llmuxd.service", "ExecMainStatus") == "78"
    finally:
        config.write_text(good)
        svc.systemctl("reset-failed", "llmuxd.service")
    assert svc.systemctl("start", "llmuxd.service").returncode == 0


def test_outside_systemd_through_dbus_system_bus_address(svc, tmp_path):
    """The daemon started by hand (not by systemd), reaching the system bus
    through $DBUS_SYSTEM_BUS_ADDRESS: the datagrams it sends to $NOTIFY_SOCKET,
    HTTP on the configured address, SIGHUP reload, SIGTERM leaving the backend."""
    import signal
    import socket

    assert svc.systemctl("stop", "llmuxd.service", "llmux.socket").returncode == 0
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(DEADLINE)
    port = free_port()
    config = tmp_path / "llmux.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "state"), "user": None,
        "models": svc.model_yaml("alpha")["models"],
    }))
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": svc.bed.bus_address, "NOTIFY_SOCKET": notify_path,
           "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "llmuxd"), "--config", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def next_notification(*wanted: str) -> list[str]:
        while True:
            lines = notify.recv(4096).decode().split("\n")
            if lines[0] in wanted:
                return lines

    try:
        ready = next_notification("READY=1")
        assert ready[1].startswith("STATUS=active: ") and ready[2] == f"MAINPID={daemon.pid}"
        assert next_notification("WATCHDOG=1") == ["WATCHDOG=1"]
        status, body = http("POST", f"http://127.0.0.1:{port}/v1/completions",
                            {"model": "alpha", "prompt": "hi", "max_tokens": 2}, timeout=120)
        assert status == 200, body
        pid = svc.unit_pid("alpha")
        daemon.send_signal(signal.SIGHUP)
        assert next_notification("RELOADING=1")[1].startswith("MONOTONIC_USEC=")
        assert next_notification("READY=1")[0] == "READY=1"
        daemon.send_signal(signal.SIGTERM)
        assert next_notification("STOPPING=1") == ["STOPPING=1", "STATUS=stopping"]
        assert daemon.wait(timeout=DEADLINE) == 0, daemon.stderr.read()
        assert svc.unit_pid("alpha") == pid  # left running for the next start to adopt
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notify.close()
