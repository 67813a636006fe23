"""Who may call: the API key check of every inference route, and its names.

The key store itself is pure (llmuxd/keys); this module reads the key from the
request (`Authorization: Bearer KEY`, what OpenAI clients send, or
`x-api-key: KEY`), admits the request under the key's limits, and says where
other routes find the result:

- `request[API_KEY]`: the checked `ApiKey`, or None when keys are not configured
  (the daemon is open: loopback only, or `auth: none`);
- `app[KEY_STORE]`: the `KeyStore` in force (one object, its keys swapped on reload).

`authenticate(request)` is the one check, for the console's routes too.
Refusals are logged summed per minute (LLMUX_EVENT=key_refused / key_limited,
LLMUX_KEY=id), never one line per request and never with a secret.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

from aiohttp import web

from llmuxd.daemon.journal import EVENT_KEY_LIMITED, EVENT_KEY_REFUSED, log_event
from llmuxd.keys import ApiKey, InvalidApiKey, KeyLimited, KeyLimits, KeyStore, Ticket
from llmuxd.keys.limits import duration_text

log = logging.getLogger(__name__)

#: the checked key on an aiohttp request (ApiKey, or None when the daemon is open)
API_KEY = "llmux.api_key"
#: the KeyStore on the aiohttp application
KEY_STORE = "llmux.keys"
#: the per-key admission state (KeyLimits) on the aiohttp application
KEY_LIMITS = "llmux.key_limits"
#: the header besides Authorization that carries a key (Anthropic's and llama.cpp's)
API_KEY_HEADER = "x-api-key"
#: the headers that carry an llmux key: never forwarded to a backend when keys are checked
KEY_HEADERS = ("Authorization", API_KEY_HEADER)
#: what a 401 asks for (RFC 9110 §11.6.1)
WWW_AUTHENTICATE = 'Bearer realm="llmux"'
#: seconds over which refusals are summed into one log line
REFUSAL_LOG_INTERVAL = 60.0
#: the `key` label of requests without a key (open daemon, refused before a key was known)
NO_KEY = ""


def presented_secret(request: web.BaseRequest) -> Optional[str]:
    """The secret the client sent: `Authorization: Bearer S`, else `x-api-key: S`."""
    headers = request.headers
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, secret = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and secret.strip():
            return secret.strip()
    secret = headers.get(API_KEY_HEADER)
    return secret.strip() if secret and secret.strip() else None


def authenticate(request: web.BaseRequest) -> Optional[ApiKey]:
    """The request's key (None when keys are not configured), stored as
    `request[API_KEY]`; raises InvalidApiKey (401) for a missing, wrong,
    revoked or expired one. Checked once per request."""
    if API_KEY in request:
        return request[API_KEY]
    store: KeyStore = request.app[KEY_STORE]
    key = store.lookup(presented_secret(request)) if store.configured else None
    request[API_KEY] = key
    return key


def refusal_headers(exc: Any) -> Dict[str, str]:
    """The headers of a 401 or a key's 429 besides Retry-After: what the
    OpenAI client reads (`retry-after-ms` before `retry-after`) and the
    `x-ratelimit-*-<dimension>` headers of OpenAI's rate limits."""
    if isinstance(exc, InvalidApiKey):
        return {"WWW-Authenticate": WWW_AUTHENTICATE}
    if isinstance(exc, KeyLimited):
        dim = exc.dimension
        headers = {
            f"x-ratelimit-limit-{dim}": str(exc.limit),
            f"x-ratelimit-remaining-{dim}": str(exc.remaining),
            f"x-ratelimit-reset-{dim}": duration_text(exc.reset),
        }
        if exc.retry_after is not None:
            headers["retry-after-ms"] = str(max(1, math.ceil(exc.retry_after * 1000)))
        return headers
    return {}


class _RefusalLog:
    """One log line per kind and key per interval: how many were refused."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, interval: float = REFUSAL_LOG_INTERVAL):
        self.clock = clock
        self.interval = interval
        self._since: Dict[tuple, float] = {}
        self._count: Dict[tuple, int] = {}

    def note(self, kind: str, key_id: Optional[str], reason: str, peer: Optional[str]) -> None:
        slot = (kind, key_id, reason)
        now = self.clock()
        self._count[slot] = self._count.get(slot, 0) + 1
        since = self._since.get(slot)
        if since is not None and now - since < self.interval:
            return
        count = self._count.pop(slot)
        self._since[slot] = now
        if kind == EVENT_KEY_REFUSED:
            log_event(log, kind, "%d request(s) refused with a %s API key (last from %s)", count, reason,
                      peer or "?", level=logging.WARNING, reason=reason, count=count, peer=peer)
        else:
            log_event(log, kind, "key %s: %d request(s) refused by its %s limit", key_id, count, reason,
                      key=key_id, reason=reason, count=count)


class KeyGate:
    """The check of every inference route: key, then (after the model is
    known) the key's limits. Holds the store and the per-key state."""

    def __init__(self, store: Optional[KeyStore] = None, limits: Optional[KeyLimits] = None):
        self.store = store if store is not None else KeyStore()
        self.limits = limits if limits is not None else KeyLimits()
        self._refusals = _RefusalLog()

    def install(self, app: web.Application) -> None:
        with warnings.catch_warnings():  # plain string keys: the names other rooms use (module docstring)
            warnings.simplefilter("ignore")
            app[KEY_STORE] = self.store
            app[KEY_LIMITS] = self.limits

    def check(self, request: web.BaseRequest) -> Optional[ApiKey]:
        """`authenticate`, with refusals counted for the log."""
        try:
            return authenticate(request)
        except InvalidApiKey as exc:
            self._refusals.note(EVENT_KEY_REFUSED, None, exc.reason, request.remote)
            raise

    def admit(self, key: Optional[ApiKey]) -> Optional[Ticket]:
        """A place under the key's limits (None without a key), or KeyLimited (429)."""
        if key is None:
            return None
        try:
            return self.limits.admit(key)
        except KeyLimited as exc:
            self._refusals.note(EVENT_KEY_LIMITED, key.id, exc.dimension, None)
            raise

    def usage(self) -> Dict[str, Dict[str, Any]]:
        """Per key id: requests admitted, in flight now, refused by a limit, last use (epoch s)."""
        return {
            key_id: {"requests": u.requests, "in_flight": max(0, u.in_flight), "limited": u.limited,
                     "last_used": u.last_used}
            for key_id, u in self.limits.snapshot(k.id for k in self.store.keys()).items()
        }


def is_loopback(address: str) -> bool:
    """Is a `listen`-style address reachable only from this host? A unix
    socket is (file permissions guard it); a TCP host must be a loopback
    address or `localhost`."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: reachable from elsewhere


def exposure_problem(addresses: Iterable[str], keys_configured: bool, auth: str) -> Optional[str]:
    """Why serving on `addresses` without keys is refused, or None when it is fine."""
    if keys_configured or auth == "none":
        return None
    exposed: List[str] = [a for a in addresses if not is_loopback(a)]
    if not exposed:
        return None
    return (f"listening on {', '.join(exposed)}, which other hosts can reach, with no API keys: anyone there "
            "could use every model; add a key (llmuxctl keys add NAME) to keys_dir, listen on 127.0.0.1 only, "
            "or set 'auth: none' to serve without keys on purpose")
