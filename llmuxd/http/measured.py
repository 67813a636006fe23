"""llmux 0.7's HTTP metrics (its proxy layer, onwards, exported them for every
route): `llmux_http_requests_total{method,endpoint,status}`,
`llmux_http_requests_duration_seconds`, `llmux_http_requests_pending{method,endpoint}`
and `llmux_http_response_body_size`, recorded by wrapping each route's handler.

`endpoint` is the route a request took, never a path a client made up (a label
value per made-up path would grow without bound): the OpenAI and vLLM routes
under /v1 by their path, anything else under /v1 as ``/v1/{tail}``, unknown
routes as ``/{tail}``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

#: paths under /v1 that are their own endpoint label (OpenAI's and vLLM's routes)
KNOWN_V1_PATHS = frozenset((
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/speech",
    "/v1/images/generations", "/v1/moderations", "/v1/rerank", "/v1/score",
    "/v1/tokenize", "/v1/detokenize", "/v1/classify", "/v1/pooling",
))

#: what a handler whose client went away is counted as (nginx's 499)
CLIENT_CLOSED = 499

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def measured(metrics: Any, handler: Handler, *, by_path: bool = False) -> Handler:
    """`handler`, counted and timed in `metrics` (llmuxd.metrics.Metrics).
    `by_path`: the catch-all /v1 route, labelled by its known paths."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        endpoint = _endpoint(request, by_path)
        method = request.method
        started = time.monotonic()
        metrics.http_started(method, endpoint)
        status, size = 500, 0
        try:
            response = await handler(request)
            status, size = response.status, _body_size(response)
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            metrics.http_finished(method, endpoint, status, time.monotonic() - started, size)

    return wrapper


def _endpoint(request: web.Request, by_path: bool) -> str:
    if by_path:
        path = request.path
        return path if path in KNOWN_V1_PATHS else "/v1/{tail}"
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _body_size(response: web.StreamResponse) -> int:
    """Bytes of body sent (a stream's count so far; a whole body's length)."""
    try:
        length = response.body_length if response.prepared else 0
    except (AttributeError, AssertionError):  # not written yet: a whole body aiohttp sends next
        length = 0
    return int(length or response.content_length or 0)
