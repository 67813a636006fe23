"""The D-Bus API on the real system bus of the test systemd (tests/sysd).

test_bus_*.py check the API on private dbus-daemons with dbusmock's polkitd;
here llmuxd runs as the system service (units, bus policy and activation file
from the checkout, simulator backends) and is driven with the tools an
operator types: busctl, dbus-send, llmuxctl, and HTTP on the socket's port.
The last scenarios call as a non-root user, which the daemon must refuse:
there is no polkitd in the test systemd, so only root may change anything.

The scenarios run in file order on one daemon (module fixture `bus_svc`);
each leaves it serving. Waits poll with generous deadlines; nothing asserts
a duration.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sysd.helpers import http
from sysd.testbed import unavailable_reason
from test_service import BUS_NAME, MANAGER, ServiceBed, boot_from_tree, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
MODEL_IFACE = "io.llmux.LLMux1.Model"
#: model -> its object path, as `busctl tree` shows it (sd-bus escaping: "." is _2e, "-" is _2d)
MODEL_PATHS = {
    "alpha": "/io/llmux/LLMux1/model/alpha",
    "qwen2.5-7b": "/io/llmux/LLMux1/model/qwen2_2e5_2d7b",
}
CALLER = "llmux-test-caller"  # a throwaway system user: the non-root caller
DENIED = "org.freedesktop.DBus.Error.AccessDenied"
DENIED_MESSAGE = ("not authorized for io.llmux.LLMux1.control: "
                  "polkit is not running, so only root may do this (use sudo)")


@pytest.fixture(scope="module")
def bus_svc():
    reason = unavailable_reason() or (None if shutil.which("dbus-send") else "needs dbus-send (apt install dbus)")
    if reason:
        pytest.skip(reason)
    svc = boot_from_tree()
    try:
        for model in MODEL_PATHS:
            svc.write_model(model)
        svc.enable_now()
        yield svc
    finally:
        svc.shut_down()


@pytest.fixture(scope="module")
def caller(bus_svc) -> str:
    """A non-root user that can reach the test bus (its socket is world-writable)."""
    try:
        pwd.getpwnam(CALLER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", CALLER],
                              capture_output=True, text=True, timeout=60)
        # 9: created meanwhile by a parallel run
        assert made.returncode in (0, 9), f"useradd {CALLER}: {made.stderr.strip()}"
    return CALLER


# ------------------------------------------------------------------ tools


def as_user(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


def tool(svc: ServiceBed, *argv: str, user: str | None = None) -> subprocess.CompletedProcess:
    """A client on the test system bus (as `user`, default root); stdin is not a
    terminal, so nothing asks polkit for interactive authorization."""
    return subprocess.run(
        [*as_user(user), *argv], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": svc.bed.bus_address},
    )


def busctl(svc: ServiceBed, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    return tool(svc, "busctl", "--system", "--no-pager", *args, user=user)


def llmuxctl(svc: ServiceBed, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    return tool(svc, str(VENV_BIN / "llmuxctl"), *args, user=user)


def ctl_status(svc: ServiceBed) -> dict:
    """`llmuxctl --json status` of the service, parsed."""
    result = llmuxctl(svc, "--json", "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def get_property(svc: ServiceBed, name: str, path: str = MANAGER[0], interface: str = MANAGER[1],
                 user: str | None = None) -> str:
    """busctl's answer, e.g. 's "auto"' (no newline)."""
    result = busctl(svc, "get-property", BUS_NAME, path, interface, name, user=user)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def model_state(svc: ServiceBed, model: str) -> str:
    return get_property(svc, "State", MODEL_PATHS[model], MODEL_IFACE)


def http_states(svc: ServiceBed) -> dict[str, str]:
    """Model -> state, as GET /v1/models on the socket's port tells."""
    status, body = http("GET", f"http://127.0.0.1:{svc.port}/v1/models", timeout=60)
    assert status == 200, body
    return {entry["id"]: entry["llmux"]["state"] for entry in body["data"]}


def introspect_rows(svc: ServiceBed, path: str, interface: str) -> dict[str, list[str]]:
    """busctl introspect's member rows: '.Name' -> [type, signature, result/value, flags...]."""
    result = busctl(svc, "introspect", BUS_NAME, path, interface)
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith(".")}


# -------------------------------------------------------------- scenarios


MANAGER_MEMBERS = {
    # member: (type, in signature, out signature)
    ".Switch": ("method", "s", "-"),
    ".SwitchAndWait": ("method", "st", "-"),
    ".Pin": ("method", "s", "-"),
    ".Unpin": ("method", "-", "-"),
    ".SetMode": ("method", "s", "-"),
    ".Sleep": ("method", "ss", "-"),
    ".Wake": ("method", "s", "-"),
    ".SetEviction": ("method", "ss", "-"),
    ".Reload": ("method", "-", "-"),
    ".Acquire": ("method", "st", "st"),
    ".Release": ("method", "t", "-"),
    ".GetStatus": ("method", "-", "a{sv}"),
    ".SwitchStarted": ("signal", "ss", "-"),
    ".SwitchFinished": ("signal", "ssbts", "-"),
}
MANAGER_PROPERTIES = {".Version": "s", ".APIVersion": "u", ".Mode": "s", ".PinnedModel": "s",
                      ".ActiveModels": "as", ".State": "s", ".Models": "ao"}


def test_introspect_shows_the_manager_interface(bus_svc):
    rows = introspect_rows(bus_svc, *MANAGER)
    for member, (kind, signature, result) in MANAGER_MEMBERS.items():
        assert rows.get(member, [])[:3] == [kind, signature, result], (member, rows.get(member))
    for member, signature in MANAGER_PROPERTIES.items():
        assert rows.get(member, [])[:2] == ["property", signature], (member, rows.get(member))
    assert rows[".Mode"][2] == '"auto"'
    assert rows[".Models"][2:5] == ["2", *(f'"{p}"' for p in MODEL_PATHS.values())]
    assert "emits-change" in rows[".State"] and "const" in rows[".Version"]
    model_rows = introspect_rows(bus_svc, MODEL_PATHS["qwen2.5-7b"], MODEL_IFACE)
    assert model_rows[".Name"][:3] == ["property", "s", '"qwen2.5-7b"']
    # busctl C-escapes the backslash of systemd's escaping
    assert model_rows[".Unit"][:3] == ["property", "s", r'"llmux-model-qwen2.5\\x2d7b.service"']


def test_tree_lists_one_object_per_model(bus_svc):
    result = busctl(bus_svc, "tree", BUS_NAME)
    assert result.returncode == 0, result.stderr
    paths = re.findall(r"(/io/llmux/LLMux1\S*)", result.stdout)
    assert sorted(p for p in paths if "/model/" in p) == sorted(MODEL_PATHS.values()), result.stdout
    assert MANAGER[0] in paths


@pytest.mark.parametrize("name, expected", [
    ("Mode", 's "auto"'),
    ("PinnedModel", 's ""'),
    ("ActiveModels", "as 0"),
    ("State", 's "idle"'),
])
def test_get_property_of_the_idle_daemon(bus_svc, name, expected):
    assert get_property(bus_svc, name) == expected


def test_get_property_of_a_model(bus_svc):
    assert {m: model_state(bus_svc, m) for m in MODEL_PATHS} == {m: 's "asleep"' for m in MODEL_PATHS}


def test_busctl_switch_makes_the_model_active(bus_svc):
    result = busctl(bus_svc, "call", BUS_NAME, *MANAGER, "Switch", "s", "qwen2.5-7b")
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    wait_for(lambda: model_state(bus_svc, "qwen2.5-7b") == 's "active"', "qwen2.5-7b active on the bus")
    assert get_property(bus_svc, "ActiveModels") == 'as 1 "qwen2.5-7b"'
    assert get_property(bus_svc, "State") == 's "active:qwen2.5-7b"'
    assert http_states(bus_svc) == {"alpha": "asleep", "qwen2.5-7b": "active"}


def test_llmuxctl_status_json(bus_svc):
    result = llmuxctl(bus_svc, "--json", "status")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["mode"], status["pinned"], status["active_models"]) == ("auto", "", ["qwen2.5-7b"])
    assert {m: s["state"] for m, s in status["models"].items()} == {"alpha": "asleep", "qwen2.5-7b": "active"}
    assert status["models"]["qwen2.5-7b"]["unit"] == r"llmux-model-qwen2.5\x2d7b.service"
    assert status["models"]["alpha"]["endpoint"] == f"http://127.0.0.1:{bus_svc.model_ports['alpha']}"


def test_llmuxctl_switch_shows_progress(bus_svc):
    result = llmuxctl(bus_svc, "switch", "alpha")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "switching qwen2.5-7b -> alpha ...", lines
    assert "  alpha: waking" in lines, lines
    assert re.fullmatch(r"alpha is active in \d+(\.\d)?s", lines[-1]), lines
    assert all(re.fullmatch(r"  (alpha|qwen2\.5-7b): [a-z]+", line) for line in lines[1:-1]), lines
    assert get_property(bus_svc, "ActiveModels") == 'as 1 "alpha"'
    assert http_states(bus_svc) == {"alpha": "active", "qwen2.5-7b": "asleep"}


def test_llmuxctl_pin_refuses_the_other_model_then_unpin(bus_svc):
    result = llmuxctl(bus_svc, "pin", "alpha")
    assert (result.returncode, result.stdout) == (0, "pinned to alpha (manual mode)\n"), result.stderr
    try:
        assert (get_property(bus_svc, "Mode"), get_property(bus_svc, "PinnedModel")) == ('s "manual"', 's "alpha"')
        status, body = bus_svc.request("qwen2.5-7b")
        assert status == 503, body
        assert "pinned to 'alpha'" in json.dumps(body)
        status, body = bus_svc.request("alpha")
        assert status == 200, body
    finally:
        result = llmuxctl(bus_svc, "unpin")
    assert (result.returncode, result.stdout) == (0, "unpinned (auto mode)\n"), result.stderr
    assert (get_property(bus_svc, "Mode"), get_property(bus_svc, "PinnedModel")) == ('s "auto"', 's ""')


# ----------------------------------------------------- a non-root caller


def test_a_non_root_caller_reads_properties_and_status(bus_svc, caller):
    assert get_property(bus_svc, "ActiveModels", user=caller) == 'as 1 "alpha"'
    assert get_property(bus_svc, "State", MODEL_PATHS["alpha"], MODEL_IFACE, user=caller) == 's "active"'
    result = busctl(bus_svc, "--json=short", "call", BUS_NAME, *MANAGER, "GetStatus", user=caller)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"][0]["state"]["data"] == "active:alpha"
    result = llmuxctl(bus_svc, "--json", "status", user=caller)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["active_models"] == ["alpha"]


CHANGES = [("Switch", "qwen2.5-7b"), ("Pin", "qwen2.5-7b")]


@pytest.mark.parametrize("method, model", CHANGES)
def test_a_non_root_caller_cannot_change_things_on_the_bus(bus_svc, caller, method, model):
    # dbus-send shows the error name and the daemon's message (busctl shows
    # every AccessDenied as "Access denied")
    result = tool(bus_svc, "dbus-send", "--system", "--print-reply", f"--dest={BUS_NAME}", MANAGER[0],
                  f"{MANAGER[1]}.{method}", f"string:{model}", user=caller)
    assert result.returncode == 1
    assert result.stderr == f"Error {DENIED}: {DENIED_MESSAGE}\n"
    result = busctl(bus_svc, "call", BUS_NAME, *MANAGER, method, "s", model, user=caller)
    assert (result.returncode, result.stderr) == (1, "Call failed: Access denied\n")
    assert get_property(bus_svc, "ActiveModels") == 'as 1 "alpha"'
    assert get_property(bus_svc, "PinnedModel") == 's ""'


@pytest.mark.parametrize("command", ["switch", "pin"])
def test_a_non_root_llmuxctl_is_refused_with_exit_4(bus_svc, caller, command):
    result = llmuxctl(bus_svc, command, "qwen2.5-7b", user=caller)
    assert (result.returncode, result.stdout, result.stderr) == (4, "", f"llmuxctl: {DENIED_MESSAGE}\n")
    result = llmuxctl(bus_svc, "--json", command, "qwen2.5-7b", user=caller)
    assert result.returncode == 4
    assert json.loads(result.stdout) == {"error": DENIED, "message": DENIED_MESSAGE}
    assert get_property(bus_svc, "ActiveModels") == 'as 1 "alpha"'
    assert (get_property(bus_svc, "Mode"), get_property(bus_svc, "PinnedModel")) == ('s "auto"', 's ""')
    assert http_states(bus_svc) == {"alpha": "active", "qwen2.5-7b": "asleep"}
