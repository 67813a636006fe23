"""What can go wrong talking to one backend, typed so the orchestrator can
decide: unreachable (process gone or not listening yet), an HTTP error status
(the backend answered and refused), or a timeout (it did not answer in time).

They subclass `LLMuxError` so that an unwrapped one still reaches a caller as
a one-line 502, but the orchestrator normally wraps them in `BackendError`
(model, phase, reason) using `str(exc)` as the reason.
"""

from __future__ import annotations

from llmuxd.errors import LLMuxError


class EngineError(LLMuxError):
    """A call to a backend failed."""

    bus_name = "SwitchFailed"
    http_status = 502
    openai_type = "server_error"

    def __init__(self, message: str, *, url: str = "", operation: str = ""):
        super().__init__(message)
        self.url = url
        self.operation = operation


class BackendUnreachable(EngineError):
    """No connection: the process is not listening (yet), or died."""


class BackendExited(BackendUnreachable):
    """The backend process exited while we waited for it."""


class BackendTimeout(EngineError):
    """The backend did not answer within the operation's timeout."""


class BackendHTTPError(EngineError):
    """The backend answered with a non-2xx status."""

    def __init__(self, status: int, body: str, *, url: str = "", operation: str = ""):
        detail = _error_message(body)
        super().__init__(
            f"{operation or 'request'} to {url} answered HTTP {status}: {detail}",
            url=url,
            operation=operation,
        )
        self.status = status
        self.body = body
        self.detail = detail


def _error_message(body: str) -> str:
    """The human part of vLLM's `{"error":{"message":...}}` or FastAPI's
    `{"detail":...}`, else the body itself (shortened)."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]).splitlines()[0][:300]
        if isinstance(err, str):
            return err[:300]
        if "detail" in data:
            return str(data["detail"])[:300]
    text = body.strip().replace("\n", " ")
    return text[:300] or "(empty body)"


#: statuses with which a server says it lacks a route or an operation
_REFUSING_STATUSES = (404, 405, 501)


def refusal(exc: BaseException) -> str | None:
    """Why the backend refused an operation for good ("not supported", a route
    it does not have), or None for a failure that may pass (timeout, crash,
    an ordinary 500). A refusal is learned per model; a failure is not."""
    if not isinstance(exc, BackendHTTPError):
        return None
    if exc.status in _REFUSING_STATUSES or "not supported" in exc.detail.lower():
        return f"{exc.operation or 'the call'} answered HTTP {exc.status}: {exc.detail}"
    return None
