"""The ``${NAME}`` placeholders of an ``engine: openai`` model's command.

Such a server is started as written: llama-server takes ``--port``, llama-cpp-python
``--port`` too, Ollama an ``OLLAMA_HOST`` variable, TGI ``--hostname``, so llmux cannot add
its own flags as it does for vLLM. It fills in what it decides instead, with llama-swap's
spelling (``${PORT}``, ``${MODEL_ID}``) and two more for the host and the model path.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, List

#: name -> the model's key whose value replaces it
PLACEHOLDERS = {"PORT": "port", "HOST": "host", "MODEL_PATH": "model_path", "MODEL_ID": "name"}
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


def placeholders_in(args: Iterable[str]) -> List[str]:
    """Every ``${NAME}`` written in `args`, in order (unknown ones included)."""
    return [match.group(1) for arg in args for match in _PLACEHOLDER.finditer(arg)]


def fill(args: Iterable[str], model_config: Any) -> List[str]:
    """`args` with each known placeholder replaced by the model's value; an unknown one
    stays as written (the config check has refused it already)."""

    def value(match: "re.Match[str]") -> str:
        key = PLACEHOLDERS.get(match.group(1))
        return str(getattr(model_config, key)) if key else match.group(0)

    return [_PLACEHOLDER.sub(value, arg) for arg in args]
