#!/usr/bin/env python3
"""A minimal aiohttp reverse proxy: the floor for any Python proxy.

It reads the body, forwards it on one pooled ClientSession and streams the
answer back chunk by chunk, with nothing else: no model lookup, no limits, no
metrics, no error envelopes. The proxy benchmark (proxy_overhead.py) puts it
beside llmux on the same event loop, so that what llmux adds over plain
aiohttp shows as a ratio.

    python benchmarks/bare_proxy.py --port 8001 --backend http://127.0.0.1:8000 [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web


def make_app(backend: str) -> web.Application:
    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.post(backend + request.path, data=body, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    async def open_session(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

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
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
