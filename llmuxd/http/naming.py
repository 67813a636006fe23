"""Which model a request means: its own name, an alias (`aliases:` in the
config), given in the body, in the X-LLMux-Model header or in llmux 0.7's
`model-override` header; and the body the backend then gets.

A backend serves only its model's own name (`--served-model-name`), so a
request that named the model another way is forwarded with the body's
"model" rewritten to it; every other body is forwarded byte for byte.
Metrics and logs only ever see the model's own name.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

#: llmux 0.7's header (its proxy, onwards) naming the model instead of the body
OVERRIDE_HEADER = "model-override"


class ModelNames:
    """Every name a client may send, mapped to the model it means."""

    def __init__(self, config: Any):
        self.models: List[str] = list(config.models)
        self.aliases: Dict[str, str] = {
            alias: name for name, mc in config.models.items() for alias in (getattr(mc, "aliases", None) or [])
        }
        self._names: Dict[str, str] = {**self.aliases, **{name: name for name in self.models}}

    def resolve(self, name: str) -> Optional[str]:
        """The model `name` means, or None."""
        return self._names.get(name)

    def aliases_of(self, model: str) -> List[str]:
        return [alias for alias, name in self.aliases.items() if name == model]


def with_model(body: bytes, model: str) -> bytes:
    """`body` with its JSON "model" set to `model` (unchanged when it already says so,
    or names no model: the backend then serves its only model)."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return body
    if not isinstance(data, dict) or "model" not in data or data["model"] == model:
        return body
    data["model"] = model
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
