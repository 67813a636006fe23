"""Secrets in a configuration, and how they are shown: never.

A key is secret by its name, wherever it sits (``checkpoint.object_store.
secret_key``, a model's ``env: {HF_TOKEN: ...}``, a future section's
``api_keys``): going by the name, not by a list of places, keeps a new
section safe without anyone remembering this module. Where a configuration
is shown to people (``llmuxd check-config``, a config error's message) each
such value is replaced by ``MASK``; the loaded Config keeps the real value,
the daemon needs it.

The access key id is not a secret (S3 logs and consoles show it); its secret
key, session tokens, passwords and API keys are.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

#: what a shown configuration has in place of a secret value
MASK = "(secret, not shown)"

_SECRET_NAME = re.compile(r"secret|token|passw(or)?d|passphrase|api[_-]?keys?$|credential|private[_-]?key",
                          re.IGNORECASE)


def is_secret(key: Any) -> bool:
    """Whether a value under this key name must not be shown."""
    return isinstance(key, str) and _SECRET_NAME.search(key) is not None


def is_secret_at(loc: Iterable[Any]) -> bool:
    """Whether the value at this key path (("models", "m", "env", "HF_TOKEN", ...)) is, or is inside, a secret."""
    return any(is_secret(part) for part in loc)


def masked(data: Any) -> Any:
    """A copy of plain config data (to_dict()) with every secret value masked
    (each item of a secret list, so their number still shows)."""
    if isinstance(data, dict):
        return {key: _mask_value(value) if is_secret(key) else masked(value) for key, value in data.items()}
    if isinstance(data, list):
        return [masked(item) for item in data]
    return data


def _mask_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [MASK for _ in value]
    if isinstance(value, dict):
        return {key: MASK for key in value}
    return MASK


def shown_at(loc: Iterable[Any], value: Any) -> str:
    """`issues.shown(value)` for a config error's message, unless the key is secret."""
    from llmuxd.config.issues import shown

    return "a value not shown (the key holds a secret)" if is_secret_at(tuple(loc)) else shown(value)
