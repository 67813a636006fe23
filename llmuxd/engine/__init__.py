"""How a backend is spoken to: `vllm.VllmClient` (health, sleep, wake_up, ...)."""

from llmuxd.engine.errors import (  # noqa: F401
    BackendExited,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    EngineError,
)
from llmuxd.engine.vllm import EngineTimeouts, VllmClient  # noqa: F401
