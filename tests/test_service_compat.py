"""llmux 0.7 behaviours of the system service, under the real test systemd
(tests/sysd) and its system bus, driven with busctl and llmuxctl as an
operator would: a forced switch moves the pin (0.7's /control/switch), a plain
one while pinned says how to force, GetStatus and llmuxctl status show each
model's process_state, metrics_port serves 0.7's metric names, and the
journal names the config keys llmux ignored.

The scenarios run in file order on one daemon (module fixture `compat_svc`).
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import yaml

from sysd.helpers import free_port, http
from test_service import BUS_NAME, MANAGER, boot_from_tree, wait_for
from test_service_bus import busctl, get_property, llmuxctl, ctl_status as status

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

PINNED = "io.llmux.LLMux1.Error.ModelPinned"


@pytest.fixture(scope="module")
def compat_svc():
    svc = boot_from_tree()
    try:
        config = svc.host_path(svc.config_file)
        data = yaml.safe_load(config.read_text())
        svc.metrics_port = free_port()
        data.update(metrics_port=svc.metrics_port, max_sleeping=2)  # 0.7 keys: one served, one ignored
        config.write_text(yaml.safe_dump(data))
        svc.write_model("alpha")
        svc.write_model("beta", eviction="retain+stop")
        svc.enable_now()
        yield svc
    finally:
        svc.shut_down()


def pin(svc) -> tuple[str, str]:
    return get_property(svc, "Mode"), get_property(svc, "PinnedModel")


def test_the_ignored_key_is_in_the_journal(compat_svc):
    journal = compat_svc.journal("-u", "llmuxd.service")
    assert f"config: {compat_svc.config_file}: max_sleeping: not supported, ignored" in journal, journal[-3000:]


def test_status_shows_not_started_models(compat_svc):
    assert {m: s["process_state"] for m, s in status(compat_svc)["models"].items()} == {
        "alpha": "not_started", "beta": "not_started"}


def test_plain_switch_while_pinned_fails_and_says_how_to_force(compat_svc):
    result = llmuxctl(compat_svc, "pin", "alpha")
    assert result.returncode == 0, result.stderr
    assert pin(compat_svc) == ('s "manual"', 's "alpha"')
    result = llmuxctl(compat_svc, "--json", "switch", "beta")
    assert result.returncode == 1
    error = json.loads(result.stdout)
    assert error["error"] == PINNED
    assert error["message"] == (
        "llmux is in manual mode, pinned to 'alpha'; 'beta' is not served until unpinned; to move the pin to it "
        "and switch, force it: llmuxctl switch --force beta (bus: SwitchWithOptions with force=true)")
    result = busctl(compat_svc, "call", BUS_NAME, *MANAGER, "Switch", "s", "beta")
    assert result.returncode == 1 and "llmuxctl switch --force beta" in result.stderr, result.stderr
    assert pin(compat_svc) == ('s "manual"', 's "alpha"')
    assert get_property(compat_svc, "ActiveModels") == 'as 1 "alpha"'


def test_llmuxctl_switch_force_moves_the_pin_and_switches(compat_svc):
    result = llmuxctl(compat_svc, "switch", "--force", "beta")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"beta is active in \d+(\.\d)?s", result.stdout.splitlines()[-1]), result.stdout
    assert pin(compat_svc) == ('s "manual"', 's "beta"')
    assert get_property(compat_svc, "ActiveModels") == 'as 1 "beta"'
    assert compat_svc.request("beta")[0] == 200
    status_code, body = compat_svc.request("alpha")
    assert status_code == 503 and "pinned to 'beta'" in json.dumps(body)
    models = status(compat_svc)["models"]
    assert (models["alpha"]["process_state"], models["beta"]["process_state"]) == (
        "sleeping:offload+keep_running", "running")


def test_busctl_switch_with_options_force(compat_svc):
    result = busctl(compat_svc, "call", BUS_NAME, *MANAGER, "SwitchWithOptions", "sa{sv}", "alpha", "2",
                    "force", "b", "true", "wait", "b", "true")
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert pin(compat_svc) == ('s "manual"', 's "alpha"')
    result = busctl(compat_svc, "--json=short", "call", BUS_NAME, *MANAGER, "GetStatus")
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)["data"][0]["models"]["data"]
    assert {m: v["process_state"]["data"] for m, v in models.items()} == {"alpha": "running", "beta": "stopped"}
    result = busctl(compat_svc, "get-property", BUS_NAME, "/io/llmux/LLMux1/model/beta",
                    "io.llmux.LLMux1.Model", "ProcessState")
    assert result.stdout.strip() == 's "stopped"', result.stderr
    _, body = http("GET", f"http://127.0.0.1:{compat_svc.port}/v1/models", timeout=60)
    assert {m["id"]: m["llmux"]["process_state"] for m in body["data"]} == {"alpha": "running", "beta": "stopped"}
    assert llmuxctl(compat_svc, "unpin").returncode == 0


def test_metrics_port_serves_07s_names_in_system_mode(compat_svc):
    url = f"http://127.0.0.1:{compat_svc.metrics_port}/metrics"
    text = wait_for(lambda: urllib.request.urlopen(url, timeout=30).read().decode(), "metrics_port answers")
    switches = {tuple(m): float(v) for *m, v in
                re.findall(r'^llmux_switches_total\{from="([^"]*)",to="([^"]*)"\} (\S+)$', text, re.M)}
    assert switches == {("", "alpha"): 1.0, ("alpha", "beta"): 1.0, ("beta", "alpha"): 1.0}, text
    assert re.search(r'^llmux_switch_total_seconds_count\{from="alpha",to="beta"\} 1\.0$', text, re.M)
    assert re.search(r'^llmux_in_flight\{model="beta"\} 0\.0$', text, re.M)
    assert re.search(r'^llmux_requests_total\{key="",model="alpha",status="503",waited="false"\} 1\.0$', text, re.M)
