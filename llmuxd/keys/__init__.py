"""API keys: who may call, which models, at which rate, with which priority.

Pure: key files in, `ApiKey`s and admission decisions out; no aiohttp here
(the HTTP check is llmuxd/http/auth.py, DESIGN.md §2).
"""

from llmuxd.keys.errors import EXPIRED, INVALID, MISSING, InvalidApiKey, KeyLimited
from llmuxd.keys.files import CREDENTIAL_NAME, DEFAULT_KEYS_DIR, key_from_mapping, read_keys
from llmuxd.keys.limits import KeyLimits, KeyUsage, Ticket
from llmuxd.keys.model import ApiKey, generate_secret, hash_secret
from llmuxd.keys.store import KeyStore

__all__ = [
    "ApiKey", "KeyStore", "KeyLimits", "KeyUsage", "Ticket", "InvalidApiKey", "KeyLimited",
    "MISSING", "INVALID", "EXPIRED", "CREDENTIAL_NAME", "DEFAULT_KEYS_DIR",
    "generate_secret", "hash_secret", "key_from_mapping", "read_keys",
]
