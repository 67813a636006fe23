"""End to end on the session bus: `llmuxd run` as a real process on
`llmux-vllm-sim` backends, with a private session bus (a dbus-daemon of our
own), driven by `llmuxctl --user ... --json` and `busctl --user` the way a
user at a desktop would, and checked through HTTP.

One daemon serves the module; tests that edit its config file put it back.
Waits are bounded polls of the daemon's own state; nothing asserts a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from daemon_process import (BIN, SIM, WAIT, DaemonProcess, daemon_env, http_json, sim_model,
                            wait_until, write_config)
from test_bus_support import PrivateBus

BUS_NAME = "io.llmux.LLMux1"
MANAGER = "/io/llmux/LLMux1"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(SIM), reason="llmux-vllm-sim not installed in this venv"),
    pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon"),
]


def tool_env(bus_address: str | None) -> dict:
    """The environment of the daemon and of the tools: this checkout first on
    the path, the private bus as the session bus (or no session bus at all)."""
    env = daemon_env()
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    if bus_address is not None:
        env["DBUS_SESSION_BUS_ADDRESS"] = bus_address
    return env


class Daemon(DaemonProcess):
    """`llmuxd run --bus MODE` in a subprocess, in the environment `env`."""

    def __init__(self, config: Path, log: Path, env: dict, bus: str = "session"):
        super().__init__(config, log, bus=bus, env=env)

    def chat(self, model: str) -> tuple[int, dict]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        status, _, reply = http_json(self.base + "/v1/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"}, timeout=WAIT)
        return status, reply


@pytest.fixture(scope="module")
def session_bus():
    bus = PrivateBus("session")
    yield bus
    bus.close()


@pytest.fixture(scope="module")
def llmux(tmp_path_factory, session_bus):
    tmp = tmp_path_factory.mktemp("e2e-bus")
    ledger = tmp / "gpu.json"
    models = {"alpha": sim_model("org/alpha-7b", ledger, 30000),
              "beta": sim_model("org/beta-7b", ledger, 30000)}
    daemon = Daemon(write_config(tmp, models), tmp / "llmuxd.log", tool_env(session_bus.address))
    daemon.env = tool_env(session_bus.address)
    daemon.ledger = ledger
    daemon.wait_ready()
    # HTTP comes up last: by now the name is owned
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture
def config_restored(llmux):
    """Puts the daemon's config file and configuration back after a test that edits it."""
    original = llmux.config.read_text()
    yield yaml.safe_load(original)
    llmux.config.write_text(original)
    ctl(llmux, "reload")
    wait_until("the original models", lambda: set(llmux.models()) == set(yaml.safe_load(original)["models"]))


def ctl(daemon: Daemon, *args: str) -> tuple[int, dict]:
    """`llmuxctl --user ARGS --json`: (exit status, parsed stdout)."""
    done = subprocess.run([str(BIN / "llmuxctl"), "--user", "--json", *args], env=daemon.env,
                          capture_output=True, text=True, timeout=WAIT + 30)
    assert done.stdout.strip(), f"llmuxctl {' '.join(args)} printed nothing; stderr: {done.stderr}"
    return done.returncode, json.loads(done.stdout)


def busctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["busctl", "--user", *args], env=daemon.env, capture_output=True, text=True,
                          timeout=WAIT + 30)


def write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data))


def write_with_model(daemon: Daemon, original: dict, model: str, **policy) -> None:
    """Rewrite the daemon's config file as `original` plus the simulator model `model`
    (org/MODEL-7b) and the `policy` changes given."""
    data = {**original, "models": {**original["models"],
                                   model: sim_model(f"org/{model}-7b", daemon.ledger, 30000)}}
    if policy:
        data["policy"] = {**original["policy"], **policy}
    write_yaml(daemon.config, data)


# -- reading -------------------------------------------------------------------


def test_status_on_the_session_bus_lists_the_configured_models(llmux):
    rc, status = ctl(llmux, "status")
    assert rc == 0, status
    assert set(status["models"]) == {"alpha", "beta"}
    assert "on the session bus as io.llmux.LLMux1" in llmux.log()


def test_busctl_sees_the_manager_and_one_object_per_model(llmux):
    tree = busctl(llmux, "tree", BUS_NAME)
    assert tree.returncode == 0, tree.stderr
    for path in (MANAGER, f"{MANAGER}/model/alpha", f"{MANAGER}/model/beta"):
        assert path in tree.stdout
    unit = busctl(llmux, "get-property", BUS_NAME, f"{MANAGER}/model/alpha", "io.llmux.LLMux1.Model", "Unit")
    assert unit.stdout.strip() == 's ""', "embedded backends are no systemd units"


# -- control -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["beta", "alpha"])
def test_switch_moves_the_active_model(llmux, model):
    rc, reply = ctl(llmux, "switch", model)
    assert (rc, reply["model"], reply["ok"]) == (0, model, True), reply
    rc, status = ctl(llmux, "status")
    assert status["active_models"] == [model]
    states = {name: m["state"] for name, m in llmux.models().items()}
    assert states[model] == "active"
    assert [name for name, state in states.items() if state == "active"] == [model]


def test_busctl_switch_and_wait_then_http_is_served_by_that_model(llmux):
    done = busctl(llmux, "call", BUS_NAME, MANAGER, "io.llmux.LLMux1.Manager", "SwitchAndWait", "st", "beta", "0")
    assert done.returncode == 0, done.stderr
    assert busctl(llmux, "get-property", BUS_NAME, MANAGER, "io.llmux.LLMux1.Manager",
                  "ActiveModels").stdout.split() == ["as", "1", '"beta"']
    status, reply = llmux.chat("beta")
    assert (status, reply["model"]) == (200, "beta")


def test_pin_makes_requests_for_another_model_get_503_until_unpinned(llmux):
    rc, reply = ctl(llmux, "pin", "alpha")
    assert (rc, reply) == (0, {"pinned": "alpha", "mode": "manual"})
    try:
        status, body = llmux.chat("beta")
        assert status == 503, body
        assert "alpha" in body["error"]["message"]
        status, body = llmux.chat("alpha")
        assert (status, body["model"]) == (200, "alpha")
        rc, status_reply = ctl(llmux, "status")
        assert (status_reply["mode"], status_reply["pinned"]) == ("manual", "alpha")
    finally:
        rc, reply = ctl(llmux, "unpin")
    assert (rc, reply["mode"]) == (0, "auto")
    status, body = llmux.chat("beta")
    assert (status, body["model"]) == (200, "beta")


# -- reload ----------------------------------------------------------------------


def test_reload_over_the_bus_adds_a_model_to_http_and_the_bus(llmux, config_restored):
    write_with_model(llmux, config_restored, "gamma")
    rc, reply = ctl(llmux, "reload")
    assert (rc, reply) == (0, {"reloaded": True})
    assert "gamma" in llmux.models()
    assert f"{MANAGER}/model/gamma" in busctl(llmux, "tree", BUS_NAME).stdout
    status, body = llmux.chat("gamma")
    assert (status, body["model"]) == (200, "gamma")


def test_reload_of_a_broken_config_fails_with_invalid_config_and_changes_nothing(llmux, config_restored):
    write_with_model(llmux, config_restored, "delta", request_timeout="soon")

    rc, reply = ctl(llmux, "reload")
    assert rc != 0
    assert reply["error"] == "io.llmux.LLMux1.Error.InvalidConfig"
    assert "request_timeout" in reply["message"] and str(llmux.config) in reply["message"]
    done = busctl(llmux, "call", BUS_NAME, MANAGER, "io.llmux.LLMux1.Manager", "Reload")
    assert done.returncode != 0 and "request_timeout" in done.stderr

    assert set(llmux.models()) == {"alpha", "beta"}
    assert f"{MANAGER}/model/delta" not in busctl(llmux, "tree", BUS_NAME).stdout
    status, body = llmux.chat("alpha")
    assert (status, body["model"]) == (200, "alpha")


def test_sighup_reloads_the_config_file(llmux, config_restored):
    write_with_model(llmux, config_restored, "epsilon")
    llmux.proc.send_signal(signal.SIGHUP)
    wait_until("epsilon on /v1/models after SIGHUP", lambda: "epsilon" in llmux.models())
    rc, status = ctl(llmux, "status")
    assert "epsilon" in status["models"]


def test_reload_applies_the_front_end_limits(llmux, config_restored):
    write_yaml(llmux.config, {**config_restored, "max_body_bytes": 1000})
    assert ctl(llmux, "reload")[0] == 0
    big = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    status, _, body = http_json(llmux.base + "/v1/chat/completions", big, {"Content-Type": "application/json"})
    assert status == 413, body


# -- where there is no session bus, or the name is taken ---------------------------


def test_bus_session_without_a_session_bus_fails_clearly(tmp_path):
    config = write_config(tmp_path, {"alpha": sim_model("org/alpha-7b", tmp_path / "gpu.json", 1000)})
    daemon = Daemon(config, tmp_path / "llmuxd.log", tool_env(None), bus="session")
    assert daemon.wait_exit() == 1, daemon.log()
    assert "--bus session: the session bus cannot be used: DBUS_SESSION_BUS_ADDRESS is not set" in daemon.log()


def test_auto_without_a_session_bus_serves_http_and_says_so(tmp_path):
    config = write_config(tmp_path, {"alpha": sim_model("org/alpha-7b", tmp_path / "gpu.json", 1000)})
    daemon = Daemon(config, tmp_path / "llmuxd.log", tool_env(None), bus="auto")
    try:
        daemon.wait_ready()
        assert "not on D-Bus (no usable session bus: DBUS_SESSION_BUS_ADDRESS is not set)" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.parametrize("mode, exit_status", [("session", 1), ("auto", None)])
def test_a_second_daemon_on_the_same_bus(llmux, tmp_path, mode, exit_status):
    """The name is taken: --bus session refuses to start; auto serves HTTP without the bus."""
    config = write_config(tmp_path, {"alpha": sim_model("org/alpha-7b", tmp_path / "gpu.json", 1000)})
    second = Daemon(config, tmp_path / "llmuxd.log", llmux.env, bus=mode)
    try:
        if exit_status is not None:
            assert second.wait_exit() == exit_status, second.log()
            assert "io.llmux.LLMux1 is already owned on this bus" in second.log()
        else:
            second.wait_ready()
            assert "not on D-Bus" in second.log() and "already owned" in second.log()
    finally:
        second.stop()
    rc, status = ctl(llmux, "status")
    assert set(status["models"]) == {"alpha", "beta"}, "the first daemon keeps the name"


# -- warm-up: once per model at startup, not again on each start ---------------------


def served_by_backend(port: int) -> float:
    """vllm:request_success_total of the simulator on `port`."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("vllm:request_success_total"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no vllm:request_success_total from the backend on port {port}")


def test_warmup_true_infers_exactly_once_per_model_at_startup(tmp_path):
    """`warmup: true` is llmux 0.7's startup warm-up (start, infer, sleep each
    model); the orchestrator adds no second warm-up request when it starts them."""
    ledger = tmp_path / "gpu.json"
    models = {"alpha": sim_model("org/alpha-7b", ledger, 1000), "beta": sim_model("org/beta-7b", ledger, 1000)}
    config = write_config(tmp_path, models, warmup=True)
    daemon = Daemon(config, tmp_path / "llmuxd.log", tool_env(None), bus="none")
    try:
        daemon.wait_ready()
        assert {name: m["state"] for name, m in daemon.models().items()} == {"alpha": "asleep", "beta": "asleep"}
        assert {name: served_by_backend(m["port"]) for name, m in models.items()} == {"alpha": 1.0, "beta": 1.0}
        status, body = daemon.chat("beta")
        assert (status, body["model"]) == (200, "beta")
        assert served_by_backend(models["beta"]["port"]) == 2.0
    finally:
        assert daemon.stop() == 0, daemon.log()
