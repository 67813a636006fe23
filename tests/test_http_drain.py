"""Stopping the HTTP server drains (llmuxd/http/listen.py, "Stopping drains").

What a client sees when llmuxd stops or restarts, without systemd: a
connection the server accepted whose request is still on its way is
answered (with `Connection: close`), a stream longer than the drain ends
after a whole event with an error event that says why, and a listening
socket someone else holds (systemd's, with socket activation) keeps its
backlog for the next server. tests/stress/test_systemd_scenarios.py shows
the same through `systemctl restart llmuxd` under load.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from llmuxd.http import FrontEnd, HttpServer
from llmuxd.metrics import Metrics
from test_http import FakeBackend, FakeSwitcher, make_config

WAIT = 30  # generous bound for event waits; never a timing assertion
DRAIN = 0.5  # the server's shutdown_timeout in these tests
REQUEST = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def backend():
    b = FakeBackend("alpha")
    await b.server.start_server()
    yield b
    await b.server.close()


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve(backend: FakeBackend, sock: socket.socket, drain: float = DRAIN) -> HttpServer:
    front = FrontEnd(make_config(), FakeSwitcher({"alpha": backend.url, "beta": backend.url}), Metrics())
    server = HttpServer(front.make_app(), sockets=[sock], shutdown_timeout=drain)
    await server.start()
    return server


def raw_request(body: dict, path: str = "/v1/chat/completions") -> bytes:
    data = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nHost: llmux\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))


async def wait_until(predicate, what: str) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(poll(), WAIT)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}: not within {WAIT}s") from None


async def test_a_request_still_on_its_way_is_answered(backend):
    server = await serve(backend, listening_socket())
    host, port = server.sockets[0].getsockname()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        await wait_until(lambda: server.busy, "the connection accepted")
        stopping = asyncio.ensure_future(server.stop())
        await wait_until(lambda: refused(host, port), "the server stopped accepting")
        writer.write(raw_request(REQUEST))
        answer = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        await asyncio.wait_for(stopping, WAIT)
    finally:
        await server.stop()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"connection: close" in head.lower(), head
    assert json.loads(body)["model"] == "alpha"


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_a_stream_in_progress_is_served_to_its_end(backend):
    """The drain waits for a request inside its handler (its headers long
    read, so only the in-flight count keeps the server busy)."""
    server = await serve(backend, listening_socket(), drain=WAIT)
    host, port = server.sockets[0].getsockname()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw_request({**REQUEST, "stream": True}))
        await asyncio.wait_for(backend.first_sent.wait(), WAIT)
        stopping = asyncio.ensure_future(server.stop())
        await wait_until(lambda: refused(host, port), "the server stopped accepting")
        await asyncio.sleep(3 * DRAIN)  # a drain that ignored the stream would have ended it by now
        assert not stopping.done(), "the drain ended while a stream was in progress"
        backend.go_on.set()
        raw = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        await asyncio.wait_for(stopping, WAIT)
    finally:
        await server.stop()
    body = _dechunk(raw.partition(b"\r\n\r\n")[2])
    assert body.endswith(b"data: [DONE]\n\n") and b'"n": 2' in body, body


async def test_a_stream_longer_than_the_drain_ends_after_a_whole_event(backend):
    server = await serve(backend, listening_socket())
    host, port = server.sockets[0].getsockname()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw_request({**REQUEST, "stream": True}, "/v1/endless"))
        await asyncio.wait_for(backend.first_sent.wait(), WAIT)
        await server.stop()
        raw = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
    finally:
        await server.stop()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    events = _dechunk(body).split(b"\n\n")
    assert events[-1] == b"", "the stream ended in the middle of an event"
    *tokens, last = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert tokens and all(t["model"] == "alpha" for t in tokens), tokens
    assert [t["n"] for t in tokens] == list(range(1, len(tokens) + 1))
    assert last["error"]["code"] == 503 and "restarting" in last["error"]["message"], last


async def test_the_held_socket_keeps_its_backlog_for_the_next_server(backend):
    """Like llmux.socket across `systemctl restart llmuxd`: a connection made
    while no server runs waits, and the next server answers it."""
    held = listening_socket()
    first = await serve(backend, held.dup())
    await first.stop()
    host, port = held.getsockname()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), WAIT)  # not refused
    writer.write(raw_request(REQUEST))
    second = await serve(backend, held.dup())
    try:
        answer = await asyncio.wait_for(reader.readuntil(b"}"), WAIT)
        writer.close()
    finally:
        await second.stop()
        held.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def _dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body."""
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        body = rest[n + 2:]
    return out
