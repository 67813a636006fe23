"""Why a request's key was refused: the errors the front end turns into 401 and 429.

They carry what OpenAI's clients read: `openai_code` (`invalid_api_key`,
`rate_limit_exceeded`), and for limits what the `x-ratelimit-*` headers say.
"""

from __future__ import annotations

from typing import Optional

from llmuxd.errors import LLMuxError

#: why a key was refused, as the 401 says it (never whether an id exists)
MISSING, INVALID, EXPIRED = "missing", "invalid", "expired"

_MESSAGES = {
    MISSING: ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY' (what OpenAI "
              "clients send with api_key=KEY) or as an 'x-api-key: KEY' header."),
    INVALID: "Incorrect API key provided. Check the key, or ask the host's administrator for one.",
    EXPIRED: "The API key provided has expired. Ask the host's administrator for a new one.",
}


class InvalidApiKey(LLMuxError):
    """401: no key, a key that matches none (wrong or revoked), or an expired one."""

    bus_name = "InvalidApiKey"
    http_status = 401
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"

    def __init__(self, reason: str):
        super().__init__(_MESSAGES[reason])
        self.reason = reason


class KeyLimited(LLMuxError):
    """429: the key's rate (`dimension` "requests") or in-flight limit
    ("in-flight") is reached. `limit`/`remaining`/`reset` feed the
    `x-ratelimit-*-<dimension>` headers; `retry_after` the `Retry-After`."""

    bus_name = "RateLimited"
    http_status = 429
    #: OpenAI names the limited dimension here; both limits count requests
    openai_type = "requests"
    openai_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, dimension: str, limit: int, remaining: int,
                 reset: float, retry_after: Optional[float]):
        super().__init__(message, retry_after=retry_after)
        self.dimension = dimension
        self.limit = limit
        self.remaining = remaining
        self.reset = reset
