"""The console's routes: the page, its assets, the event stream and the controls.

- `GET /llmux/console` — the page (static files shipped in this package, no
  build step, no third-party code), served with a Content-Security-Policy that
  allows only this origin and no inline script or style.
- `GET /llmux/v1/events` — server-sent events (`curl -N` works): a `snapshot`
  first, then `status`, `state`, `mode`, `switch_started`, `switch_finished`,
  `requests` (gathered per 0.25 s) and `log` events, each with an id `EPOCH:SEQ`; a reader that sends
  `Last-Event-ID` (header, or `?last_event_id=`) gets what it missed, or a
  `gap` event saying what was lost followed by a fresh `snapshot`.
- `POST /llmux/v1/control` — `{"action": "switch"|"pin"|"unpin"|"sleep"|"eviction",
  "model": ..., "eviction": ...}`, only for a caller `control_access` admits.

Authentication is the front end's (API keys, `request["llmux.api_key"]`): the
page keeps a key the user types in the tab's sessionStorage and sends it as
`Authorization: Bearer` on every call, the event stream included (read with
fetch, not EventSource, which cannot send headers). No cookie is set, so no
other site can make the browser act with the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Tuple

from aiohttp import web

from llmuxd.errors import LLMuxError
from llmuxd.events import RequestServed
from llmuxd.http.auth import API_KEY, KEY_STORE, refusal_headers
from llmuxd.http.console.hub import EventHub, Reader
from llmuxd.http.proxy import FIRST_BYTE_AT

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGE_PATH = "/llmux/console"
ASSETS_PATH = "/llmux/console/static"
EVENTS_PATH = "/llmux/v1/events"
CONTROL_PATH = "/llmux/v1/control"
#: public: whether the stream needs a key, so the page asks for one before opening it
ABOUT_PATH = "/llmux/v1/console"
#: what a key needs to be created with for the controls to work
HOW_TO_CONTROL = "run `llmuxctl keys add NAME --control` as root and enter that key in the console."

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}

#: seconds a reader's batch may wait, so one wake-up and one write carry many events
#: (a write per reader costs ~0.1 ms: at 0.05 s, 10 readers cost a busy proxy ~10 % CPU)
FLUSH_EVERY = 0.25
#: seconds of silence after which a comment line keeps proxies and clients from timing out
KEEPALIVE_EVERY = 15.0
#: seconds one write to a reader may take before the reader is dropped
WRITE_DEADLINE = 30.0

ACTIONS = ("switch", "pin", "unpin", "sleep", "eviction")


class Forbidden(LLMuxError):
    bus_name = "AccessDenied"
    http_status = 403
    openai_type = "permission_error"


class BadControl(LLMuxError):
    http_status = 400
    openai_type = "invalid_request_error"


def _key(request: web.Request) -> Any:
    """The request's checked key (None when no keys are configured); InvalidApiKey
    (401) for a missing or wrong one when they are (`llmuxd.http.auth`)."""
    from llmuxd.http.auth import authenticate

    if request.app.get(KEY_STORE) is None:
        return None
    return authenticate(request)


def control_access(request: web.Request) -> Tuple[bool, str]:
    """The one gate of the console's controls: (allowed, why, in words for the page).

    Only a key created with control rights (`llmuxctl keys add NAME --control`,
    root only) may switch, pin, sleep or set evictions; without keys configured
    the console is read-only, so it never widens what polkit allows on the bus.
    A wrong key raises InvalidApiKey (401), as on every other route."""
    store = request.app.get(KEY_STORE)
    if store is None or not getattr(store, "configured", False):
        return False, f"read-only: no API keys are configured. To enable controls, {HOW_TO_CONTROL}"
    key = _key(request)
    if key is None or not getattr(key, "control", False):
        return False, (f"key '{getattr(key, 'id', '?')}' has no control rights. To use the controls, "
                       f"{HOW_TO_CONTROL}")
    return True, f"key '{key.id}' may use the controls"


def access_info(request: web.Request) -> Dict[str, Any]:
    allowed, why = control_access(request)
    store = request.app.get(KEY_STORE)
    key = request.get(API_KEY)
    return {"control": allowed, "why": why, "keys_configured": bool(getattr(store, "configured", False)),
            "key_id": getattr(key, "id", None)}


class Console:
    """The console of one front end: its hub, routes and the request summaries."""

    def __init__(self, frontend: Any, logs: Any = None):
        self.frontend = frontend
        self.hub = EventHub(self.status, logs=logs)
        self._unsubscribe: Any = None

    # -- sources ----------------------------------------------------------------

    def attach(self, switcher: Any, logs: Any = None) -> None:
        """Follow the switcher's events and (optionally) a log source."""
        if self._unsubscribe is None:
            self._unsubscribe = switcher.subscribe(self.hub.on_event)
        if logs is not None:
            self.hub.logs = logs
            logs.follow(self.hub.on_event)

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.hub.logs is not None:
            self.hub.logs.follow(None)
        self.hub.close()

    def request_served(self, request: web.BaseRequest, model: str, status: int,
                       waited: float, started: float, duration: float) -> None:
        """The one place a request summary enters the stream (called by the front end).
        `started` is the front end's clock at arrival; the time to first byte is
        the proxy's mark (`FIRST_BYTE_AT`), when there is one."""
        key = request.get(API_KEY)
        mark = request.get(FIRST_BYTE_AT)
        first_byte = mark - started if mark is not None and 0 <= mark - started <= duration else None
        self.hub.on_event(RequestServed(
            at=time.time() - duration, model=model, path=request.path, status=status, waited=waited,
            first_byte=first_byte, duration=duration, key_id=getattr(key, "id", None)))

    def status(self) -> Dict[str, Any]:
        """The models and groups as the page draws them, from one `Switcher.status()`."""
        from llmuxd.http.fleet import host_signal

        fe = self.frontend
        status = fe.switcher.status()
        signal = host_signal(fe.config, status, fe.version).to_json()
        models = {}
        for name, ms in status.models.items():
            cfg = fe.config.models.get(name)
            models[name] = {
                "state": str(ms.state), "process_state": ms.process_state, "eviction": str(ms.eviction),
                "group": ms.group, "in_flight": ms.in_flight, "queue_depth": ms.queue_depth,
                "wait_estimate": ms.wait_estimate, "last_error": ms.last_error,
                "last_switch_s": ms.last_switch_s,
                "gpu_memory_gib": getattr(cfg, "gpu_memory_gib", None),
                "pinned": status.pinned == name,
            }
        return {"version": fe.version, "mode": str(status.mode), "pinned": status.pinned,
                "state": status.state, "policy": str(status.policy), "models": models,
                "groups": signal.get("groups", {})}

    # -- routes -------------------------------------------------------------------

    def register(self, app: web.Application) -> None:
        app.router.add_get(PAGE_PATH, self.page)
        app.router.add_get(PAGE_PATH + "/", self.page)
        app.router.add_get(ASSETS_PATH + "/{name}", self.asset)
        app.router.add_get(EVENTS_PATH, self.events)
        app.router.add_post(CONTROL_PATH, self.control)
        app.router.add_get(ABOUT_PATH, self.about)

    async def about(self, request: web.Request) -> web.Response:
        store = request.app.get(KEY_STORE)
        return web.json_response({"keys_configured": bool(getattr(store, "configured", False)),
                                  "events": EVENTS_PATH, "control": CONTROL_PATH})

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={**PAGE_HEADERS, "Content-Type": CONTENT_TYPES[".html"]})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = STATIC / name
        if "/" in name or name.startswith(".") or path.suffix not in CONTENT_TYPES or not path.is_file():
            raise web.HTTPNotFound(text=f"no console asset {name!r}")
        return web.FileResponse(path, headers={**PAGE_HEADERS, "Content-Type": CONTENT_TYPES[path.suffix]})

    async def events(self, request: web.Request) -> web.StreamResponse:
        from llmuxd.http.errors import error_response

        try:  # with keys configured, reading needs one (any key): logs and key ids are not public
            _key(request)
        except LLMuxError as exc:
            return error_response(exc, headers=refusal_headers(exc))
        last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"})
        await response.prepare(request)
        extra = {"access": access_info(request)}
        reader = self.hub.connect(last_id, extra)
        try:
            await self._pump(request, response, reader, extra)
        except (ConnectionError, RuntimeError, asyncio.TimeoutError):
            pass  # the reader went away or stopped reading
        finally:
            self.hub.disconnect(reader)
        return response

    async def _pump(self, request: web.Request, response: web.StreamResponse, reader: Reader,
                    extra: Dict[str, Any]) -> None:
        if reader.closed and reader.frames:  # connected while llmuxd stops
            await asyncio.wait_for(response.write(b"".join(reader.take())), WRITE_DEADLINE)
        while not reader.closed:
            if not reader.frames and not reader.dropped:
                try:
                    await asyncio.wait_for(reader.wake.wait(), KEEPALIVE_EVERY)
                except asyncio.TimeoutError:
                    await asyncio.wait_for(response.write(b": keepalive\n\n"), WRITE_DEADLINE)
                    continue
                if reader.closed:
                    break
                await asyncio.sleep(FLUSH_EVERY)  # let a burst gather into one write
            frames = reader.take()
            if reader.dropped:
                frames = self.hub.resync(reader, extra)
            if frames:
                await asyncio.wait_for(response.write(b"".join(frames)), WRITE_DEADLINE)
        if self.hub.closed:
            await response.write(b'event: bye\ndata: {"reason":"llmuxd is stopping"}\n\n')

    async def control(self, request: web.Request) -> web.Response:
        from llmuxd.http.errors import error_response

        try:
            allowed, why = control_access(request)
        except LLMuxError as exc:  # a wrong or missing key: 401, as everywhere
            return error_response(exc, headers=refusal_headers(exc))
        if not allowed:
            return error_response(Forbidden(why))
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return error_response(BadControl("the body must be JSON: {\"action\": ..., \"model\": ...}"))
        if not isinstance(body, dict) or body.get("action") not in ACTIONS:
            return error_response(BadControl(f"action must be one of {', '.join(ACTIONS)}"))
        action, model = body["action"], body.get("model")
        switcher = self.frontend.switcher
        if action != "unpin" and (not isinstance(model, str) or model not in self.frontend.config.models):
            from llmuxd.errors import UnknownModel
            return error_response(UnknownModel(str(model), self.frontend.model_names))
        key = request.get(API_KEY)
        log.info("console: %s %s by key '%s'", action, model or "", getattr(key, "id", "?"))
        try:
            if action == "switch":
                await switcher.switch(model, wait=True, timeout=self.frontend.request_timeout, force=True)
            elif action == "pin":
                await switcher.pin(model)
            elif action == "unpin":
                await switcher.unpin()
            elif action == "sleep":
                await switcher.sleep_model(model)
            elif action == "eviction":
                switcher.set_eviction(model, body.get("eviction") or None)
        except LLMuxError as exc:
            return error_response(exc)
        except ValueError as exc:
            return error_response(BadControl(str(exc)))
        self.hub.status_soon()
        return web.json_response({"ok": True, "action": action, "model": model})
