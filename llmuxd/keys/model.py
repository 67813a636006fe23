"""One API key as the daemon knows it: who (id), which models, which limits.

The secret itself is never kept anywhere: a key file holds the sha256 of the
secret, and a presented secret is hashed and compared with every hash in
constant time (llmuxd/keys/store.py). The id is what logs, metrics and status
show; it is chosen by the operator and carries no secret.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Iterable, Optional, Tuple

from llmuxd.priority import DEFAULT_PRIORITY, Priority

#: what a key id may look like: it becomes a journal field, a metric label and a file name
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
KEY_ID_RULE = "1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
#: every generated secret starts with this, so that secret scanners and people recognise one
SECRET_PREFIX = "sk-llmux-"
#: the models of a key that names none: all of them
ALL_MODELS: Tuple[str, ...] = ("*",)


def hash_secret(secret: str) -> str:
    """The sha256 of a secret, as the 64 hex digits a key file holds."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_secret() -> str:
    """A new secret: 256 random bits, URL-safe, with a recognisable prefix."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """A key's id, scope and limits (`rate` in requests per second, refilling a
    bucket of `burst`); None means no limit. `expires` is an aware UTC time."""

    id: str
    sha256: str = field(repr=False, compare=False)
    models: Tuple[str, ...] = ALL_MODELS
    max_in_flight: Optional[int] = None
    rate: Optional[float] = None
    burst: Optional[int] = None
    priority: Priority = DEFAULT_PRIORITY
    expires: Optional[datetime] = None
    control: bool = False
    #: the file (or credential) the key was read from, for messages and `llmuxctl keys list`
    source: str = field(default="", compare=False)
    description: str = field(default="", compare=False)

    def allows(self, model: str) -> bool:
        """May this key use `model`? Names or shell-style globs (`llama-*`)."""
        for pattern in self.models:
            if pattern == "*" or pattern == model or fnmatchcase(model, pattern):
                return True
        return False

    def allowed(self, models: Iterable[str]) -> list:
        """The models of `models` this key may use, in their order."""
        return [m for m in models if self.allows(m)]

    def expired(self, now: Optional[datetime] = None) -> bool:
        if self.expires is None:
            return False
        return (now or datetime.now(timezone.utc)) >= self.expires

    def describe_limits(self) -> str:
        """The limits as `llmuxctl keys list` shows them."""
        parts = []
        if self.rate is not None:
            parts.append(f"{self.rate:g}/s burst {self.burst}")
        if self.max_in_flight is not None:
            parts.append(f"{self.max_in_flight} in flight")
        return ", ".join(parts) or "-"
