"""The errors llmux raises across rooms.

One hierarchy, so that each facade maps them once: `http/` to OpenAI-shaped
statuses, `bus/` to `io.llmux.LLMux1.Error.<Name>`. Messages are one line a
person can act on; no facade ever shows a traceback to a caller.
"""

from __future__ import annotations


class LLMuxError(Exception):
    """Base of every error llmux reports to a caller."""

    #: the D-Bus error name suffix (io.llmux.LLMux1.Error.<bus_name>)
    bus_name = "Failed"
    #: the HTTP status the front end answers with
    http_status = 500
    #: OpenAI error envelope "type"
    openai_type = "server_error"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class UnknownModel(LLMuxError):
    bus_name = "NoSuchModel"
    http_status = 404
    openai_type = "invalid_request_error"

    def __init__(self, model: str, known: list[str] | tuple[str, ...] = ()):
        known_s = ", ".join(sorted(known)) or "none"
        super().__init__(f"model '{model}' does not exist; known models: {known_s}")
        self.model = model
        self.known = list(known)


class ModelPinned(LLMuxError):
    bus_name = "ModelPinned"
    http_status = 503
    openai_type = "service_unavailable"

    def __init__(self, model: str, pinned: str | None, retry_after: float | None = None, *, forceable: bool = False):
        target = f"'{pinned}'" if pinned else "the active model"
        # `forceable`: a control switch was refused; say how to move the pin instead
        hint = (f"; to move the pin to it and switch, force it: llmuxctl switch --force {model} "
                "(bus: SwitchWithOptions with force=true)") if forceable else ""
        super().__init__(
            f"llmux is in manual mode, pinned to {target}; '{model}' is not served until unpinned{hint}",
            retry_after=retry_after,
        )
        self.model = model
        self.pinned = pinned


class InvalidEviction(LLMuxError):
    bus_name = "InvalidEviction"
    http_status = 400
    openai_type = "invalid_request_error"


class PhaseError(LLMuxError):
    """`model` failed in `phase` for `reason`: the one message of SwitchFailed and BackendError.

    A shared base, not one error: the switcher reports SwitchFailed to callers, the backends
    raise BackendError to the switcher, and neither must catch the other.
    """

    def __init__(self, model: str, phase: str, reason: str, retry_after: float | None = None):
        super().__init__(f"model '{model}' failed to {phase}: {reason}", retry_after=retry_after)
        self.model = model
        self.phase = phase
        self.reason = reason


class SwitchFailed(PhaseError):
    """A switch to `model` failed in `phase` (start, sleep, wake, ready, ...)."""

    bus_name = "SwitchFailed"
    http_status = 502
    openai_type = "server_error"


class SwitchTimeout(LLMuxError):
    bus_name = "Timeout"
    http_status = 504
    openai_type = "timeout"

    def __init__(self, model: str, waited: float, retry_after: float | None = None):
        super().__init__(
            f"model '{model}' was not ready within {waited:.1f}s", retry_after=retry_after
        )
        self.model = model
        self.waited = waited


class QueueFull(LLMuxError):
    bus_name = "QueueFull"
    http_status = 429
    openai_type = "rate_limit_exceeded"

    def __init__(self, model: str, limit: int, retry_after: float | None = None):
        super().__init__(
            f"model '{model}' has {limit} requests queued already; retry later",
            retry_after=retry_after,
        )
        self.model = model
        self.limit = limit


class NotSupported(LLMuxError):
    bus_name = "NotSupported"
    http_status = 501
    openai_type = "server_error"


class InvalidConfig(LLMuxError):
    bus_name = "InvalidConfig"
    http_status = 500
    openai_type = "server_error"


class BackendError(PhaseError):
    """A backend operation failed: which model, which phase, why."""

    bus_name = "SwitchFailed"
    http_status = 502
