"""llmux 0.7 users move over: `llmuxd run` on simulator backends with a config
that uses 0.7's metrics_port (and a key llmux does not know), seen from HTTP
the way a 0.7 user looks: /v1/models says where each model's process is
(0.7's process_state), /metrics on the metrics port carries 0.7's metric
names, and the daemon's log names the key it ignored. The scenarios share one
daemon and run in file order (the metrics count the switches made before)."""

from __future__ import annotations

import json
import re
import socket
import urllib.request

import pytest

from daemon_process import DaemonProcess, http_json, sim_model, write_config
from sim_fixtures import free_port


def post(base: str, model: str) -> int:
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1}).encode()
    status, _, _ = http_json(base + "/v1/completions", body, {"Content-Type": "application/json"}, timeout=60)
    return status


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return resp.read().decode()


def value(text: str, sample: str) -> float:
    """The value of the exposition line that starts with `sample` (0 when absent)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compat")
    ledger = tmp / "gpu.json"
    models = {
        "alpha": sim_model("org/alpha", ledger, 1000),
        "beta": {**sim_model("org/beta", ledger, 1000), "eviction": "retain+stop"},
        # its "vLLM" exits at once: every start fails
        "broken": {**sim_model("org/broken", ledger, 1000), "command": ["/bin/false"]},
    }
    metrics_port = free_port()
    config = write_config(tmp, models, metrics_port=metrics_port, max_sleeping=2)
    d = DaemonProcess(config, tmp / "llmuxd.log", bus="none").wait_ready()
    d.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    d.config_path = config
    yield d
    assert d.stop() == 0, d.log()


def process_states(d: DaemonProcess) -> dict[str, str]:
    return {name: m["process_state"] for name, m in d.models().items()}


def test_the_ignored_key_is_logged_at_start(daemon):
    assert re.search(rf"config: {re.escape(str(daemon.config_path))}: max_sleeping: not supported, ignored",
                     daemon.log()), daemon.log()


def test_v1_models_shows_where_each_process_is(daemon):
    assert process_states(daemon) == {"alpha": "not_started", "beta": "not_started", "broken": "not_started"}
    assert post(daemon.base, "alpha") == 200
    assert process_states(daemon)["alpha"] == "running"
    assert post(daemon.base, "beta") == 200
    assert process_states(daemon) == {"alpha": "sleeping:offload+keep_running", "beta": "running",
                                      "broken": "not_started"}
    assert post(daemon.base, "alpha") == 200  # beta's eviction is retain+stop
    assert process_states(daemon) == {"alpha": "running", "beta": "stopped", "broken": "not_started"}
    assert post(daemon.base, "broken") == 502
    models = daemon.models()
    assert models["broken"]["process_state"] == "failed"
    assert models["broken"]["last_error"] == "start: backend exited with status 1 before it became ready", models
    assert models["alpha"]["process_state"] == "sleeping:offload+keep_running"  # evicted for the failed switch


def test_metrics_port_serves_07s_metric_names(daemon):
    if process_states(daemon)["broken"] != "failed":
        pytest.fail("runs after test_v1_models_shows_where_each_process_is, whose switches it counts")
    text = scrape(daemon.metrics_url)
    assert value(text, 'llmux_switches_total{from="",to="alpha"}') == 1  # 0.7: from "" on a cold start
    assert value(text, 'llmux_switches_total{from="alpha",to="beta"}') == 1
    assert value(text, 'llmux_switches_total{from="beta",to="alpha"}') == 1
    assert value(text, 'llmux_switch_total_seconds_count{from="alpha",to="beta"}') == 1
    assert value(text, 'llmux_switch_failures_total{to="broken"}') == 1
    assert 'llmux_in_flight{model="alpha"} 0.0' in text
    # 0.7's {model, waited} and our {model, status} are one counter: both sums hold
    assert value(text, 'llmux_requests_total{key="",model="alpha",status="200",') == 2
    assert value(text, 'llmux_requests_total{key="",model="alpha",status="200",waited="true"}') == 2  # each woke alpha
    assert value(text, 'llmux_requests_total{key="",model="broken",status="502",waited="true"}') == 1
    main = scrape(daemon.base + "/metrics")  # the listen address keeps serving them too
    assert value(main, "llmux_switches_total{") == value(text, "llmux_switches_total{") == 3


def test_metrics_port_serves_only_metrics(daemon):
    status, _, body = http_json(daemon.metrics_url.replace("/metrics", "/v1/models"))
    assert status == 404
    assert "it serves GET /metrics" in body["error"]["message"]
    assert re.search(rf"serving /metrics on 127\.0\.0\.1:{daemon.metrics_url.split(':')[2].split('/')[0]} "
                     r"\(metrics_port\)", daemon.log())


def test_a_busy_metrics_port_stops_the_start_and_says_which_key(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        config = write_config(tmp_path, {"alpha": sim_model("org/alpha", tmp_path / "gpu.json", 1000)},
                              metrics_port=taken.getsockname()[1])
        d = DaemonProcess(config, tmp_path / "llmuxd.log", bus="none")
        assert d.wait_exit() == 1
        assert re.search(r"cannot listen on 127\.0\.0\.1:\d+: Address already in use; set another metrics_port, "
                         r"or null to turn it off", d.log()), d.log()
    finally:
        taken.close()


@pytest.mark.parametrize("listen,address", [
    ("127.0.0.1:3000", "127.0.0.1:9090"),
    ("0.0.0.0:3000", "0.0.0.0:9090"),  # listen says "everywhere": so does the metrics port
    ("[::1]:3000", "[::1]:9090"),
    ("unix:/run/llmux/llmux.sock", "127.0.0.1:9090"),
])
def test_the_metrics_port_binds_the_host_of_listen(listen, address):
    from llmuxd.http.listen import beside

    assert beside(listen, 9090) == address
