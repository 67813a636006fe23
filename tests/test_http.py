"""The front end against a fake switcher and a fake backend (no processes).

What a client sees: OpenAI error envelopes with the right status and
Retry-After, answers relayed from the right backend, SSE passed through as it
is produced, and leases released however a request ends.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llmuxd.config import Config
from llmuxd.errors import ModelPinned, QueueFull, SwitchFailed, SwitchTimeout
from llmuxd.http import FrontEnd, HttpServer, parse_listen
from llmuxd.http.proxy import Upstream
from llmuxd.metrics import Metrics
from llmuxd.priority import DEFAULT_PRIORITY

from ports import free_port

WAIT = 30  # generous bound for event waits; never a timing assertion


# -- fakes ---------------------------------------------------------------------


class FakeLease:
    def __init__(self, switcher: "FakeSwitcher", model: str):
        self.model = model
        self.endpoint = switcher.endpoints[model]
        self._switcher = switcher
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._switcher.in_flight[self.model] -= 1
            self._switcher.released.set()


@dataclass
class FakeSwitcher:
    """acquire() hands out leases on fixed endpoints, or raises a set error."""

    endpoints: dict
    fail_with: dict = field(default_factory=dict)
    in_flight: dict = field(default_factory=dict)
    acquired: list = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    estimate: float = 7.0

    async def acquire(self, model: str, timeout: float | None = None, *, priority=DEFAULT_PRIORITY) -> FakeLease:
        if model in self.fail_with:
            raise self.fail_with[model]
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        self.acquired.append((model, timeout))
        return FakeLease(self, model)

    def wait_estimate(self, model: str) -> float:
        return self.estimate

    def status(self):
        models = {
            name: SimpleNamespace(
                state="ready" if name == "alpha" else "sleeping",
                eviction="offload+keep_running",
                in_flight=self.in_flight.get(name, 0),
                queue_depth=0,
            )
            for name in self.endpoints
        }
        return SimpleNamespace(
            mode="auto", pinned=None, state="active:alpha", active_models=["alpha"], models=models
        )

    def leases_out(self) -> int:
        return sum(self.in_flight.values())


class FakeBackend:
    """An aiohttp server standing in for one vLLM: it answers as `name`."""

    def __init__(self, name: str):
        self.name = name
        self.go_on = asyncio.Event()  # releases the second SSE chunk
        self.first_sent = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.seen_headers: dict = {}
        self.seen_bodies: list[bytes] = []
        self.connections: set = set()  # client (llmux) ends of the connections requests came on
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/die-before", self.die_before)
        app.router.add_post("/v1/die-midstream", self.die_midstream)
        app.router.add_post("/v1/firehose", self.firehose)
        app.router.add_post("/v1/bad-params", self.bad_params)
        app.router.add_post("/v1/endless", self.endless)
        app.router.add_post("/v1/silent", self.silent)
        self.server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.seen_bodies.append(await request.read())
        body = await request.json()
        self.seen_headers = dict(request.headers)
        self.connections.add(request.transport.get_extra_info("peername"))
        if not body.get("stream"):
            return web.json_response(
                {"object": "chat.completion", "model": self.name, "echo": body},
                headers={"X-Sim-Model": self.name},
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b'data: {"model": "%s", "n": 1}\n\n' % self.name.encode())
            self.first_sent.set()
            await self.go_on.wait()
            await resp.write(b'data: {"model": "%s", "n": 2}\n\n' % self.name.encode())
            if body.get("forever"):  # until the proxy drops us (aiohttp 3.8 only notices on write)
                for _ in range(WAIT * 100):
                    await asyncio.sleep(0.01)
                    await resp.write(b": keep-alive\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionError):
            self.client_gone.set()
            raise
        return resp

    async def die_before(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        request.transport.abort()  # never answers; the connection is gone
        raise ConnectionResetError("backend died")

    async def die_midstream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        request.transport.abort()
        return resp

    async def firehose(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"data: " + b"x" * 65536 + b"\n\n")
        except (asyncio.CancelledError, ConnectionError, RuntimeError):
            self.client_gone.set()
            raise

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """An SSE stream that never finishes; each event goes out in two writes
        (so a stream can be caught in the middle of an event)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = 0
        while True:
            n += 1
            await resp.write(b'data: {"model": "%s", ' % self.name.encode())
            await asyncio.sleep(0.02)
            await resp.write(b'"n": %d}\n\n' % n)
            self.first_sent.set()
            await asyncio.sleep(0.01)

    async def silent(self, request: web.Request) -> web.StreamResponse:
        """Says nothing (with "stream": true, after a first SSE event) until
        the proxy drops the connection; polls for that, since aiohttp 3.8
        does not cancel a handler whose client went away."""
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if body.get("stream"):
            await resp.prepare(request)
            await resp.write(b'data: {"n": 1}\n\n')
        try:
            for _ in range(WAIT * 100):
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass
        self.client_gone.set()
        return resp

    async def bad_params(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "max_tokens too big", "type": "BadRequestError", "param": None, "code": 400}},
            status=400,
        )


def make_config(**extra) -> Config:
    data = {
        "models": {"alpha": {"model_path": "/models/alpha"}, "beta": {"model_path": "/models/beta"}},
        "max_body_bytes": 4096,
        "policy": {"request_timeout": 30},
    }
    data.update(extra)
    return Config.from_dict(data)


class Client:
    """requests against the front end served by the real HttpServer (so the
    real connection handling, disconnects included, is what is tested)"""

    def __init__(self, base: str):
        self.base = base
        self.session = aiohttp.ClientSession()

    async def post(self, path: str, **kw) -> aiohttp.ClientResponse:
        return await self.session.post(self.base + path, **kw)

    async def get(self, path: str, **kw) -> aiohttp.ClientResponse:
        return await self.session.get(self.base + path, **kw)

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def rig():
    alpha, beta = FakeBackend("alpha"), FakeBackend("beta")
    await alpha.server.start_server()
    await beta.server.start_server()
    switcher = FakeSwitcher({"alpha": alpha.url, "beta": beta.url})
    metrics = Metrics()
    front = FrontEnd(make_config(), switcher, metrics)
    server = HttpServer(front.make_app(), listen="127.0.0.1:0")
    await server.start()
    client = Client(f"http://{server.addresses[0]}")
    yield SimpleNamespace(client=client, switcher=switcher, alpha=alpha, beta=beta, front=front, metrics=metrics)
    alpha.go_on.set()
    beta.go_on.set()
    await client.close()
    await server.stop()
    await alpha.server.close()
    await beta.server.close()


# -- the request's way ---------------------------------------------------------


async def test_answer_comes_from_the_named_model(rig):
    for model in ("alpha", "beta", "alpha"):
        resp = await rig.client.post("/v1/chat/completions", json={"model": model, "messages": []})
        assert resp.status == 200
        body = await resp.json()
        assert body["model"] == model
        assert resp.headers["X-Sim-Model"] == model
        assert resp.headers["X-LLMux-Model"] == model
    assert [m for m, _ in rig.switcher.acquired] == ["alpha", "beta", "alpha"]
    assert all(t == 30 for _, t in rig.switcher.acquired), "waits are bounded by request_timeout"
    assert rig.switcher.leases_out() == 0


async def test_header_names_the_model_over_the_body(rig):
    resp = await rig.client.post(
        "/v1/chat/completions", json={"model": "alpha"}, headers={"X-LLMux-Model": "beta"}
    )
    assert (await resp.json())["model"] == "beta"


async def test_request_body_and_query_reach_the_backend_unchanged(rig):
    payload = {"model": "alpha", "messages": [{"role": "user", "content": "héllo"}], "n": 1}
    resp = await rig.client.post(
        "/v1/chat/completions", json=payload, headers={"Authorization": "Bearer sk-test"}
    )
    assert (await resp.json())["echo"] == payload
    assert rig.alpha.seen_headers["Authorization"] == "Bearer sk-test"


async def test_body_arriving_after_its_headers_reaches_the_backend_whole(rig):
    host, port = rig.client.base.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 1500}]}).encode()
    for declared in (f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked"):
        if declared.startswith(b"Content-Length"):
            parts = [body[:40], body[40:900], body[900:]]
        else:
            parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:40], body[40:900], body[900:])] + [b"0\r\n\r\n"]
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + declared + b"\r\nConnection: close\r\n\r\n")
        for part in parts:  # the body trickles in after the headers, in pieces
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        answer = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        assert rig.alpha.seen_bodies[-1] == body, declared


async def test_backend_connections_are_reused(rig):
    """Requests share the pooled connections to a backend instead of opening one each."""
    for _ in range(10):
        resp = await rig.client.post("/v1/chat/completions", json={"model": "alpha"})
        assert resp.status == 200
        await resp.read()
    assert len(rig.alpha.connections) == 1
    for _ in range(3):  # bursts of 8 at once need at most 8 connections, and keep them
        answers = await asyncio.gather(*(rig.client.post("/v1/chat/completions", json={"model": "alpha"})
                                         for _ in range(8)))
        assert [a.status for a in answers] == [200] * 8
        await asyncio.gather(*(a.read() for a in answers))
    assert len(rig.alpha.connections) <= 8


async def test_backend_errors_pass_through_as_the_backend_wrote_them(rig):
    resp = await rig.client.post("/v1/bad-params", json={"model": "alpha"})
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "max_tokens too big"


# -- errors in OpenAI's envelope ----------------------------------------------

BAD_BODIES = [
    # (what, raw body, status, words the message must contain); code: the status, or
    # OpenAI's model_not_found for a model that is not served (the same answer as one a key may not use)
    ("invalid JSON", b'{"model": "alpha",', 400, "not valid JSON"),
    ("missing model", b'{"messages": []}', 400, 'no "model" field'),
    ("model not a string", b'{"model": 7}', 400, "must be a non-empty string"),
    ("empty model", b'{"model": ""}', 400, "must be a non-empty string"),
    ("not an object", b'["alpha"]', 400, "JSON object"),
    ("invalid UTF-8", b'{"model": "alpha\xff"}', 400, "not valid UTF-8"),
    ("empty body", b"", 400, "body is empty"),
    ("unknown model", b'{"model": "gamma"}', 404, "known models: alpha, beta"),
]


@pytest.mark.parametrize("what,raw,status,words", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_requests_get_openai_envelopes(rig, what, raw, status, words):
    resp = await rig.client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == status
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"]
    assert err["code"] == ("model_not_found" if status == 404 else status)
    assert err["type"] == "invalid_request_error"
    assert rig.switcher.acquired == [], "a bad request never waits for a model"


async def test_body_over_limit_declared_is_413(rig):
    resp = await rig.client.post(
        "/v1/chat/completions", data=b"x" * 5000, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 413
    assert "max_body_bytes (4096 bytes)" in (await resp.json())["error"]["message"]


async def test_body_over_limit_chunked_is_413(rig):
    async def trickle():
        for _ in range(10):
            yield b"y" * 1000

    resp = await rig.client.post("/v1/chat/completions", data=trickle())
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == 413
    # and the daemon keeps serving
    ok = await rig.client.post("/v1/chat/completions", json={"model": "alpha"})
    assert ok.status == 200


SWITCHER_ERRORS = [
    # (error raised by acquire, status, Retry-After, words)
    (QueueFull("alpha", 1000, retry_after=3.2), 429, "4", "1000 requests queued"),
    (ModelPinned("alpha", "beta"), 503, "7", "pinned to 'beta'"),
    (SwitchTimeout("alpha", 30.0), 504, "7", "not ready within 30.0s"),
    (SwitchFailed("alpha", "wake", "exit code 1"), 502, None, "failed to wake: exit code 1"),
]


@pytest.mark.parametrize("exc,status,retry_after,words", SWITCHER_ERRORS,
                         ids=[type(e[0]).__name__ for e in SWITCHER_ERRORS])
async def test_switcher_errors_map_to_statuses(rig, exc, status, retry_after, words):
    rig.switcher.fail_with["alpha"] = exc
    resp = await rig.client.post("/v1/chat/completions", json={"model": "alpha"})
    assert resp.status == status
    assert resp.headers.get("Retry-After") == retry_after
    err = (await resp.json())["error"]
    assert words in err["message"]
    assert err["code"] == status
    # the other model is unaffected
    assert (await rig.client.post("/v1/chat/completions", json={"model": "beta"})).status == 200


async def test_unknown_route_is_an_envelope(rig):
    resp = await rig.client.get("/v2/nothing")
    assert resp.status == 404
    assert "no route GET /v2/nothing" in (await resp.json())["error"]["message"]


# -- streaming -----------------------------------------------------------------


async def test_sse_chunks_are_relayed_as_produced(rig):
    resp = await rig.client.post("/v1/chat/completions", json={"model": "alpha", "stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    # the backend holds chunk 2 until we have seen chunk 1: a buffering proxy would deadlock here
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT)
    assert b'"n": 1' in first
    assert rig.switcher.leases_out() == 1, "the lease is held while the stream runs"
    rig.alpha.go_on.set()
    rest = await asyncio.wait_for(resp.content.read(), WAIT)
    assert b'"n": 2' in rest and rest.endswith(b"data: [DONE]\n\n")
    await asyncio.wait_for(rig.switcher.released.wait(), WAIT)
    assert rig.switcher.leases_out() == 0


async def test_client_abort_mid_stream_releases_lease_and_cancels_upstream(rig):
    resp = await rig.client.post(
        "/v1/chat/completions", json={"model": "alpha", "stream": True, "forever": True}
    )
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT)
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(rig.switcher.released.wait(), WAIT)
    assert rig.switcher.leases_out() == 0
    rig.alpha.go_on.set()
    await asyncio.wait_for(rig.alpha.client_gone.wait(), WAIT)  # the upstream request was dropped


async def test_backend_dying_mid_sse_sends_an_error_event(rig):
    resp = await rig.client.post("/v1/die-midstream", json={"model": "alpha"})
    assert resp.status == 200
    text = (await asyncio.wait_for(resp.content.read(), WAIT)).decode()
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert json.loads(events[0]) == {"n": 1}
    err = json.loads(events[-1])["error"]
    assert err["code"] == 502 and "mid-response" in err["message"]
    assert rig.switcher.leases_out() == 0


async def test_backend_dying_before_answering_is_a_clean_502(rig):
    resp = await rig.client.post("/v1/die-before", json={"model": "beta"})
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert "model 'beta' backend failed" in err["message"]
    assert rig.switcher.leases_out() == 0


async def test_unreachable_backend_is_a_502(rig):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rig.switcher.endpoints["alpha"] = dead
    resp = await rig.client.post("/v1/chat/completions", json={"model": "alpha"})
    assert resp.status == 502
    assert "cannot connect" in (await resp.json())["error"]["message"]
    assert rig.switcher.leases_out() == 0


# -- listing, health, metrics --------------------------------------------------


async def test_models_lists_every_configured_model_with_its_state(rig):
    body = await (await rig.client.get("/v1/models")).json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {"alpha", "beta"}
    assert by_id["alpha"]["llmux"]["state"] == "ready"
    assert by_id["beta"]["llmux"]["state"] == "sleeping"
    assert by_id["beta"]["llmux"]["eviction"] == "offload+keep_running"
    assert by_id["alpha"]["object"] == "model" and by_id["alpha"]["owned_by"] == "llmux"


async def test_health_is_json(rig):
    body = await (await rig.client.get("/health")).json()
    assert body["status"] == "ok" and body["active_models"] == ["alpha"]


async def test_metrics_count_requests_and_switches(rig):
    from llmuxd.events import SwitchFinished

    await rig.client.post("/v1/chat/completions", json={"model": "alpha"})
    await rig.client.post("/v1/chat/completions", json={"model": "gamma"})
    rig.metrics.on_switch_event(
        SwitchFinished("default", "alpha", "beta", True, 2.5, {"drain": 0.5, "wake": 2.0})
    )
    text = await (await rig.client.get("/metrics")).text()
    assert 'llmux_requests_total{key="",model="alpha",status="200",waited="false"} 1.0' in text
    assert 'llmux_requests_total{key="",model="",status="404",waited="false"} 1.0' in text
    assert 'llmux_switch_total{from="alpha",result="ok",to="beta"} 1.0' in text
    assert 'llmux_switch_phase_seconds_count{from="alpha",phase="wake",to="beta"} 1.0' in text
    assert 'llmux_active_model_info{model="alpha"} 1.0' in text
    assert 'llmux_active_model_info{model="beta"} 0.0' in text
    assert 'llmux_request_queue_wait_seconds_count{model="alpha"} 1.0' in text


# -- listening and slow clients -----------------------------------------------


@pytest.mark.parametrize(
    "address,expected",
    [
        ("127.0.0.1:3000", ("tcp", ("127.0.0.1", 3000))),
        ("[::1]:8080", ("tcp", ("::1", 8080))),
        (":9000", ("tcp", ("0.0.0.0", 9000))),
        ("unix:/run/llmux/http.sock", ("unix", "/run/llmux/http.sock")),
    ],
)
def test_parse_listen(address, expected):
    assert parse_listen(address) == expected


@pytest.mark.parametrize("address", ["localhost", "unix:", "host:port", "1.2.3.4:70000"])
def test_parse_listen_rejects(address):
    with pytest.raises(ValueError):
        parse_listen(address)


async def _serve(front: FrontEnd, listen: str, **kw) -> HttpServer:
    server = HttpServer(front.make_app(), listen=listen, **kw)
    await server.start()
    return server


async def test_unix_socket_listen(rig, tmp_path):
    path = tmp_path / "llmux.sock"
    front = FrontEnd(make_config(), rig.switcher, Metrics())
    server = await _serve(front, f"unix:{path}")
    try:
        assert server.addresses == [f"unix:{path}"]
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as s:
            async with s.post("http://llmux/v1/chat/completions", json={"model": "beta"}) as r:
                assert (await r.json())["model"] == "beta"
    finally:
        await server.stop()


async def test_silent_connection_is_closed_after_header_timeout(rig):
    front = FrontEnd(make_config(), rig.switcher, Metrics())
    server = await _serve(front, "127.0.0.1:0", header_timeout=0.2)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), WAIT) == b"", "the server closed it"
        writer.close()
    finally:
        await server.stop()


STREAM_REQUEST_BODY = b'{"model": "alpha", "stream": true}'
STREAM_REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_REQUEST_BODY), STREAM_REQUEST_BODY))


@pytest.mark.parametrize("split", [
    STREAM_REQUEST.index(b"\r\n") + 2,  # after the request line
    STREAM_REQUEST.index(b"\r\n\r\n") + 3,  # inside the blank line that ends the headers
], ids=["after-request-line", "inside-blank-line"])
async def test_header_timeout_spares_a_connection_whose_headers_arrived(rig, split):
    """A request that is slow to answer (a stream held for longer than the
    header timeout) keeps its connection, however its headers were split."""
    front = FrontEnd(make_config(), rig.switcher, Metrics())
    server = await _serve(front, "127.0.0.1:0", header_timeout=0.3)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        for piece in (STREAM_REQUEST[:split], STREAM_REQUEST[split:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        await asyncio.wait_for(rig.alpha.first_sent.wait(), WAIT)
        await asyncio.sleep(0.6)  # twice the header timeout
        rig.alpha.go_on.set()
        answer = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        assert b'"n": 2' in answer and b"data: [DONE]" in answer
    finally:
        await server.stop()


async def _open_firehose_and_stop_reading(host: str, port: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(host, port, limit=1024)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = b'{"model": "alpha"}'
    writer.write(b"POST /v1/firehose HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.transport.pause_reading()  # a client that stops reading
    return writer


@pytest.mark.parametrize("clients", [1, 3])
async def test_client_that_never_reads_is_dropped_and_lease_released(rig, clients):
    front = FrontEnd(make_config(), rig.switcher, Metrics(),
                     upstream=Upstream(read_timeout=30, write_timeout=0.2))
    server = await _serve(front, "127.0.0.1:0")
    try:
        host, port = server.sockets[0].getsockname()[:2]
        writers = []
        for _ in range(clients):  # staggered: each stalls at its own time
            writers.append(await _open_firehose_and_stop_reading(host, port))
            await asyncio.sleep(0.07)
        for _ in range(WAIT * 10):
            if rig.switcher.leases_out() == 0 and len(rig.switcher.acquired) == clients:
                break
            await asyncio.sleep(0.1)
        assert rig.switcher.leases_out() == 0
        await asyncio.wait_for(rig.alpha.client_gone.wait(), WAIT)
        for writer in writers:
            writer.close()
    finally:
        await server.stop()


async def test_backend_silent_past_read_timeout(rig):
    """A backend that says nothing for read_timeout: before its answer the
    client gets a 502 that says so; in the middle of an SSE stream, an error
    event. Either way the lease is released and the backend request dropped."""
    front = FrontEnd(make_config(), rig.switcher, Metrics(),
                     upstream=Upstream(read_timeout=0.3, write_timeout=30))
    server = await _serve(front, "127.0.0.1:0")
    client = Client(f"http://{server.addresses[0]}")
    try:
        resp = await client.post("/v1/silent", json={"model": "alpha"})
        assert resp.status == 502
        assert "no response within" in (await resp.json())["error"]["message"]
        await asyncio.wait_for(rig.alpha.client_gone.wait(), WAIT)
        assert rig.switcher.leases_out() == 0
        rig.alpha.client_gone.clear()

        resp = await client.post("/v1/silent", json={"model": "alpha", "stream": True})
        assert resp.status == 200  # the first event came; the second never does
        text = (await asyncio.wait_for(resp.content.read(), WAIT)).decode()
        events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        assert json.loads(events[0])["n"] == 1
        err = json.loads(events[-1])["error"]
        assert err["code"] == 502 and "timed out" in err["message"]
        await asyncio.wait_for(rig.alpha.client_gone.wait(), WAIT)
        assert rig.switcher.leases_out() == 0
        # the proxy still serves the next request
        resp = await client.post("/v1/chat/completions", json={"model": "beta"})
        assert resp.status == 200 and (await resp.json())["model"] == "beta"
    finally:
        await client.close()
        await server.stop()


async def test_reload_changes_models_and_limits(rig):
    rig.front.reload(Config.from_dict({
        "models": {"alpha": {"model_path": "/models/alpha"}, "gamma": {"model_path": "/models/gamma"}},
        "max_body_bytes": 100,
    }))
    listed = {m["id"] for m in (await (await rig.client.get("/v1/models")).json())["data"]}
    assert listed == {"alpha", "gamma"}
    resp = await rig.client.post("/v1/chat/completions", json={"model": "beta"})
    assert resp.status == 404
    resp = await rig.client.post("/v1/chat/completions", json={"model": "alpha", "pad": "x" * 200})
    assert resp.status == 413


async def test_trickling_body_gets_408_after_body_timeout(rig):
    front = FrontEnd(make_config(), rig.switcher, Metrics(), body_timeout=0.2)
    server = await _serve(front, "127.0.0.1:0")
    try:
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), WAIT)
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        writer.close()
        assert rig.switcher.acquired == []
    finally:
        await server.stop()


ACTIVATION_PROBE = """
import json, os, socket, sys
from llmuxd.http.listen import activation_sockets, socket_address
kind, pid_ok = sys.argv[1], sys.argv[2] == "mine"
if kind == "unix":
    s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[3])
else:
    s = socket.socket(); s.bind(("127.0.0.1", 0))
s.listen(); fd = s.detach()
if fd != 3:
    os.dup2(fd, 3); os.close(fd)
env = {"LISTEN_PID": str(os.getpid() if pid_ok else 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
found = activation_sockets(env)
print(json.dumps({"found": [[a.name, socket_address(a.sock)] for a in found], "env_left": sorted(env)}))
"""


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("owner", ["mine", "other"])
def test_activation_sockets_are_taken_only_when_meant_for_us(tmp_path, kind, owner):
    import subprocess
    import sys

    path = str(tmp_path / "act.sock")
    out = subprocess.run([sys.executable, "-c", ACTIVATION_PROBE, kind, owner, path],
                         capture_output=True, text=True, timeout=WAIT, check=True).stdout
    result = json.loads(out)
    if owner == "other":
        assert result["found"] == [], "LISTEN_PID names another process: not ours"
        return
    [(name, address)] = result["found"]
    assert name == "web"
    assert address == f"unix:{path}" if kind == "unix" else address.startswith("127.0.0.1:")
    assert result["env_left"] == [], "children must not inherit the activation variables"
