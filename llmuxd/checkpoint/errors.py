"""Errors of the checkpoint room: one line each, what was wrong and the fix."""

from __future__ import annotations

from llmuxd.errors import BackendError, LLMuxError


class CheckpointError(BackendError):
    """A dump, restore, toggle or image operation failed for `model` in `phase`."""

    bus_name = "CheckpointFailed"


class ImageRejected(CheckpointError):
    """An image set exists but must not be restored (other model, changed config, corrupt)."""

    def __init__(self, model: str, reason: str):
        super().__init__(model, "restore", reason)


class CheckpointBusy(LLMuxError):
    """A second checkpoint/restore for a model while one is running."""

    bus_name = "Busy"
    http_status = 409
    openai_type = "server_error"
