"""The OpenAI-compatible front end: routes, the request's way, error mapping.

A request's way (DESIGN.md §3): read the body within limits → find the model
(X-LLMux-Model header, else the JSON "model") → 404 for a model not in the
config → `switcher.acquire(model, request_timeout)` (this is where a request
waits for a switch) → forward to the lease's endpoint and stream back →
release the lease when the last byte is written or the client is gone.

Every failure becomes an OpenAI envelope in `_fail`, the one place where
llmux errors meet HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler  # stable in 3.8 .. 3.1x

from llmuxd.daemon.journal import FIELDS_ATTR
from llmuxd.errors import LLMuxError
from llmuxd.http.auth import KEY_HEADERS, NO_KEY, KeyGate, refusal_headers
from llmuxd.http.body import MODEL_HEADER, check_declared_length, model_from, read_body
from llmuxd.http.console import Console
from llmuxd.http.errors import ModelNotFound, RouteNotFound, error_response
from llmuxd.http.fleet import model_fleet_fields, register as register_fleet
from llmuxd.http.measured import measured
from llmuxd.http.naming import OVERRIDE_HEADER, ModelNames, with_model
from llmuxd.http.proxy import Upstream
from llmuxd.metrics import NO_MODEL, WAITED_THRESHOLD_S, Metrics
from llmuxd.priority import DEFAULT_PRIORITY

log = logging.getLogger(__name__)

#: vLLM inference routes outside /v1 that name a model in their body;
#: vLLM's control routes (/sleep, /wake_up, ...) are deliberately absent (I6)
EXTRA_MODEL_ROUTES = (
    "/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank",
    "/v2/embed", "/v2/rerank",
)

from llmuxd.http.measured import CLIENT_CLOSED  # noqa: E402 - the status of requests whose client went away

#: the daemon's own routes, for the not-found message
SERVED = ("POST /v1/... (with a model), GET /v1/models (or /models), GET /health, GET /metrics, "
          "GET /llmux/v1/state, GET /llmux/v1/events, GET /llmux/console")


class FrontEnd:
    """Builds the aiohttp application around a switcher."""

    def __init__(
        self,
        config: Any,
        switcher: Any,
        metrics: Metrics | None = None,
        *,
        upstream: Upstream | None = None,
        body_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        version: str = "",
        keys: KeyGate | None = None,
    ):
        self.switcher = switcher
        self.metrics = metrics if metrics is not None else Metrics()
        #: the API key check; its store stays empty (open) until the daemon loads keys
        self.keys = keys if keys is not None else KeyGate()
        self.reload(config)
        self.upstream = upstream or Upstream(
            read_timeout=self.request_timeout, write_timeout=self.request_timeout
        )
        self.body_timeout = body_timeout
        self.clock = clock
        self.version = version
        self.created = int(time.time())
        #: /llmux/console and /llmux/v1/events; each proxied request ends in `console.request_served`
        self.console = Console(self)

    def reload(self, config: Any) -> None:
        """Take a new config (models, limits, timeouts) for the next requests;
        requests already running keep what they started with."""
        self.config = config
        self.names = ModelNames(config)
        self.request_timeout = float(config.policy.request_timeout)
        self.max_body = int(config.max_body_bytes)

    def make_app(self) -> web.Application:
        # client_max_size is a backstop: bodies are read by read_body, never by request.read()
        app = web.Application(client_max_size=self.max_body)
        self.keys.install(app)
        m = self.metrics
        app.router.add_get("/v1/models", measured(m, self.list_models))
        app.router.add_get("/models", measured(m, self.list_models))  # llmux 0.7's alias of /v1/models
        app.router.add_get("/v1/models/{model:.+}", measured(m, self.get_model))
        app.router.add_get("/health", measured(m, self.health))
        app.router.add_get("/metrics", measured(m, self.metrics_page))
        register_fleet(app, self)
        self.console.register(app)
        app.router.add_post("/v1/{tail:.+}", measured(m, self.infer, by_path=True), expect_handler=self.expect)
        for path in EXTRA_MODEL_ROUTES:
            app.router.add_post(path, measured(m, self.infer), expect_handler=self.expect)
        app.router.add_route("*", "/{tail:.*}", measured(m, self.not_found))
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.upstream.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        # the server's drain is over (llmuxd/http/listen.py): streams still
        # running end after their current event instead of being cut anywhere
        self.upstream.end_streams()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.upstream.close()

    @property
    def model_names(self) -> list[str]:
        return list(self.config.models)

    def visible_models(self, key: Any) -> list[str]:
        """The models a request with `key` may know of (all without keys)."""
        return self.model_names if key is None else key.allowed(self.config.models)

    # -- inference ------------------------------------------------------------

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """Refuse an oversized body before the client sends it (curl sends
        `Expect: 100-continue` for large bodies)."""
        try:
            check_declared_length(request, self.max_body)
        except LLMuxError as exc:
            return error_response(exc)
        return await _default_expect_handler(request)

    async def infer(self, request: web.Request) -> web.StreamResponse:
        started = self.clock()
        model = NO_MODEL
        key = ticket = None
        status = 500
        wait = 0.0
        try:
            key = self.keys.check(request)  # 401 before the body is read
            body = await read_body(request, self.max_body, self.body_timeout)
            header = request.headers.get(MODEL_HEADER)
            if header is None:
                header = request.headers.get(OVERRIDE_HEADER)
            name = model_from(body, header)
            resolved = self.names.resolve(name)
            # a key's scope is on the model served (an alias of it counts as it)
            if resolved is None or (key is not None and not key.allows(resolved)):
                raise ModelNotFound(name, self.visible_models(key))
            model = resolved
            if header is not None or resolved != name:
                body = with_model(body, model)
            ticket = self.keys.admit(key)  # 429 under the key's limits
            waited_from = self.clock()
            try:
                lease = await self.switcher.acquire(
                    model, timeout=self.request_timeout,
                    priority=key.priority if key is not None else DEFAULT_PRIORITY)
            finally:
                wait = self.clock() - waited_from
            try:
                self.metrics.observe_queue_wait(model, wait)
                # llmux's key is not the backend's: it stays here, out of backend logs
                drop = KEY_HEADERS if key is not None else ()
                response = await self.upstream.forward(request, model, lease.endpoint, body, drop)
            finally:
                lease.release()
            status = response.status
            return response
        except LLMuxError as exc:
            response = self._fail(exc, model, key)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        except Exception:  # noqa: BLE001 - a bug must still answer in the envelope
            log.exception("unexpected error serving %s %s", request.method, request.path)
            response = self._fail(LLMuxError("internal error in llmux; see the daemon log"), model, key)
            status = response.status
            return response
        finally:
            if ticket is not None:
                ticket.release()
            duration = self.clock() - started
            self.metrics.observe_request(model, status, duration, wait > WAITED_THRESHOLD_S,
                                         key=key.id if key is not None else NO_KEY)
            self.console.request_served(request, model, status, wait, started, duration)

    def _fail(self, exc: LLMuxError, model: str, key: Any = None) -> web.Response:
        """The one mapping from llmux errors to responses."""
        retry_after = None
        if exc.retry_after is None and model != NO_MODEL and exc.http_status in (429, 503, 504):
            try:
                retry_after = float(self.switcher.wait_estimate(model))
            except Exception:  # noqa: BLE001 - an estimate is optional
                retry_after = None
        if exc.http_status >= 500:  # the key's id in the journal (LLMUX_KEY=), never its secret
            fields = {"LLMUX_MODEL": model or None, "LLMUX_KEY": key.id if key is not None else None}
            log.warning("%s -> %d: %s", model or "-", exc.http_status, exc,
                        extra={FIELDS_ATTR: {k: v for k, v in fields.items() if v}})
        return error_response(exc, retry_after=retry_after, headers=refusal_headers(exc))

    # -- model list, health, metrics -----------------------------------------

    def _status(self) -> Any:
        try:
            return self.switcher.status()
        except Exception:  # noqa: BLE001 - listing models must not fail on it
            log.exception("switcher.status() failed")
            return None

    def _model_entry(self, name: str, status: Any) -> dict:
        cfg = self.config.models[name]
        ms = (getattr(status, "models", None) or {}).get(name) if status is not None else None
        state = getattr(ms, "state", None)
        eviction = getattr(ms, "eviction", None) or getattr(cfg, "eviction", None)
        llmux: dict[str, Any] = {
            "state": getattr(state, "value", state) if state is not None else "unknown",
            "eviction": str(eviction) if eviction is not None else None,
        }
        for field in ("process_state", "group", "in_flight", "queue_depth", "last_error", "idle_left_s"):
            if ms is not None and hasattr(ms, field):
                llmux[field] = getattr(ms, field)
        llmux["aliases"] = self.names.aliases_of(name)
        preload = getattr(status, "preload", None) or {}
        if name in preload:
            llmux["preload"] = preload[name]
        if getattr(ms, "sleep_check", None):  # verified eviction's verdict, while the model sleeps
            llmux["sleep_check"] = ms.sleep_check
        fleet = model_fleet_fields(self, status, name)
        if fleet is not None:
            llmux["fleet"] = fleet
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "llmux",
            "root": getattr(cfg, "model_path", None),
            "parent": None,
            "llmux": llmux,
        }

    def _alias_entry(self, alias: str) -> dict:
        """An alias as /v1/models lists it: its own id, marked as an alias of its model."""
        model = self.names.aliases[alias]
        return {
            "id": alias,
            "object": "model",
            "created": self.created,
            "owned_by": "llmux",
            "root": getattr(self.config.models[model], "model_path", None),
            "parent": model,
            "llmux": {"alias_of": model},
        }

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            key = self.keys.check(request)
        except LLMuxError as exc:
            return self._fail(exc, NO_MODEL)
        status = self._status()
        visible = self.visible_models(key)
        data = [self._model_entry(name, status) for name in visible]
        data += [self._alias_entry(alias) for alias, model in self.names.aliases.items() if model in visible]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            key = self.keys.check(request)
        except LLMuxError as exc:
            return self._fail(exc, NO_MODEL)
        alias_of = self.names.aliases.get(name)
        if alias_of is not None and (key is None or key.allows(alias_of)):
            return web.json_response(self._alias_entry(name))
        if name not in self.config.models or (key is not None and not key.allows(name)):
            return error_response(ModelNotFound(name, self.visible_models(key)))
        return web.json_response(self._model_entry(name, self._status()))

    async def health(self, request: web.Request) -> web.Response:
        status = self._status()
        body: dict[str, Any] = {"status": "ok", "version": self.version}
        if status is not None:
            body.update(
                state=getattr(status, "state", None),
                mode=getattr(status, "mode", None),
                pinned=getattr(status, "pinned", None),
                active_models=list(getattr(status, "active_models", ()) or ()),
            )
            preload = getattr(status, "preload", None)
            if preload:
                body["preload"] = dict(preload)
        return web.json_response(body)

    async def metrics_page(self, request: web.Request) -> web.Response:
        status = self._status()
        if status is not None:
            self.metrics.refresh(status, self.model_names)
        payload, content_type = self.metrics.render()
        response = web.Response(body=payload)
        response.headers["Content-Type"] = content_type
        return response

    def make_metrics_app(self) -> web.Application:
        """The app of `metrics_port` (llmux 0.7's metrics server): GET /metrics only."""
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_route("*", "/{tail:.*}", self.metrics_not_found)
        return app

    async def metrics_not_found(self, request: web.Request) -> web.Response:
        return error_response(RouteNotFound(
            f"no route {request.method} {request.path} on the metrics port; it serves GET /metrics "
            "(inference is on the listen address)"))

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(
            RouteNotFound(f"no route {request.method} {request.path}; llmux serves {SERVED}")
        )
