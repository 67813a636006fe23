"""A real non-vLLM server behind llmux: llama-cpp-python's OpenAI-compatible server
(`engine: openai`) beside a real vLLM, through `llmuxd run`.

The llama.cpp models serve the GGUF file the real-vLLM SmolLM2 is converted from
(scripts/llamacpp-setup, scripts/real-vllm-setup), so each side of every switch is a real
server. llama-cpp-python has no /health (readiness comes from /v1/models) and no sleep
endpoints, so its evictions are process-level:

    llama       retain+freeze   SIGSTOP of its process while vLLM answers, SIGCONT back
    llama-stop  retain+stop     the server ends, the next request cold-starts it
    llama-cut   retain+stop     started without --interrupt_requests False (its default)
    chat        offload+keep_running (vLLM's own /sleep)

Answers are compared at temperature 0 before and after each eviction. CRIU of the same
server runs under the test systemd (tests/test_llamacpp_service.py). The tests run in
order on one daemon, like test_real_vllm.py's.
"""

from __future__ import annotations

import threading

import pytest

import llamacpp
import realvllm
from ports import free_port  # noqa: E402  (one source of ports per test run)
from test_real_vllm import PROMPT, Daemon, complete, is_sleeping, model_entry, tree_states, wait_until

pytestmark = [pytest.mark.real_vllm, pytest.mark.llamacpp]

_CACHE, _WHY = llamacpp.find_cache()
LLAMA_START_TIMEOUT = 120


def llama_entry(cache: llamacpp.LlamaCppCache, port: int, eviction: str) -> dict:
    return {"engine": "openai", "model_path": str(cache.gguf), "command": cache.command, "port": port,
            "eviction": eviction, "startup_timeout": LLAMA_START_TIMEOUT}


@pytest.fixture(scope="module")
def daemon(real_vllm_cache, tmp_path_factory):
    if _CACHE is None:
        pytest.skip(_WHY)
    ports = [free_port() for _ in range(4)]
    interrupting = dict(llama_entry(_CACHE, ports[3], "retain+stop"))
    interrupting["command"] = [a for a in _CACHE.command if a not in ("--interrupt_requests", "False")]
    config = {
        "policy": {"min_active": 0, "request_timeout": 400, "drain_timeout": 120},
        "models": {
            "llama": llama_entry(_CACHE, ports[0], "retain+freeze"),
            "llama-stop": llama_entry(_CACHE, ports[1], "retain+stop"),
            "chat": model_entry(real_vllm_cache, "chat", ports[2], "offload+keep_running"),
            "llama-cut": interrupting,
        },
    }
    d = Daemon(tmp_path_factory.mktemp("llmuxd-llamacpp"), config)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def seen() -> dict:
    return {}


def server_pid(daemon: Daemon, model: str) -> int | None:
    return realvllm.server_pid(daemon.backend_port(model))


def test_llama_cpp_answers_through_llmux_ready_without_health(daemon, seen):
    seen["llama"] = complete(daemon, "llama")
    assert seen["llama"].strip()
    # llama-cpp-python has no /health: llmux found it ready from /v1/models
    assert realvllm.http("GET", daemon.backend_url("llama") + "/health")[0] == 404
    chat = daemon.client().chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.content


def test_stream_from_llama_cpp_is_the_same_text(daemon, seen):
    chunks = daemon.client().completions.create(model="llama", prompt=PROMPT, max_tokens=16, temperature=0,
                                                stream=True)
    assert "".join(c.choices[0].text for c in chunks) == seen["llama"]


def test_switch_to_real_vllm_freezes_llama_cpp(daemon, seen):
    seen["chat"] = complete(daemon, "chat")
    states = tree_states(daemon, "llama")
    assert states == {"T"}, f"retain+freeze must stop the llama.cpp server, saw {states}"


def test_switch_back_thaws_llama_cpp_with_the_same_answer(daemon, seen):
    assert complete(daemon, "llama") == seen["llama"], "temperature 0 must give the same text after a thaw"
    assert "T" not in tree_states(daemon, "llama")
    assert is_sleeping(daemon, "chat"), "switching to llama must offload vLLM with its own /sleep"
    assert complete(daemon, "chat") == seen["chat"], "vLLM woke from its offload with another answer"


def test_retain_stop_ends_llama_cpp_and_a_request_cold_starts_it(daemon, seen):
    seen["llama-stop"] = complete(daemon, "llama-stop")
    first_pid = server_pid(daemon, "llama-stop")
    assert first_pid
    complete(daemon, "chat")
    wait_until(lambda: server_pid(daemon, "llama-stop") is None, "retain+stop to end the llama.cpp server")
    with pytest.raises(OSError):
        realvllm.http("GET", daemon.backend_url("llama-stop") + "/v1/models", timeout=5)
    assert complete(daemon, "llama-stop") == seen["llama-stop"]
    assert server_pid(daemon, "llama-stop") not in (None, first_pid)


def test_a_model_name_llmux_does_not_know_never_reaches_llama_cpp(daemon):
    """llama-cpp-python answers any name with its model; llmux answers 404 first."""
    status, body = realvllm.http("POST", daemon.url + "/v1/completions",
                                 {"model": "gpt-4o", "prompt": PROMPT, "max_tokens": 4})
    assert status == 404, body
    assert b"model_not_found" in body or b"does not exist" in body, body


COUNTING = "1, 2, 3, 4, 5, 6,"


def two_streams(daemon: Daemon, model: str) -> list[tuple[str, str | None]]:
    """Two streamed completions of one model through llmux, the second sent once the first
    has its first chunk: (text, finish_reason) of each."""
    results: list = [None, None]
    started = threading.Event()

    def stream(i: int) -> None:
        text, finish = [], None
        try:
            for chunk in daemon.client().completions.create(model=model, prompt=COUNTING, max_tokens=120,
                                                            temperature=0, stream=True):
                started.set()
                text.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
        finally:
            started.set()
            results[i] = ("".join(text), finish)

    first = threading.Thread(target=stream, args=(0,))
    first.start()
    assert started.wait(400)
    second = threading.Thread(target=stream, args=(1,))
    second.start()
    first.join(400)
    second.join(400)
    return results


def test_concurrent_streams_both_finish_with_interrupt_requests_off(daemon):
    """llama-cpp-python serves one request at a time; with --interrupt_requests False the
    second waits in the server, so neither client loses its answer."""
    (one, why_one), (two, why_two) = two_streams(daemon, "llama")
    assert why_one and why_two, (why_one, why_two)
    assert one == two and len(one) > 20


def test_by_default_llama_cpp_python_cuts_the_running_stream(daemon):
    """The negative control of the test above, and the reason docs/other-servers.md asks for
    --interrupt_requests False (or max_concurrency 1): the first stream ends unfinished."""
    (one, why_one), (two, why_two) = two_streams(daemon, "llama-cut")
    assert why_two and len(two) > 20
    assert why_one is None and len(one) < len(two), (one, why_one)
