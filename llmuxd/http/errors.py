"""OpenAI-shaped error responses, mapped from llmux errors in one place.

Every failure a client sees is `{"error": {"message", "type", "param",
"code"}}`, the envelope vLLM and OpenAI use, so that official clients raise
their typed exceptions (NotFoundError, RateLimitError, ...) with our message.
The status comes from the error's `http_status` (llmuxd/errors.py) and a
`Retry-After` header from its `retry_after`, so adding an error type never
means touching this file.
"""

from __future__ import annotations

import json
import math

from aiohttp import web

from llmuxd.errors import LLMuxError, UnknownModel

#: statuses after which a client is invited to retry
RETRYABLE = frozenset({429, 502, 503, 504})


class BadRequest(LLMuxError):
    """The request itself is wrong (JSON, model field, encoding)."""

    http_status = 400
    openai_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFound(UnknownModel):
    """404 for a model that is not served, or that the request's key may not use:
    one answer for both (OpenAI's), so a key cannot probe what else is served.
    `known` are the models the caller may use."""

    openai_code = "model_not_found"

    def __init__(self, model: str, known: "list[str] | tuple[str, ...]" = ()):
        super().__init__(model, known)
        known_s = ", ".join(sorted(known)) or "none"
        self.message = f"model '{model}' does not exist or you do not have access to it; known models: {known_s}"


class RouteNotFound(LLMuxError):
    http_status = 404
    openai_type = "invalid_request_error"


class PayloadTooLarge(LLMuxError):
    http_status = 413
    openai_type = "invalid_request_error"

    def __init__(self, limit: int):
        super().__init__(
            f"request body is larger than max_body_bytes ({limit} bytes); "
            "send less or raise max_body_bytes in the llmux config"
        )
        self.limit = limit


class UpstreamFailed(LLMuxError):
    """The model's backend failed while llmux forwarded a request to it."""

    http_status = 502
    openai_type = "server_error"

    def __init__(self, model: str, reason: str, status: int | None = None):
        where = f" (backend status {status})" if status else ""
        super().__init__(f"model '{model}' backend failed{where}: {reason}")
        self.model = model
        self.reason = reason
        self.backend_status = status


class StreamEnded(LLMuxError):
    """llmuxd stopped (or restarted) before a stream finished: the last event
    of a stream it ended after a whole event, so the client can tell and retry."""

    http_status = 503
    openai_type = "service_unavailable"

    def __init__(self, model: str):
        super().__init__(f"llmux is stopping or restarting and could not wait for this stream from "
                         f"'{model}' to finish; it ended here, after a whole event: send the request again")
        self.model = model


def error_body(exc: LLMuxError) -> dict:
    """The OpenAI envelope for an llmux error."""
    param = getattr(exc, "param", None)
    if param is None and isinstance(exc, UnknownModel):
        param = "model"
    return {
        "error": {
            "message": str(exc),
            "type": getattr(exc, "openai_type", "server_error"),
            "param": param,
            "code": getattr(exc, "openai_code", None) or exc.http_status,
        }
    }


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """`Retry-After` in whole seconds (at least 1), or nothing."""
    if seconds is None or seconds != seconds or seconds < 0:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_response(exc: LLMuxError, retry_after: float | None = None,
                   headers: "dict[str, str] | None" = None) -> web.Response:
    """The response for `exc` (with `headers`). `retry_after` fills in when the error has none."""
    status = int(getattr(exc, "http_status", 500) or 500)
    headers = dict(headers or {})
    if status in RETRYABLE:
        ra = exc.retry_after if exc.retry_after is not None else retry_after
        headers.update(retry_after_header(ra))
    return web.Response(
        status=status,
        body=json.dumps(error_body(exc)).encode(),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(exc: LLMuxError) -> bytes:
    """An SSE `data:` event carrying the envelope: how a stream that already
    sent its 200 tells the client it ended in failure (vLLM does the same)."""
    return b"data: " + json.dumps(error_body(exc)).encode() + b"\n\n"
