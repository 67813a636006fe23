"""End to end: `llmuxd run` as a real process on `llmux-vllm-sim` backends,
driven by the official `openai` client (sync and async, streaming and not).

One daemon serves most tests (module fixture); tests that need their own
(socket activation, pinning in-process) start one. Waits are bounded by
generous timeouts and event-like polls of the daemon's own state; nothing
asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from daemon_process import SIM, WAIT, DaemonProcess, daemon_env, http_json, sim_model, write_config
from llmuxd.sim.ledger import GpuLedger

pytestmark = pytest.mark.skipif(not os.path.exists(SIM), reason="llmux-vllm-sim not installed in this venv")


class Daemon(DaemonProcess):
    """`llmuxd run` in a subprocess, with openai clients; stop() reports the SIGTERM exit."""

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=WAIT, **kw)

    def aclient(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=WAIT, **kw)


def backend_pids(daemon_pid: int) -> list[int]:
    """Processes whose parent is the daemon (its backends)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == daemon_pid:
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def llmux(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    ledger = tmp / "gpu.json"
    models = {
        "alpha": sim_model("org/alpha-7b", ledger, 30000),
        "beta": sim_model("org/beta-7b", ledger, 30000, LLMUX_SIM_WAKE_TIME="0.1"),
        "gamma": sim_model("org/gamma-70b", ledger, 60000),
    }
    daemon = Daemon(write_config(tmp, models), tmp / "llmuxd.log").wait_ready()
    daemon.ledger = ledger
    yield daemon
    pid = daemon.proc.pid
    children = backend_pids(pid)
    assert daemon.stop() == 0, daemon.log()
    assert "stopped" in daemon.log()
    alive = [p for p in children if Path(f"/proc/{p}").exists()
             and "llmux-vllm-sim" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert alive == [], "SIGTERM stops the backends too"


# -- answers come from the model asked for -----------------------------------


def test_alternating_models_sync(llmux):
    client = llmux.client()
    for model in ["alpha", "beta"] * 4:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.model == model
        assert reply.choices[0].message.content


def test_alternating_models_sync_streaming(llmux):
    client = llmux.client()
    for model in ["beta", "alpha"] * 3:
        with client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        ) as stream:
            chunks = list(stream)
        assert chunks and {c.model for c in chunks} == {model}


async def test_alternating_models_async_streaming(llmux):
    client = llmux.aclient()
    for model in ["beta", "alpha"] * 3:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert chunks and {c.model for c in chunks} == {model}
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
    await client.close()


async def test_completions_and_embeddings_route_by_model(llmux):
    client = llmux.aclient()
    done = await client.completions.create(model="alpha", prompt="The capital of France is", max_tokens=2)
    assert done.model == "alpha"
    emb = await client.embeddings.create(model="beta", input=["one", "two"])
    assert emb.model == "beta" and len(emb.data) == 2
    await client.close()


# -- streams and switches -----------------------------------------------------


async def test_stream_on_a_survives_a_request_for_b(llmux):
    client = llmux.aclient()
    # make alpha the active model first
    await client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    stream = await client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "long"}], max_tokens=60, stream=True
    )
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        break  # the stream is running
    b_done = {}

    async def ask_b():
        reply = await client.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "b"}], max_tokens=1
        )
        b_done["at"] = time.monotonic()
        b_done["model"] = reply.model

    b_task = asyncio.create_task(ask_b())
    await asyncio.to_thread(llmux.wait_for, "beta queued", lambda m: m["beta"]["queue_depth"] >= 1)
    async for chunk in stream:
        chunks.append(chunk)
    a_finished = time.monotonic()
    await asyncio.wait_for(b_task, WAIT)
    assert {c.model for c in chunks} == {"alpha"}
    assert chunks[-1].choices[0].finish_reason == "length", "A's stream ran to its end"
    assert b_done["model"] == "beta"
    assert b_done["at"] >= a_finished, "B was served only after A's stream ended"
    await client.close()


async def test_aborted_stream_releases_its_lease(llmux):
    client = llmux.aclient()
    stream = await client.chat.completions.create(
        model="gamma", messages=[{"role": "user", "content": "long"}], max_tokens=2000, stream=True
    )
    async for _ in stream:
        break
    assert llmux.models()["gamma"]["in_flight"] == 1
    await stream.close()  # the client gives up mid-stream (2000 tokens would take minutes)
    await asyncio.to_thread(llmux.wait_for, "gamma lease back", lambda m: m["gamma"]["in_flight"] == 0)
    reply = await client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "next"}], max_tokens=1
    )
    assert reply.model == "alpha"
    await client.close()


# -- errors a client sees, and the daemon keeps serving ------------------------


def test_unknown_model_is_404_naming_known_models(llmux):
    with pytest.raises(openai.NotFoundError) as err:
        llmux.client().chat.completions.create(model="delta", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert "known models: alpha, beta, gamma" in err.value.message
    assert err.value.body["param"] == "model"


@pytest.mark.parametrize(
    "raw,words",
    [(b'{"model": "alpha", "messages": [', "not valid JSON"), (b'{"messages": []}', 'no "model" field'),
     (b'{"model": ["alpha"]}', "must be a non-empty string")],
)
def test_malformed_bodies_are_400(llmux, raw, words):
    status, _, body = http_json(llmux.base + "/v1/chat/completions", raw, {"Content-Type": "application/json"})
    assert status == 400
    assert words in body["error"]["message"] and body["error"]["code"] == 400


def test_body_over_limit_is_413(llmux):
    with pytest.raises(openai.APIStatusError) as err:
        llmux.client().chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}]
        )
    assert err.value.status_code == 413
    assert "max_body_bytes" in err.value.message
    assert llmux.client().models.list().data, "still serving"


async def test_queue_full_is_429_with_retry_after(llmux):
    client = llmux.aclient()
    await client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    stream = await client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hold"}], max_tokens=2000, stream=True
    )
    async for _ in stream:
        break
    waiting = [asyncio.create_task(client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "q"}], max_tokens=1)) for _ in range(2)]
    await asyncio.to_thread(llmux.wait_for, "two queued for beta", lambda m: m["beta"]["queue_depth"] == 2)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "q"}], max_tokens=1)
    assert err.value.status_code == 429
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert "queued" in err.value.message
    await stream.close()  # let beta have the GPU
    replies = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)
    assert [r.model for r in replies] == ["beta", "beta"]
    await client.close()


def test_wake_failure_is_502_and_next_request_recovers(llmux):
    client = llmux.client()
    ask = lambda model: client.chat.completions.create(  # noqa: E731
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert ask("gamma").model == "gamma"
    assert ask("alpha").model == "alpha"  # gamma sleeps (weights offloaded, GPU freed)
    tenant = GpuLedger(str(llmux.ledger))
    tenant.reserve(40000, model="someone-else")  # another GPU user appears
    try:
        with pytest.raises(openai.APIStatusError) as err:
            ask("gamma")
        assert err.value.status_code == 502
        assert "gamma" in err.value.message
    finally:
        tenant.release()
    assert ask("gamma").model == "gamma", "the next request recovers (cold start)"
    assert ask("beta").model == "beta"


def test_metrics_count_switches_and_requests(llmux):
    def scrape() -> str:
        with urllib.request.urlopen(llmux.base + "/metrics", timeout=30) as resp:
            return resp.read().decode()

    def value(text: str, prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    client = llmux.client()
    before = scrape()
    for model in ("alpha", "beta", "alpha"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    after = scrape()
    ok = 'llmux_requests_total{key="",model="%s",status="200",'  # waited="true" and "false"
    assert value(after, ok % "alpha") - value(before, ok % "alpha") == 2
    assert value(after, ok % "beta") - value(before, ok % "beta") == 1
    switches = 'llmux_switch_total{from="beta",result="ok",to="alpha"}'
    assert value(after, switches) - value(before, switches) >= 1
    assert value(after, 'llmux_active_model_info{model="alpha"}') == 1
    assert value(after, 'llmux_switch_duration_seconds_count') > value(before, 'llmux_switch_duration_seconds_count')
    assert "switch beta -> alpha ok in" in llmux.log(), "one log line per switch"


# -- socket activation -------------------------------------------------------

ACTIVATE = (
    "import os, sys; fd = int(sys.argv[1]); fd != 3 and (os.dup2(fd, 3), os.close(fd)); "
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='http'); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def test_socket_activation_serves_on_the_passed_socket(tmp_path):
    ledger = tmp_path / "gpu.json"
    config = write_config(tmp_path, {"alpha": sim_model("org/alpha", ledger, 1000)})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    daemon = Daemon(config, tmp_path / "llmuxd.log", listen=f"127.0.0.1:{port}",
                    argv_prefix=[sys.executable, "-c", ACTIVATE, str(fd)], pass_fds=(fd,))
    listener.close()  # systemd keeps its copy; ours is no longer needed
    try:
        daemon.wait_ready()
        reply = daemon.client().chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert reply.model == "alpha"
        assert "socket activation: serving on http=127.0.0.1:%d" % port in daemon.log()
        configured = yaml.safe_load(config.read_text())["listen"]
        with pytest.raises(OSError):
            socket.create_connection(tuple(configured.rsplit(":", 1)), timeout=5).close()
    finally:
        assert daemon.stop() == 0, daemon.log()


# -- manual mode, in process (the bus is the way to pin in production) --------


async def test_pinned_model_makes_others_503_with_its_name(tmp_path, monkeypatch):
    from llmuxd.config import load_config
    from llmuxd.daemon.embedded import EmbeddedDaemon

    for name in ("PATH", "PYTHONPATH"):
        monkeypatch.setenv(name, daemon_env()[name])
    ledger = tmp_path / "gpu.json"
    path = write_config(tmp_path, {"alpha": sim_model("org/alpha", ledger, 1000),
                                   "beta": sim_model("org/beta", ledger, 1000)})
    daemon = EmbeddedDaemon(load_config(str(path)), listen="127.0.0.1:0")
    await daemon.start()
    try:
        base = f"http://{daemon.core.addresses[0]}/v1"
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=WAIT)
        await daemon.core.switcher.pin("alpha")
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503
        assert "pinned to 'alpha'" in err.value.message
        assert int(err.value.response.headers["Retry-After"]) >= 1
        reply = await client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert reply.model == "alpha"
        await daemon.core.switcher.unpin()
        reply = await client.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert reply.model == "beta"
        await client.close()
    finally:
        await daemon.stop()


def test_declared_50mb_body_is_refused_before_it_is_sent(llmux):
    host, port = llmux.listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmux\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 52428800\r\nExpect: 100-continue\r\n\r\n")
        reply = conn.makefile("rb")
        status = reply.readline().decode()
        headers = {}
        while (line := reply.readline().decode().strip()):
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        body = json.loads(reply.read(int(headers["content-length"])))
    assert status.startswith("HTTP/1.1 413"), status
    assert "max_body_bytes" in body["error"]["message"]


def test_warmup_starts_infers_and_sleeps_every_model(tmp_path):
    ledger = tmp_path / "gpu.json"
    config = write_config(tmp_path, {"alpha": sim_model("org/alpha", ledger, 1000),
                                     "beta": sim_model("org/beta", ledger, 1000)}, warmup=True)
    daemon = Daemon(config, tmp_path / "llmuxd.log")
    try:
        daemon.wait_ready()
        states = {name: m["state"] for name, m in daemon.models().items()}
        assert "active" not in states.values(), states
        log = daemon.log()
        assert "warm-up: alpha ready and asleep" in log and "warm-up: beta ready and asleep" in log
        reply = daemon.client().chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert reply.model == "beta"
    finally:
        assert daemon.stop() == 0, daemon.log()
