#!/usr/bin/env python3
"""What llmux's front end costs per request, side by side in one run.

Three targets in front of the same fast fake vLLM backend, each server in its
own process, measured by one load generator:

  direct   client -> backend
  bare     client -> a minimal aiohttp reverse proxy (read body, forward with a
           pooled session, stream back) -> backend: the floor for any proxy
  llmux    client -> llmux's FrontEnd + the real Switcher (one model, always
           awake) -> backend: body limits, model lookup, lease, metrics

Reported: added latency p50/p99 at concurrency 1 (non-streaming), requests/s
at concurrency 32, and SSE time-to-first-chunk and chunks/s with 32 parallel
streams. Ratios are printed against `direct` and `bare`; absolute numbers
depend on the machine and its load, ratios measured together much less.

    .venv/bin/python benchmarks/proxy_overhead.py            # about a minute
    .venv/bin/python benchmarks/proxy_overhead.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODEL = "bench"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}).encode()
STREAM_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True}).encode()
REPLY = json.dumps({
    "id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi " * 16}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 16, "total_tokens": 17},
}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers (each runs in its own process) --------------------------------------


def serve_backend(port: int, chunks: int) -> None:
    from aiohttp import web

    chunk = b'data: {"object":"chat.completion.chunk","model":"bench","choices":[{"delta":{"content":"tok"}}]}\n\n'

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream": true' not in body:
            return web.Response(body=REPLY, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(chunks):
            await resp.write(chunk)
            await asyncio.sleep(0)  # one token per loop turn, as a real server flushes
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_bare(port: int, backend: str) -> None:
    import aiohttp
    from aiohttp import web

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        async with session.post(backend + request.path, data=body, headers={"Content-Type": "application/json"}) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    async def make() -> web.Application:
        app = web.Application()
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        app.router.add_post("/v1/{tail:.*}", proxy)

        async def close(app: web.Application) -> None:
            await app["session"].close()

        app.on_cleanup.append(close)
        return app

    web.run_app(make(), host="127.0.0.1", port=port, access_log=None, print=None)


def serve_llmux(port: int, backend: str) -> None:
    from llmuxd.config import Config
    from llmuxd.http import FrontEnd, HttpServer
    from llmuxd.lifecycle import BackendState
    from llmuxd.metrics import Metrics
    from llmuxd.switcher import Switcher

    class AlwaysAwake:
        """Backends whose one model is awake from the start (no switching)."""

        def __init__(self) -> None:
            self._state = BackendState.READY

        async def ensure_awake(self, model: str) -> None:
            self._state = BackendState.READY

        async def sleep(self, model: str, eviction: Any) -> None:
            self._state = BackendState.SLEEPING

        async def stop(self, model: str) -> None:
            self._state = BackendState.STOPPED

        def state(self, model: str) -> BackendState:
            return self._state

        def endpoint(self, model: str) -> str:
            return backend

        def on_unexpected_exit(self, callback: Any) -> None:
            pass

    async def main() -> None:
        config = Config.from_dict({"models": {MODEL: {"model_path": "/bench"}}, "listen": f"127.0.0.1:{port}"})
        switcher = Switcher(config, AlwaysAwake())
        await switcher.start()
        front = FrontEnd(config, switcher, Metrics())
        server = HttpServer(front.make_app(), listen=config.listen)
        await server.start()
        await asyncio.Event().wait()

    asyncio.run(main())


# -- load generator ------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def wait_up(url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.post(url + "/v1/chat/completions", data=BODY) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def latency_c1(session: Any, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", data=BODY) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - t0)
    return out


async def throughput(session: Any, url: str, n: int, concurrency: int) -> float:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url + "/v1/chat/completions", data=BODY) as r:
                await r.read()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def streams(session: Any, url: str, count: int, rounds: int) -> tuple[list[float], float]:
    ttfc: list[float] = []
    chunks = 0

    async def one() -> None:
        nonlocal chunks
        t0 = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", data=STREAM_BODY) as r:
            first = True
            async for _ in r.content:  # lines
                if first:
                    ttfc.append(time.perf_counter() - t0)
                    first = False
                chunks += 1

    t0 = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - t0
    return ttfc, chunks / 2 / elapsed  # each SSE event is a data line and a blank line


async def measure(targets: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import aiohttp

    results: dict[str, dict[str, float]] = {name: {} for name in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in targets.values():
            await wait_up(url)
            await latency_c1(session, url, 50)  # warm connections and code paths
        # interleave targets per round so drift in machine load hits all alike
        lat: dict[str, list[float]] = {name: [] for name in targets}
        rps: dict[str, list[float]] = {name: [] for name in targets}
        ttfc: dict[str, list[float]] = {name: [] for name in targets}
        cps: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, url in targets.items():
                lat[name] += await latency_c1(session, url, args.requests // args.rounds)
                rps[name].append(await throughput(session, url, args.requests, 32))
                t, c = await streams(session, url, 32, 1)
                ttfc[name] += t
                cps[name].append(c)
        for name in targets:
            results[name] = {
                "p50_ms": pct(lat[name], 50) * 1000,
                "p99_ms": pct(lat[name], 99) * 1000,
                "rps_c32": statistics.median(rps[name]),
                "ttfc_p50_ms": pct(ttfc[name], 50) * 1000,
                "chunks_per_s": statistics.median(cps[name]),
            }
    return results


def report(r: dict[str, dict[str, float]]) -> None:
    d, b, l = r["direct"], r["bare"], r["llmux"]
    print(f"{'':24}{'direct':>10}{'bare':>10}{'llmux':>10}   llmux vs direct / vs bare")
    rows = [
        ("c=1 p50 (ms)", "p50_ms"), ("c=1 p99 (ms)", "p99_ms"), ("c=32 req/s", "rps_c32"),
        ("SSE 32 ttfc p50 (ms)", "ttfc_p50_ms"), ("SSE 32 chunks/s", "chunks_per_s"),
    ]
    for label, key in rows:
        print(f"{label:24}{d[key]:10.2f}{b[key]:10.2f}{l[key]:10.2f}   "
              f"{l[key] / d[key]:5.2f}x / {l[key] / b[key]:5.2f}x")
    print()
    print(f"added latency at c=1: p50 {l['p50_ms'] - d['p50_ms']:.3f} ms "
          f"(bare proxy {b['p50_ms'] - d['p50_ms']:.3f} ms), "
          f"p99 {l['p99_ms'] - d['p99_ms']:.3f} ms (bare {b['p99_ms'] - d['p99_ms']:.3f} ms)")
    print(f"llmux / bare proxy: throughput {l['rps_c32'] / b['rps_c32']:.2f}x, "
          f"stream chunks/s {l['chunks_per_s'] / b['chunks_per_s']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--chunks", type=int, default=200, help="SSE chunks per stream (default 200)")
    parser.add_argument("--quick", action="store_true", help="small run to check that it works")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.chunks = 200, 1, 20

    ctx = mp.get_context("spawn")
    ports = {name: free_port() for name in ("backend", "bare", "llmux")}
    backend = f"http://127.0.0.1:{ports['backend']}"
    procs = [
        ctx.Process(target=serve_backend, args=(ports["backend"], args.chunks), daemon=True),
        ctx.Process(target=serve_bare, args=(ports["bare"], backend), daemon=True),
        ctx.Process(target=serve_llmux, args=(ports["llmux"], backend), daemon=True),
    ]
    for p in procs:
        p.start()
    try:
        targets = {"direct": backend, "bare": f"http://127.0.0.1:{ports['bare']}",
                   "llmux": f"http://127.0.0.1:{ports['llmux']}"}
        results = asyncio.run(measure(targets, args))
    finally:
        for p in procs:
            p.terminate()
            p.join(5)
    print(f"proxy overhead ({os.cpu_count()} CPUs, {args.requests} requests x {args.rounds} rounds, "
          f"{args.chunks} chunks per stream)\n")
    report(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
