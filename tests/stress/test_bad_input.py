"""Bad input against a running `llmuxd run`: each is answered in OpenAI's
error envelope (or the connection is closed) and the daemon keeps serving
everyone else with bounded memory. Config-side bad input is refused by
`llmuxd check-config` (the same loader the daemon and its reload use).

Bus-side bad input (eviction strings, unprivileged callers, wrong
signatures, many concurrent status calls) is the bus room's
(tests/test_bus*.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from harness import (
    REQUEST_TIMEOUT, Daemon, Report, Req, SimModel, daemon_env, http, record, send, start_daemon,
    stop_and_check, write_config,
)

A, B, SLOW = "alpha", "beta", "slowpoke"
#: bad-input daemon: 1 MiB bodies; request_timeout bounds the client that never reads
TIMEOUT = 20.0
MAX_BODY = 1024 * 1024
#: RSS growth we accept for what would cost 50 MB (or 1,000 requests) if buffered
RSS_BOUND_MB = 40


def models() -> list[SimModel]:
    return [SimModel(A), SimModel(B),
            # a switch to it takes seconds: its wake (level 1) alone takes 3 s
            SimModel(SLOW, wake_time=3.0, load_time=1.0)]


@pytest.fixture(scope="module")
def daemon(stress_tmp):
    d = start_daemon(stress_tmp, models(), policy={"request_timeout": TIMEOUT})
    yield d
    stop_and_check(d)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def post(daemon: Daemon, raw: bytes, headers: dict | None = None, path: str = "/v1/chat/completions"):
    status, hdrs, body = http(daemon.base + path, raw, headers={"Content-Type": "application/json", **(headers or {})})
    return status, hdrs, json.loads(body) if body.strip() else None


def still_serving(daemon: Daemon) -> None:
    for model in (A, B):
        status, headers, body = post(daemon, json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).encode())
        assert status == 200 and headers["X-Sim-Model"] == model, body


def host_port(daemon: Daemon) -> tuple[str, int]:
    host, port = daemon.config["listen"].rsplit(":", 1)
    return host, int(port)


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("raw,status,words", [
    (b'{"model": "alpha", "messages": [', 400, "not valid JSON"),
    (b"", 400, "body is empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"messages": []}', 400, 'no "model" field'),
    (b'{"model": 7}', 400, "non-empty string"),
    (b'{"model": null}', 400, "non-empty string"),
    (b'{"model": ""}', 400, "non-empty string"),
    (b'{"model": {"name": "alpha"}}', 400, "non-empty string"),
    (b'{"model": "delta"}', 404, "known models: alpha, beta, slowpoke"),
    (b'{"model": "../alpha"}', 404, "known models"),
    (b'{"model": "alpha\\u0000"}', 404, "known models"),
    (b'{"model": "\xff\xfe alpha"}', 400, "not valid UTF-8"),
    (b'\xc3\x28{"model": "alpha"}', 400, "not valid UTF-8"),
], ids=["truncated", "empty", "array", "no-model", "int", "null", "empty-name", "object",
        "unknown", "traversal-name", "nul-name", "bad-utf8-in-string", "bad-utf8-lead"])
def test_bad_bodies_get_openai_errors(daemon, raw, status, words):
    got, _, body = post(daemon, raw)
    assert got == status, body
    assert words in body["error"]["message"], body
    assert body["error"]["code"] == status and body["error"]["type"]


def test_bad_inputs_leave_the_daemon_serving(daemon):
    still_serving(daemon)
    text = daemon.metrics()
    assert 'llmux_requests_total{key="",model="",status="400",' in text, "bad requests are counted, unlabelled"


def test_50_mb_body_is_413_before_it_is_read(daemon):
    """A declared 50 MB body is refused from its headers; a chunked one at the
    first byte over the limit. RSS stays bounded either way."""
    before = rss_mb(daemon.pid)
    # declared: the answer comes before we send a byte of the body
    with socket.create_connection(host_port(daemon), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (50 << 20))
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"max_body_bytes" in head or b"Content-Length" in head
    # chunked: 50 x 1 MiB, refused once over 1 MiB
    sent = 0
    with socket.create_connection(host_port(daemon), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
        try:
            for _ in range(50):
                s.sendall(chunk)
                sent += 1
        except OSError:
            pass  # the daemon answered and closed: what we want
        s.settimeout(30)
        head = b""
        try:
            head = s.recv(65536)
        except OSError:
            pass
    assert head.startswith(b"HTTP/1.1 413") or sent < 50, (sent, head[:200])
    assert rss_mb(daemon.pid) - before < RSS_BOUND_MB, "the body was not buffered"
    still_serving(daemon)


# --------------------------------------------------------------------------- slow and stuck clients


async def test_slow_and_stuck_clients_are_cut_off_while_others_are_served(daemon):
    """Slowloris on headers and on the body, and a client that never reads its
    answer: each is timed out by the daemon (header_timeout, body timeout,
    write timeout = request_timeout), and 20 ordinary requests are served
    meanwhile."""
    host, port = host_port(daemon)
    loop = asyncio.get_running_loop()

    async def slowloris(prefix: bytes, trickle: bytes) -> float:
        """Send `prefix`, then a byte of `trickle` per second until the daemon
        closes; the seconds it took."""
        reader, writer = await asyncio.open_connection(host, port)
        t0 = loop.time()
        writer.write(prefix)
        try:
            for i in range(400):
                writer.write(trickle[i % len(trickle):i % len(trickle) + 1])
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except asyncio.TimeoutError:
                    continue
                return loop.time() - t0 if data is not None else -1
        except OSError:
            return loop.time() - t0
        finally:
            writer.close()
        return -1.0

    async def never_reads() -> None:
        """Ask for a big answer (embeddings of 1,500 inputs, several MB of
        JSON) with a tiny receive buffer, and never read it."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        body = json.dumps({"model": A, "input": [f"text number {i}" for i in range(1500)]}).encode()
        await loop.sock_sendall(sock, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        stuck_sockets.append(sock)

    stuck_sockets: list[socket.socket] = []
    before = rss_mb(daemon.pid)
    await never_reads()
    await asyncio.to_thread(daemon.wait_for, "the stuck client holds a lease", lambda m: m[A]["in_flight"] >= 1)
    headers = asyncio.ensure_future(slowloris(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", b"X-Slow-Header-With-A-Long-Name: 1\r\n"))
    body = asyncio.ensure_future(slowloris(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n", b'{"model": "alpha", "messages": []}'))
    async with aiohttp.ClientSession() as session:
        served = await asyncio.gather(*(send(session, daemon.base, Req(A), 120.0) for _ in range(20)))
    assert [o.problems(frozenset({200})) for o in served] == [[]] * 20, "others are served meanwhile"
    cut_headers, cut_body = await asyncio.wait_for(asyncio.gather(headers, body), 300)
    assert cut_headers > 0, "the daemon closed the header slowloris"
    assert cut_body > 0, "the daemon closed (or answered 408 to) the body slowloris"
    await asyncio.to_thread(daemon.wait_for, "the stuck client's lease is released",
                            lambda m: m[A]["in_flight"] == 0, REQUEST_TIMEOUT + 60)
    for sock in stuck_sockets:
        sock.close()
    assert rss_mb(daemon.pid) - before < RSS_BOUND_MB
    still_serving(daemon)


async def test_1000_concurrent_requests_for_a_slow_switch(daemon):
    """1,000 requests at once for a model whose switch takes seconds: all
    answered 200 (or 504 past request_timeout, in the envelope), none lost,
    daemon memory bounded."""
    status, _, body = post(daemon, json.dumps({"model": SLOW, "prompt": "x", "max_tokens": 1}).encode(),
                           path="/v1/completions")
    assert status == 200, body  # started once: from now on a switch to it is a 3 s wake
    still_serving(daemon)  # alpha or beta is awake; slowpoke sleeps
    before = rss_mb(daemon.pid)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        outcomes = await asyncio.gather(*(send(session, daemon.base, Req(SLOW), TIMEOUT + 60) for _ in range(1000)))
    peak = rss_mb(daemon.pid)
    record(Report("1000_concurrent_slow_switch", list(outcomes), [], 1, 0), frozenset({200, 504}))
    problems = [p for o in outcomes for p in o.problems(frozenset({200, 504}))]
    assert problems == [], problems[:10]
    assert sum(o.status == 200 for o in outcomes) > 0
    assert peak - before < RSS_BOUND_MB * 2, f"RSS grew {peak - before:.0f} MB for 1,000 waiting requests"
    await asyncio.to_thread(daemon.wait_for, "queues empty",
                            lambda m: all(not s["in_flight"] and not s["queue_depth"] for s in m.values()))
    still_serving(daemon)


# --------------------------------------------------------------------------- config


def check_config(path: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "llmuxd.daemon.main", "check-config", str(path)],
                          capture_output=True, text=True, timeout=120, env=daemon_env())
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("name", [
    "../etc", "a/b", "a b", "-leading-dash", ".hidden", "x" * 65, "name\nnewline", "émoji😀", "a..b",
])
def test_odd_model_names_are_config_errors(tmp_path, name):
    path = write_config(tmp_path, [SimModel("ok")])
    data = yaml.safe_load(path.read_text())
    data["models"][name] = data["models"]["ok"]
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    rc, err = check_config(path)
    assert rc == 1, err
    assert str(path) in err and "invalid model name" in err, err


@pytest.mark.parametrize("checkpoint_path", [
    "../../etc", "/var/lib/llmux/checkpoints/../../../etc", "relative/images",
])
def test_path_traversal_in_checkpoint_path_is_a_config_error(tmp_path, checkpoint_path):
    path = write_config(tmp_path, [SimModel("ok")], checkpoint={})
    data = yaml.safe_load(path.read_text())
    data["models"]["ok"]["checkpoint_path"] = checkpoint_path
    path.write_text(yaml.safe_dump(data))
    rc, err = check_config(path)
    assert rc == 1, f"check-config accepted checkpoint_path {checkpoint_path!r}:\n{err}"
    assert "models.ok.checkpoint_path" in err, err


def test_a_good_config_passes_check_config(tmp_path):
    """The control for the two tables above: the same config, unbroken, is accepted."""
    rc, err = check_config(write_config(tmp_path, [SimModel("ok")], checkpoint={}))
    assert rc == 0, err
