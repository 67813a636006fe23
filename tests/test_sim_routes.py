"""llmux-vllm-sim through HTTP: the vLLM 0.32 routes and shapes (reference/vllm-api.md §3.2)."""

from __future__ import annotations

import json
import math

import pytest

from sim_fixtures import SimProcess, mode_sim_factory, sim_cache, sim_factory  # noqa: F401


@pytest.fixture
def sim(sim_factory) -> SimProcess:  # noqa: F811
    return sim_factory("alpha")


@pytest.fixture
def any_sim(mode_sim_factory) -> SimProcess:  # noqa: F811
    """For the inference tests: once per way the simulator holds a model (SIM_MODES)."""
    return mode_sim_factory("alpha")


def sse_events(body: bytes) -> list[str]:
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    return [block[len("data: "):] for block in text.split("\n\n") if block]


def test_health_is_200_with_empty_body_and_stamped(sim):
    status, headers, body = sim.request("GET", "/health")
    assert (status, body) == (200, b"")
    assert headers["X-Sim-Model"] == "alpha"


CHAT = [{"role": "user", "content": "hi"}]
#: (what, method, path, body or raw bytes, status): every kind of error answer
ERROR_ANSWERS = [
    ("a model it does not serve (completion)", "POST", "/v1/completions", {"model": "beta", "prompt": "x"}, 404),
    ("a model it does not serve (chat)", "POST", "/v1/chat/completions", {"model": "beta", "messages": CHAT}, 404),
    ("a model it does not serve (stream)", "POST", "/v1/chat/completions",
     {"model": "beta", "messages": CHAT, "stream": True}, 404),
    ("a model it does not serve (embedding)", "POST", "/v1/embeddings", {"model": "beta", "input": "x"}, 404),
    ("an unknown route", "GET", "/v2/nothing", None, 404),
    ("a wrong method", "GET", "/v1/completions", None, 405),
    ("a body that is not JSON", "POST", "/v1/completions", b"{not json", 400),
    ("an invalid parameter", "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": -1}, 400),
]


@pytest.mark.parametrize("what,method,path,body,status", ERROR_ANSWERS, ids=[e[0] for e in ERROR_ANSWERS])
def test_every_error_answer_names_the_simulator_that_gave_it(sim, what, method, path, body, status):
    """A request sent to the wrong backend shows as that backend's 404: the
    stamp on errors is what lets the stress harness see the misrouting."""
    raw = body if isinstance(body, bytes) else None
    got, headers, _ = sim.request(method, path, None if raw else body, raw=raw)
    assert (got, headers.get("X-Sim-Model")) == (status, "alpha")


def test_an_engine_error_names_the_simulator_too(sim):
    assert sim.json("POST", "/sim/fault", {"kind": "engine_dead"})[0] == 200
    status, headers, _ = sim.request("POST", "/v1/completions", {"model": "alpha", "prompt": "x"})
    assert (status, headers.get("X-Sim-Model")) == (500, "alpha")


def test_version_models_load_ping(sim):
    assert sim.json("GET", "/version") == (200, {"version": "0.32.0"})
    status, models = sim.json("GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    (entry,) = models["data"]
    assert entry["id"] == "alpha" and entry["owned_by"] == "vllm"
    assert entry["root"] == "/models/alpha" and entry["max_model_len"] == 2048
    assert entry["permission"][0]["object"] == "model_permission"
    assert sim.json("GET", "/load") == (200, {"server_load": 0})
    assert sim.request("GET", "/ping")[0] == 200


def test_completion_is_deterministic_at_temperature_0_and_names_its_model(any_sim):
    body = {"model": "alpha", "prompt": "The capital of France is", "max_tokens": 7,
            "temperature": 0}
    status, headers, raw = any_sim.request("POST", "/v1/completions", body)
    first = json.loads(raw)
    assert status == 200 and headers["X-Sim-Model"] == "alpha"
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    assert first["model"] == "alpha" and first["system_fingerprint"] == "llmux-sim:alpha"
    choice = first["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"].strip()
    assert first["usage"]["completion_tokens"] == 7
    assert first["usage"]["total_tokens"] == first["usage"]["prompt_tokens"] + 7
    _, second = any_sim.json("POST", "/v1/completions", body)
    assert second["choices"][0]["text"] == choice["text"]
    _, other = any_sim.json("POST", "/v1/completions", {**body, "prompt": "Something else"})
    assert other["choices"][0]["text"] != choice["text"]


def test_completion_defaults_to_16_tokens_like_vllm(sim):
    _, data = sim.json("POST", "/v1/completions", {"prompt": "hi", "temperature": 0})
    assert data["usage"]["completion_tokens"] == 16
    assert data["choices"][0]["finish_reason"] == "length"


def test_chat_completion(any_sim):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0}
    status, data = any_sim.json("POST", "/v1/chat/completions", body)
    assert status == 200 and data["object"] == "chat.completion"
    msg = data["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].strip()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["system_fingerprint"] == "llmux-sim:alpha"
    assert any_sim.json("POST", "/v1/chat/completions", body)[1]["choices"][0]["message"] == msg


def test_streamed_completion_matches_the_plain_one(any_sim):
    body = {"prompt": "stream me", "max_tokens": 5, "temperature": 0}
    _, plain = any_sim.json("POST", "/v1/completions", body)
    status, headers, raw = any_sim.request(
        "POST", "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == "alpha" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_streamed_chat(any_sim):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    status, _, raw = any_sim.request("POST", "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert status == 200
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) == 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_embeddings_are_deterministic_unit_vectors(any_sim):
    body = {"model": "alpha", "input": ["one", "two"]}
    status, data = any_sim.json("POST", "/v1/embeddings", body)
    assert status == 200 and data["object"] == "list" and data["model"] == "alpha"
    vecs = [d["embedding"] for d in data["data"]]
    assert [len(v) for v in vecs] == [384, 384] and vecs[0] != vecs[1]
    assert math.isclose(sum(x * x for x in vecs[0]), 1.0, rel_tol=1e-4)
    assert any_sim.json("POST", "/v1/embeddings", body)[1]["data"][0]["embedding"] == vecs[0]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "wrong", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "wrong", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/embeddings", {"model": "wrong", "input": "x"}),
])
def test_unknown_model_gets_vllms_404_envelope(sim, path, body):
    status, data = sim.json("POST", path, body)
    assert status == 404
    assert data == {"error": {"message": "The model `wrong` does not exist. Valid aliases: alpha.",
                              "type": "NotFoundError", "param": "model", "code": 404}}


@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/completions", b'{"model": "alpha"}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 5000}'),
    ("/v1/chat/completions", b'{"model": "alpha"}'),
    ("/v1/chat/completions", b'{"messages": "hello"}'),
    ("/v1/embeddings", b'{"model": "alpha"}'),
])
def test_bad_request_gets_400_envelope_and_server_keeps_serving(sim, path, raw):
    status, _, body = sim.request("POST", path, raw=raw)
    assert status == 400, body
    err = json.loads(body)["error"]
    assert err["code"] == 400 and err["type"] == "Bad Request" and err["message"]
    assert sim.json("POST", "/v1/completions", {"prompt": "still there?", "max_tokens": 1})[0] == 200


#: (route, field, value, how many choices or vectors the answer has; 0: a 400 naming `field`)
TEXT_SHAPES = [
    ("/v1/completions", "prompt", "one two", 1),
    ("/v1/completions", "prompt", ["one", "two"], 2),
    ("/v1/completions", "prompt", [1, 2, 3], 1),
    ("/v1/completions", "prompt", [[1, 2], [3]], 0),
    ("/v1/completions", "prompt", [], 0),
    ("/v1/completions", "prompt", ["one", 2], 0),
    ("/v1/embeddings", "input", "one two", 1),
    ("/v1/embeddings", "input", ["one", "two"], 2),
    ("/v1/embeddings", "input", [1, 2, 3], 1),
    ("/v1/embeddings", "input", [[1, 2], [3]], 2),
    ("/v1/embeddings", "input", [], 0),
    ("/v1/embeddings", "input", {"text": "x"}, 0),
]


def test_prompt_and_input_shapes(sim):
    """A string, strings or token ids are served (one answer each); anything else is a 400."""
    for path, field, value, answers in TEXT_SHAPES:
        status, data = sim.json("POST", path, {field: value, "max_tokens": 1})
        case = f"{path} {field}={value!r}: {data}"
        if answers:
            assert status == 200, case
            assert len(data["choices" if "choices" in data else "data"]) == answers, case
        else:
            assert (status, data["error"]["param"]) == (400, field), case


def test_unknown_path_is_fastapis_404(sim):
    assert sim.json("GET", "/nope") == (404, {"detail": "Not Found"})


DEV_ROUTES = [("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
              ("POST", "/reset_prefix_cache"), ("POST", "/collective_rpc"),
              ("GET", "/server_info"), ("POST", "/pause")]


def test_dev_routes_are_404_without_dev_mode(sim_factory):  # noqa: F811
    plain = sim_factory("plain", dev_mode=False)
    for method, path in DEV_ROUTES:
        assert plain.json(method, path, {"method": "x"}) == (404, {"detail": "Not Found"}), path
    assert plain.request("GET", "/health")[0] == 200
    assert "SECURITY WARNING" not in plain.output


def test_dev_routes_exist_with_dev_mode(sim):
    assert "SECURITY WARNING: Development endpoints are enabled" in sim.output
    assert sim.json("GET", "/is_sleeping") == (200, {"is_sleeping": False})
    status, info = sim.json("GET", "/server_info")
    assert status == 200 and info["vllm_config"]["model"] == "/models/alpha"
    assert info["vllm_env"]["VLLM_SERVER_DEV_MODE"] == "1"


def test_metrics_are_prometheus_text(sim):
    status, headers, raw = sim.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'vllm:engine_sleep_state{engine="0",model_name="alpha",sleep_state="awake"} 1.0' in text
    assert 'vllm:num_requests_running{engine="0",model_name="alpha"} 0.0' in text
    assert 'vllm:num_requests_waiting{engine="0",model_name="alpha"} 0.0' in text


def test_collective_rpc_and_reset_prefix_cache_are_recorded(sim):
    for method in ("reload_weights", "suspend_nccl", "resume_nccl"):
        status, _, body = sim.request("POST", "/collective_rpc", {"method": method})
        assert (status, body) == (200, b""), method
    assert sim.json("POST", "/collective_rpc", {"method": "get_rank"}) == (200, {"results": [None]})
    status, data = sim.json("POST", "/collective_rpc", {"args": []})
    assert status == 400 and data["error"]["message"] == "Missing 'method' in request body"
    assert sim.json("POST", "/reset_prefix_cache") == (200, {"success": True})
    st = sim.state()
    assert [c["method"] for c in st["collective_rpc"]] == [
        "reload_weights", "suspend_nccl", "resume_nccl", "get_rank"]
    assert st["prefix_cache_resets"] == 1
    assert any(c["path"] == "/reset_prefix_cache" for c in st["calls"])


def test_every_request_is_logged_on_stdout(sim):
    sim.json("POST", "/v1/completions", {"prompt": "log me", "max_tokens": 1})
    sim.wait_for_line(r'"POST /v1/completions" 200')


def test_several_served_names(sim_factory):  # noqa: F811
    multi = sim_factory("multi", args=["--served-model-name", "m1", "m2"])
    ids = [m["id"] for m in multi.json("GET", "/v1/models")[1]["data"]]
    assert ids == ["m1", "m2"]
    _, data = multi.json("POST", "/v1/completions", {"model": "m2", "prompt": "x", "max_tokens": 1})
    assert data["model"] == "m2"
