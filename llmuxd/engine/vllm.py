"""The client llmux uses to talk to one vLLM server (or `llmux-vllm-sim`).

It speaks vLLM 0.32 as observed (reference/vllm-api.md): `/health` is 200
with an empty body; the dev routes (`/sleep`, `/wake_up`, `/is_sleeping`,
`/collective_rpc`, `/reset_prefix_cache`) exist only under
`VLLM_SERVER_DEV_MODE=1` and answer 404 `{"detail":"Not Found"}` otherwise;
errors come as `{"error":{"message",...}}`. A sleeping vLLM does not answer
inference with 503: it holds the request until wake, so every call here has
its own timeout and nothing waits on a 503.

`sleep()` defaults to `mode="abort"`, vLLM's own default, which ends
in-flight requests with `finish_reason: "abort"` — llmux drains before it
sleeps, so by then there is nothing to abort; pass `mode="wait"` to let the
backend drain, or `"keep"` to freeze requests until wake.

Every failure is one of `BackendUnreachable` (incl. `BackendExited`),
`BackendHTTPError(status, body)` or `BackendTimeout` (llmuxd/engine/errors.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import aiohttp

from llmuxd.engine.errors import (
    BackendExited,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    EngineError,
)

SLEEP_LEVELS = (0, 1, 2)
SLEEP_MODES = ("abort", "wait", "keep")
WAKE_TAGS = ("weights", "kv_cache", "scheduling")


@dataclass(frozen=True)
class EngineTimeouts:
    """Seconds per operation (llmux 0.7's values where it had one)."""

    health_probe: float = 5.0
    health_poll: float = 0.5
    sleep: float = 120.0
    wake: float = 30.0
    is_sleeping: float = 10.0
    reset_prefix_cache: float = 30.0
    reload_weights: float = 60.0
    collective_rpc: float = 30.0
    warmup: float = 30.0
    probe: float = 30.0
    metrics: float = 10.0
    info: float = 10.0


class VllmClient:
    """One backend at `base_url` (e.g. "http://127.0.0.1:8101").

    Pass an aiohttp `ClientSession` to share connections with the rest of
    the daemon; without one the client opens its own and `close()` ends it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeouts: EngineTimeouts = EngineTimeouts(),
    ):
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> "VllmClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    # ------------------------------------------------------------------ core

    async def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        timeout: float,
        params: Sequence[tuple[str, str]] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """One HTTP call; returns (status, text) for a 2xx, raises otherwise."""
        url = self.base_url + path
        try:
            async with self._get_session().request(
                method,
                url,
                params=list(params) if params else None,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(0.001, timeout)),
            ) as resp:
                text = await resp.text()
                status = resp.status
        except asyncio.TimeoutError:
            raise BackendTimeout(
                f"{operation} to {url} got no answer within {timeout:g}s",
                url=url,
                operation=operation,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, truncated body
            reason = str(exc) or type(exc).__name__
            raise BackendUnreachable(
                f"{operation} to {url} failed: {reason}; is the model process running?",
                url=url,
                operation=operation,
            ) from None
        if status >= 300:
            raise BackendHTTPError(status, text, url=url, operation=operation)
        return status, text

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        _, text = await self._call(method, path, **kw)
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise EngineError(
                f"{kw.get('operation', path)} to {self.base_url}{path} answered with non-JSON: "
                f"{text[:200]!r}",
                url=self.base_url + path,
                operation=kw.get("operation", ""),
            ) from None

    # ---------------------------------------------------------------- health

    async def health(self, timeout: float | None = None) -> None:
        """One probe of `/health`; returns when it is 200, raises otherwise
        (503 = engine dead)."""
        await self._call("GET", "/health", operation="health",
                         timeout=self.timeouts.health_probe if timeout is None else timeout)

    async def wait_healthy(
        self,
        deadline: float,
        *,
        process_alive: Callable[[], bool] | None = None,
    ) -> None:
        """Poll `/health` until it answers 200.

        `deadline` is a `time.monotonic()` value. Raises `BackendExited` as
        soon as `process_alive()` says the process is gone (a crashed start
        is not worth waiting out), `BackendTimeout` at the deadline."""
        started = time.monotonic()
        last: str = "no answer yet"
        while True:
            if process_alive is not None and not process_alive():
                raise BackendExited(
                    f"backend {self.base_url} exited before it was healthy (last: {last}); "
                    "see its log",
                    url=self.base_url,
                    operation="start",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTimeout(
                    f"backend {self.base_url} was not healthy within "
                    f"{time.monotonic() - started:.1f}s (last: {last}); raise startup_timeout "
                    "or see its log",
                    url=self.base_url,
                    operation="start",
                )
            try:
                await self.health(timeout=min(self.timeouts.health_probe, remaining))
                return
            except BackendHTTPError as exc:
                last = f"HTTP {exc.status}"
            except EngineError as exc:
                last = str(exc)
            await asyncio.sleep(
                max(0.0, min(self.timeouts.health_poll, deadline - time.monotonic()))
            )

    async def version(self) -> str:
        data = await self._json("GET", "/version", operation="version", timeout=self.timeouts.info)
        return str((data or {}).get("version", ""))

    async def models(self) -> list[str]:
        """The served model names (ids of `/v1/models`)."""
        data = await self._json("GET", "/v1/models", operation="list models",
                                timeout=self.timeouts.info)
        return [str(m.get("id")) for m in (data or {}).get("data", []) if isinstance(m, dict)]

    # ----------------------------------------------------------- sleep/wake

    async def sleep(self, level: int = 1, mode: str = "abort") -> dict[str, Any]:
        """`POST /sleep?level=&mode=`: 0 pauses scheduling, 1 offloads weights
        to host RAM, 2 discards them (wake then needs `reload_weights`).
        Sleeping an already sleeping backend is a no-op that succeeds."""
        if level not in SLEEP_LEVELS:
            raise ValueError(f"sleep level must be one of {SLEEP_LEVELS}, got {level!r}")
        if mode not in SLEEP_MODES:
            raise ValueError(f"sleep mode must be one of {SLEEP_MODES}, got {mode!r}")
        data = await self._json("POST", "/sleep", operation=f"sleep level {level}",
                                timeout=self.timeouts.sleep,
                                params=[("level", str(level)), ("mode", mode)])
        return data or {"status": "sleeping", "level": level}

    async def wake_up(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """`POST /wake_up[?tags=..]`; returns `{"status": "awake"|"sleeping",
        "tags": ...}` — "sleeping" after a partial wake, or when a named tag
        was not asleep (vLLM then wakes nothing)."""
        params = [("tags", t) for t in tags] if tags else None
        data = await self._json("POST", "/wake_up", operation="wake_up",
                                timeout=self.timeouts.wake, params=params)
        return data or {"status": "awake", "tags": list(tags) if tags else None}

    async def release_kv_cache_memory(self) -> None:
        """`POST /release_kv_cache_memory`: free the KV cache of an engine
        paused by `sleep(0)` (vLLM 0.32; 500 "requires a completed pause first"
        otherwise). vLLM on the CPU refuses it with 500 "Selective discard is
        not supported on CPU" (`refusal()` in llmuxd/engine/errors.py tells).
        Sent on a connection of its own: real vLLM answers that refusal from an
        unhandled exception, after which uvicorn drops the connection, and a
        pooled one would fail the next call (the sleep) with "connection reset"."""
        await self._call("POST", "/release_kv_cache_memory", operation="release_kv_cache_memory",
                         timeout=self.timeouts.sleep, headers={"Connection": "close"})

    async def is_sleeping(self) -> bool:
        data = await self._json("GET", "/is_sleeping", operation="is_sleeping",
                                timeout=self.timeouts.is_sleeping)
        if not isinstance(data, dict) or "is_sleeping" not in data:
            raise EngineError(f"is_sleeping on {self.base_url} answered {data!r}",
                              url=self.base_url, operation="is_sleeping")
        return bool(data["is_sleeping"])

    async def collective_rpc(
        self,
        method: str,
        *,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> list[Any] | None:
        """`POST /collective_rpc {"method": ...}` on every worker: the
        per-worker results, or None when vLLM answers with an empty body."""
        body: dict[str, Any] = {"method": method}
        if args:
            body["args"] = list(args)
        if kwargs:
            body["kwargs"] = dict(kwargs)
        if timeout is None:
            timeout = (self.timeouts.reload_weights if method == "reload_weights"
                       else self.timeouts.collective_rpc)
        data = await self._json("POST", "/collective_rpc", operation=f"collective_rpc {method}",
                                timeout=timeout, body=body)
        if isinstance(data, dict):
            return data.get("results")
        return data

    async def reload_weights(self) -> None:
        await self.collective_rpc("reload_weights")

    async def reset_prefix_cache(self, *, reset_running_requests: bool = False) -> bool:
        """True when vLLM reset it (False while blocks are held by requests)."""
        params = [("reset_running_requests", "true")] if reset_running_requests else None
        data = await self._json("POST", "/reset_prefix_cache", operation="reset_prefix_cache",
                                timeout=self.timeouts.reset_prefix_cache, params=params)
        if isinstance(data, dict):
            return bool(data.get("success", True))
        return True

    # ------------------------------------------------------------ inference

    async def _complete(self, model_name: str, prompt: str, max_tokens: int, *,
                        operation: str, timeout: float) -> dict[str, Any]:
        data = await self._json(
            "POST", "/v1/completions", operation=operation, timeout=timeout,
            body={"model": model_name, "prompt": prompt, "max_tokens": max_tokens,
                  "temperature": 0, "stream": False},
        )
        if not isinstance(data, dict) or not data.get("choices"):
            raise EngineError(f"{operation} on {self.base_url} answered without choices: "
                              f"{str(data)[:200]}", url=self.base_url, operation=operation)
        return data

    async def warmup(self, model_name: str, prompt: str = "Hello") -> None:
        """One 1-token completion at temperature 0, so the first real
        request after a start or wake does not pay for lazy initialisation."""
        await self._complete(model_name, prompt, 1, operation="warmup",
                             timeout=self.timeouts.warmup)

    async def probe(self, model_name: str, prompt: str, max_tokens: int = 16) -> str:
        """The deterministic (temperature 0) completion of `prompt`: compare it
        with the answer before a sleep to catch garbage weights after a
        level-2 wake (vLLM #29341)."""
        data = await self._complete(model_name, prompt, max_tokens, operation="probe",
                                    timeout=self.timeouts.probe)
        return str(data["choices"][0].get("text") or "")

    # -------------------------------------------------------------- metrics

    async def metrics(self) -> dict[str, float]:
        """`/metrics` as {"name{labels}": value} (samples only, comments dropped)."""
        _, text = await self._call("GET", "/metrics", operation="metrics",
                                   timeout=self.timeouts.metrics)
        return parse_prometheus(text)


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition, keyed as written (`name{labels}`)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:
            end = line.rindex("}") + 1
            key, rest = line[:end], line[end:].split()
        else:
            parts = line.split()
            key, rest = parts[0], parts[1:]
        if not rest:
            continue
        try:
            out[key] = float(rest[0])
        except ValueError:
            out[key] = math.nan
    return out


def metric_value(metrics: dict[str, float], name: str, **labels: str) -> float | None:
    """The first sample of `name` whose labels include `labels`, else None."""
    for key, value in metrics.items():
        base, _, lab = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            return value
    return None
