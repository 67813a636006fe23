#!/usr/bin/env python3
"""A minimal aiohttp reverse proxy: the floor for any Python proxy.

It does what llmux's request path does to be fast, and nothing else: no model
lookup, no limits, no metrics, no deadlines, no error envelopes, no header
copying. So that it is the strongest minimal proxy, not a strawman:

- an answer the backend sends with a Content-Length (every non-streamed
  completion) is read whole and leaves in one write, status line, headers
  and body together (web.Response); only an answer without one (an SSE
  stream, chunked) is relayed chunk by chunk as it arrives;
- one pooled ClientSession, unlimited keep-alive connections, and none of a
  client's per-request extras: no cookie jar, no decompression, no
  User-Agent / Accept-Encoding headers to build, no timeout (so no timer
  per request or per read);
- the objects made at startup frozen out of the cyclic GC's reach
  (gc.freeze), as llmuxd does once it serves;
- no middleware, no access log; the benchmark runs it on uvloop as well as
  on asyncio (`--loop`), as llmuxd uses uvloop when it is installed.

The proxy benchmark (proxy_overhead.py) puts it beside llmux on the same
event loop, so that what llmux adds over plain aiohttp shows as a ratio.

    python benchmarks/bare_proxy.py --port 8001 --backend http://127.0.0.1:8000 [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import gc

import aiohttp
from aiohttp import web


def make_app(backend: str) -> web.Application:
    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        up = await session.post(backend + request.raw_path, data=body, headers=headers)
        try:
            content_type = {"Content-Type": up.headers.get("Content-Type", "")}
            if up.content_length is not None:  # a whole answer: one write
                return web.Response(body=await up.read(), status=up.status, headers=content_type)
            resp = web.StreamResponse(status=up.status, headers=content_type)
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp
        finally:
            up.release()

    async def open_session(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", proxy)
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="base URL of the backend")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(make_app(args.backend.rstrip("/")), args.port))


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    gc.freeze()  # as llmuxd does once it serves: full GC collections skip startup objects
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
