"""The keys in force: looked up by secret in constant time, replaced whole on reload.

One long-lived object (the front end and the console hold it), whose table is
swapped in one assignment on reload, so a request sees either the old keys or
the new ones, never half of each.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Dict, Iterable, List, Optional, Tuple

from llmuxd.keys.errors import EXPIRED, INVALID, MISSING, InvalidApiKey
from llmuxd.keys.model import ApiKey


class KeyStore:
    """The configured keys. Empty: keys are not configured (`configured` is False)."""

    def __init__(self, keys: Iterable[ApiKey] = ()):
        self._table: Tuple[Tuple[bytes, ApiKey], ...] = ()
        self._by_id: Dict[str, ApiKey] = {}
        self.replace(keys)

    def replace(self, keys: Iterable[ApiKey]) -> None:
        """Put `keys` in force, all at once (reload)."""
        keys = list(keys)
        table = tuple((bytes.fromhex(k.sha256), k) for k in keys)
        by_id = {k.id: k for k in keys}
        self._table, self._by_id = table, by_id

    @property
    def configured(self) -> bool:
        return bool(self._table)

    def keys(self) -> List[ApiKey]:
        return [k for _, k in self._table]

    def get(self, key_id: str) -> Optional[ApiKey]:
        return self._by_id.get(key_id)

    def lookup(self, secret: Optional[str], now: Optional[datetime] = None) -> ApiKey:
        """The key whose secret this is, or InvalidApiKey (missing, invalid or expired).

        The secret is hashed and its sha256 compared with every key's, each with
        hmac.compare_digest and without stopping at a match, so the time taken
        says nothing about which key, or how much of one, matched."""
        if not secret:
            raise InvalidApiKey(MISSING)
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        found: Optional[ApiKey] = None
        for expected, key in self._table:
            if hmac.compare_digest(digest, expected):
                found = key
        if found is None:
            raise InvalidApiKey(INVALID)
        if found.expires is not None and found.expired(now):
            raise InvalidApiKey(EXPIRED)
        return found
