"""Errors only the switcher raises (the shared ones live in llmuxd/errors.py)."""

from __future__ import annotations

from llmuxd.errors import LLMuxError


class InvalidMode(LLMuxError):
    bus_name = "InvalidArgument"
    http_status = 400
    openai_type = "invalid_request_error"

    def __init__(self, mode: object):
        super().__init__(f"unknown mode '{mode}'; allowed: auto, manual")


class ShuttingDown(LLMuxError):
    bus_name = "ShuttingDown"
    http_status = 503
    openai_type = "service_unavailable"

    def __init__(self, model: str):
        super().__init__(f"llmux is shutting down; the request for '{model}' was not served, retry shortly")
