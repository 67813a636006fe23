"""Reading a request body within limits, and finding the model it names.

The body is read before the model is known (the model is in it), so the
limit is enforced while reading: a declared Content-Length over the limit is
refused before a byte is read, and an undeclared (chunked) body is counted as
it arrives and refused at the first byte over. A slow sender is bounded by a
read timeout, so a trickling client cannot hold a connection for ever.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from llmuxd.http.errors import BadRequest, PayloadTooLarge

#: header that names the model, for bodies that do not (or to override them)
MODEL_HEADER = "X-LLMux-Model"


class BodyTimeout(BadRequest):
    http_status = 408

    def __init__(self, seconds: float):
        super().__init__(f"request body not received within {seconds:.0f}s; send it faster")


def check_declared_length(request: web.BaseRequest, limit: int) -> None:
    """Raise PayloadTooLarge when Content-Length alone exceeds the limit."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(limit)


async def read_body(request: web.BaseRequest, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes, received within `timeout` seconds."""
    check_declared_length(request, limit)
    # Most bodies arrive with their headers: take them without a timer.
    first = request.content.read_nowait()
    size = len(first)
    if size > limit:
        raise PayloadTooLarge(limit)
    if request.content.at_eof():
        return first
    chunks = [first] if first else []
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(timeout) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def nesting_limit() -> int:
    """About how deep JSON may nest here: json's decoder recurses per level
    and gives up at the interpreter's recursion limit (a RecursionError)."""
    return sys.getrecursionlimit()


def model_from(body: bytes, header_value: str | None) -> str:
    """The model a request names: the X-LLMux-Model header wins, else the
    JSON body's "model" string. Raises BadRequest with what to fix."""
    if header_value is not None:
        model = header_value.strip()
        if not model:
            raise BadRequest(f"header {MODEL_HEADER} is empty; name a model", param="model")
        return model
    if not body:
        raise BadRequest(
            f"request body is empty; send JSON with a \"model\" field (or the {MODEL_HEADER} header)",
            param="model",
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        # the C decoder recurses once per level and stops at the interpreter's
        # recursion limit: a client's mistake (or attack), not the server's
        raise BadRequest(
            f"request body nests JSON deeper than {nesting_limit()} levels; send flatter JSON"
        ) from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object with a \"model\" field", param="model")
    if "model" not in data:
        raise BadRequest(
            f"request has no \"model\" field; name a model (or set the {MODEL_HEADER} header)",
            param="model",
        )
    model = data["model"]
    if not isinstance(model, str) or not model:
        raise BadRequest(
            f"\"model\" must be a non-empty string, not {json.dumps(model)}", param="model"
        )
    return model
