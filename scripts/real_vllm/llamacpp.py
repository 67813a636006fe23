"""Where scripts/llamacpp-setup put llama-cpp-python's server and the SmolLM2 GGUF.

Shared by the tests that run it (tests/real_vllm/test_llamacpp.py, tests/test_llamacpp_service.py);
standard library only, like realvllm.py beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: the stamp scripts/llamacpp-setup writes last
READY_STAMP = ".ready"


@dataclass(frozen=True)
class LlamaCppCache:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def gguf(self) -> Path:
        return self.root / "models" / "smollm2.gguf"

    @property
    def command(self) -> list[str]:
        """llmux `command:` for an `engine: openai` model served by llama-cpp-python: one
        request at a time, and a new one waits instead of ending a running stream."""
        return [str(self.python), "-m", "llama_cpp.server", "--model", "${MODEL_PATH}",
                "--host", "${HOST}", "--port", "${PORT}", "--model_alias", "${MODEL_ID}",
                "--n_ctx", "512", "--interrupt_requests", "False"]


def default_cache_dir() -> Path:
    """The same choice scripts/llamacpp-setup makes (keep the two in step)."""
    env = os.environ.get("LLMUX_LLAMACPP_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/llmux-llamacpp")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llmux-llamacpp"


def find_cache() -> tuple[LlamaCppCache | None, str]:
    """The ready cache, or None and a one-line reason a person can act on."""
    root = default_cache_dir()
    cache = LlamaCppCache(root)
    if not (root / READY_STAMP).is_file():
        return None, (f"no llama.cpp test bed at {root} (set LLMUX_LLAMACPP_CACHE or run "
                      "scripts/llamacpp-setup: about 5 min and 350 MB)")
    for path in (cache.python, cache.gguf):
        if not path.exists():
            return None, f"llama.cpp test bed at {root} is incomplete ({path} missing): rerun scripts/llamacpp-setup"
    return cache, ""
