"""Issue 25 against the real embedded daemon on `llmux-vllm-sim` backends: aliases,
llmux 0.7's `model-override` header, `GET /models` and HTTP metrics, 0.7's eviction
pairs, max_concurrency, idle_timeout, preload, and what an embedded daemon says
about CRIU.

Every wait is a bounded poll of the daemon's own state; nothing measures a duration.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import pytest

from daemon_process import DaemonProcess, http_json, sim_model, wait_until, write_config

JSON = {"Content-Type": "application/json"}


def chat(base: str, model: str, headers: dict | None = None, max_tokens: int = 1, timeout: float = 120):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": max_tokens}).encode()
    return http_json(base + "/v1/chat/completions", body, {**JSON, **(headers or {})}, timeout=timeout)


def stream(base: str, model: str, max_tokens: int) -> tuple[int, str]:
    """A streamed chat completion: (status, the whole SSE text)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": max_tokens, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers=JSON, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.status, resp.read().decode()


def scrape(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def health(d: DaemonProcess) -> dict:
    return http_json(d.base + "/health")[2]


# ---------------------------------------------------------------------------- names and routes


@pytest.fixture(scope="module")
def names_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    ledger = tmp / "gpu.json"
    models = {
        "alpha": {**sim_model("org/alpha", ledger, 1000), "aliases": ["gpt-4o-mini", "openai/gpt-4o"]},
        "beta": {**sim_model("org/beta", ledger, 1000), "eviction": "offload+stop"},  # a 0.7 pair
        "gamma": {**sim_model("org/gamma", ledger, 1000), "eviction": "discard+checkpoint"},
    }
    config = write_config(tmp, models, checkpoint={"images_dir": str(tmp / "images")})
    d = DaemonProcess(config, tmp / "llmuxd.log", bus="none").wait_ready()
    yield d
    assert d.stop() == 0, d.log()


def test_v1_models_lists_aliases_marked_as_such(names_daemon):
    _, _, listing = http_json(names_daemon.base + "/v1/models")
    entries = {m["id"]: m for m in listing["data"]}
    assert set(entries) == {"alpha", "beta", "gamma", "gpt-4o-mini", "openai/gpt-4o"}
    assert entries["gpt-4o-mini"]["llmux"] == {"alias_of": "alpha"}
    assert entries["gpt-4o-mini"]["parent"] == "alpha" and entries["alpha"]["parent"] is None
    assert entries["alpha"]["llmux"]["aliases"] == ["gpt-4o-mini", "openai/gpt-4o"]
    status, _, one = http_json(names_daemon.base + "/v1/models/openai/gpt-4o")
    assert status == 200 and one["llmux"] == {"alias_of": "alpha"}


def test_get_models_is_07s_alias_of_v1_models(names_daemon):
    status, _, old = http_json(names_daemon.base + "/models")
    assert status == 200
    assert [m["id"] for m in old["data"]] == [m["id"] for m in http_json(names_daemon.base + "/v1/models")[2]["data"]]


def test_an_alias_reaches_its_model_under_the_models_own_name(names_daemon):
    status, _, answer = chat(names_daemon.base, "gpt-4o-mini")
    assert status == 200, answer
    assert answer["model"] == "alpha"  # the backend serves only "alpha": the body was renamed for it
    text = scrape(names_daemon.base)
    assert sample(text, "llmux_requests_total", model="alpha", status="200") >= 1
    assert "gpt-4o-mini" not in text and "openai/gpt-4o" not in text  # metrics use the model's own name


@pytest.mark.parametrize("header", ["model-override", "X-LLMux-Model"])
def test_a_header_names_the_model_instead_of_the_body(names_daemon, header):
    status, _, answer = chat(names_daemon.base, "no-such-model", headers={header: "gpt-4o-mini"})
    assert status == 200, answer
    assert answer["model"] == "alpha"
    status, _, error = chat(names_daemon.base, "alpha", headers={header: "no-such-model"})
    assert status == 404 and "no-such-model" in error["error"]["message"]


def test_07s_http_metrics_are_exported(names_daemon):
    assert chat(names_daemon.base, "alpha")[0] == 200
    http_json(names_daemon.base + "/v1/models")
    text = scrape(names_daemon.base)
    labels = dict(method="POST", endpoint="/v1/chat/completions", status="200")
    assert sample(text, "llmux_http_requests_total", **labels) >= 1
    assert sample(text, "llmux_http_requests_duration_seconds_count", **labels) >= 1
    assert sample(text, "llmux_http_response_body_size_count", method="POST", endpoint="/v1/chat/completions") >= 1
    assert sample(text, "llmux_http_response_body_size_sum", method="GET", endpoint="/v1/models") > 0
    assert 'llmux_http_requests_pending{endpoint="/metrics",method="GET"} 1.0' in text  # this scrape itself
    assert sample(text, "llmux_http_requests_pending", method="POST", endpoint="/v1/chat/completions") == 0


def test_made_up_paths_do_not_become_labels(names_daemon):
    body = json.dumps({"model": "alpha"}).encode()
    http_json(names_daemon.base + "/v1/made-up-route-1234", body, JSON)
    http_json(names_daemon.base + "/nothing-here-5678")
    text = scrape(names_daemon.base)
    assert "1234" not in text and "5678" not in text
    assert sample(text, "llmux_http_requests_total", endpoint="/v1/{tail}") >= 1
    assert sample(text, "llmux_http_requests_total", endpoint="/{tail}", status="404") >= 1


def test_07s_offload_stop_pair_stops_the_process(names_daemon):
    assert chat(names_daemon.base, "beta")[0] == 200
    assert chat(names_daemon.base, "alpha")[0] == 200
    assert names_daemon.models()["beta"]["process_state"] == "stopped"
    assert chat(names_daemon.base, "beta")[0] == 200  # a cold start answers again


def test_embedded_daemon_says_in_one_line_why_it_cannot_criu(names_daemon):
    lines = [line for line in names_daemon.log().splitlines() if "needs llmuxd under systemd" in line]
    assert len(lines) == 1, names_daemon.log()[-3000:]
    assert "model 'gamma': 'discard+checkpoint' needs llmuxd under systemd" in lines[0]
    assert "systemctl enable --now llmux.socket llmuxd" in lines[0] and "'...+stop'" in lines[0]


# ---------------------------------------------------------------------------- max_concurrency


def test_max_concurrency_queues_the_rest_with_deadline_and_retry_after(tmp_path):
    ledger = tmp_path / "gpu.json"
    models = {"alpha": {**sim_model("org/alpha", ledger, 1000, LLMUX_SIM_TOKENS_PER_S="5"), "max_concurrency": 1}}
    config = write_config(tmp_path, models)
    data = config.read_text().replace("request_timeout: 60", "request_timeout: 3")
    config.write_text(data)
    d = DaemonProcess(config, tmp_path / "llmuxd.log", bus="none").wait_ready()
    try:
        assert chat(d.base, "alpha")[0] == 200  # awake
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=stream(d.base, "alpha", max_tokens=40)))
        worker.start()  # 40 tokens at 5/s, streamed: holds the one slot for about 8 s
        d.wait_for("the first request in flight", lambda m: m["alpha"]["in_flight"] == 1)
        second: dict = {}
        waiter = threading.Thread(target=lambda: second.update(r=chat(d.base, "alpha")))
        waiter.start()
        d.wait_for("the second request queued behind it", lambda m: m["alpha"]["queue_depth"] == 1)
        assert d.models()["alpha"]["in_flight"] == 1
        waiter.join(60)
        status, headers, error = second["r"]
        assert status == 504, error
        assert int(headers["Retry-After"]) >= 1
        worker.join(120)
        assert first["r"][0] == 200 and first["r"][1].rstrip().endswith("data: [DONE]")
        assert chat(d.base, "alpha")[0] == 200  # the slot came back
    finally:
        assert d.stop() == 0, d.log()


# ---------------------------------------------------------------------------- preload and idle_timeout


@pytest.fixture(scope="module")
def idle_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idle")
    ledger = tmp / "gpu.json"
    models = {
        "alpha": {**sim_model("org/alpha", ledger, 1000, LLMUX_SIM_TOKENS_PER_S="5"), "idle_timeout": 3},
        "beta": {**sim_model("org/beta", ledger, 1000), "gpu_group": "other"},
        "broken": {**sim_model("org/broken", ledger, 1000), "command": ["/bin/false"], "gpu_group": "other"},
    }
    config = write_config(tmp, models, preload=["broken", "alpha", "beta"], groups={"other": {}})
    d = DaemonProcess(config, tmp / "llmuxd.log", bus="none").wait_ready()
    yield d
    assert d.stop() == 0, d.log()


def test_preload_wakes_the_listed_models_and_reports_a_failure(idle_daemon):
    wait_until("preload done", lambda: all(not p.startswith(("pending", "starting"))
                                           for p in health(idle_daemon).get("preload", {"x": "pending"}).values()))
    preload = health(idle_daemon)["preload"]
    assert preload["broken"].startswith("failed: ") and "exited with status 1" in preload["broken"], preload
    assert preload["beta"] == "awake"
    assert preload["alpha"] in ("awake", "asleep")  # its idle_timeout may already have put it to sleep
    assert re.search(r"preload 1/3: 'broken' failed: ", idle_daemon.log())
    assert idle_daemon.models()["beta"]["state"] == "active"  # woken without a request
    assert idle_daemon.proc.poll() is None


def test_an_idle_model_is_put_to_sleep_and_a_busy_one_is_not(idle_daemon):
    d = idle_daemon
    answer: dict = {}
    worker = threading.Thread(target=lambda: answer.update(r=chat(d.base, "alpha", max_tokens=30)))
    worker.start()  # 30 tokens at 5/s: about 6 s in flight, longer than idle_timeout 3
    d.wait_for("alpha serving", lambda m: m["alpha"]["in_flight"] == 1)
    while worker.is_alive():
        m = d.models()["alpha"]
        if m["in_flight"]:
            assert m["state"] == "active" and m["idle_left_s"] is None, m
        worker.join(0.2)
    assert answer["r"][0] == 200
    d.wait_for("alpha counting down", lambda m: (m["alpha"]["idle_left_s"] or 99) <= 3)
    d.wait_for("alpha evicted for idleness", lambda m: m["alpha"]["process_state"] == "sleeping:offload+keep_running")
    assert re.search(r"model 'alpha' idle for \d+s \(idle_timeout 3s\): putting it to sleep with "
                     r"offload\+keep_running", d.log()), d.log()[-3000:]
    assert d.models()["beta"]["state"] == "active"  # no idle_timeout: never evicted for idleness
