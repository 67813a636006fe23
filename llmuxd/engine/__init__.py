"""How a backend is spoken to: `vllm.VllmClient` (health, sleep, wake_up, ...) and
`openai.OpenAIClient` (any other OpenAI-compatible server: process-level eviction only)."""

from llmuxd.engine.errors import (  # noqa: F401
    BackendExited,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    EngineError,
)
from llmuxd.engine.openai import OpenAIClient  # noqa: F401
from llmuxd.engine.vllm import EngineTimeouts, VllmClient  # noqa: F401

#: the client class of each `engine:` a model may name (llmuxd.eviction.ENGINE_WEIGHTS)
ENGINES = {"vllm": VllmClient, "openai": OpenAIClient}
