"""The client llmux uses for any OpenAI-compatible server (`engine: openai`), and the HTTP
core the vLLM client (llmuxd/engine/vllm.py) builds on.

Servers without vLLM's sleep endpoints are evicted at process level only (freeze,
cuda_suspend, CRIU checkpoint, stop): their weights stay where they are (`retain`), which is
all `weight_strategies` declares. What the candidate servers do (reference/shared-host.md §D):

- llama.cpp's llama-server answers `/health` 503 while it loads the model, then 200;
- llama-cpp-python has no `/health` (its port opens once the model is loaded): readiness
  comes from `/v1/models` instead;
- both answer any `model` name with the one model they serve; llmux routes by name before
  forwarding, so a name it does not know never reaches them;
- llama-cpp-python generates one answer at a time and, by default, ends a running stream
  when a new request comes (`--interrupt_requests False` makes requests wait instead).

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
from llmuxd.errors import NotSupported
from llmuxd.eviction import ENGINE_WEIGHTS, WeightStrategy


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


class OpenAIClient:
    """One OpenAI-compatible server at `base_url` (e.g. "http://127.0.0.1:8101").

    Pass an aiohttp `ClientSession` to share connections with the rest of
    the daemon; without one the client opens its own and `close()` ends it.
    """

    #: what this engine can do with a sleeping model's weights (see llmuxd.eviction.ENGINE_WEIGHTS)
    weight_strategies: frozenset[WeightStrategy] = ENGINE_WEIGHTS["openai"]

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
        #: False once /health answered 404: readiness comes from /v1/models then
        self._has_health = True

    async def __aenter__(self) -> "OpenAIClient":
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
    ) -> tuple[int, str]:
        """One HTTP call; returns (status, text) for a 2xx, raises otherwise."""
        url = self.base_url + path
        try:
            async with self._get_session().request(
                method,
                url,
                params=list(params) if params else None,
                json=body,
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
        """One readiness probe: `/health` where the server has one (llama-server: 503 while
        it loads, then 200; TGI, SGLang: 200 when ready), else `/v1/models` (llama-cpp-python,
        Ollama: no /health, and the port opens once the model is loaded). Returns when ready,
        raises otherwise. A 404 from /health is remembered: later probes ask /v1/models only."""
        timeout = self.timeouts.health_probe if timeout is None else timeout
        if self._has_health:
            try:
                await self._call("GET", "/health", operation="health", timeout=timeout)
                return
            except BackendHTTPError as exc:
                if exc.status != 404:
                    raise
                self._has_health = False
        await self._call("GET", "/v1/models", operation="health (/v1/models)", timeout=timeout)

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
        """The server's version where it says one at `/version` (vLLM, SGLang), else ""."""
        try:
            data = await self._json("GET", "/version", operation="version", timeout=self.timeouts.info)
        except BackendHTTPError:
            return ""
        return str((data or {}).get("version", "") if isinstance(data, dict) else "")

    async def models(self) -> list[str]:
        """The served model names (ids of `/v1/models`)."""
        data = await self._json("GET", "/v1/models", operation="list models",
                                timeout=self.timeouts.info)
        return [str(m.get("id")) for m in (data or {}).get("data", []) if isinstance(m, dict)]

    # -------------------------------------------------- no sleep endpoints

    def _no_sleep_api(self, operation: str) -> NotSupported:
        return NotSupported(
            f"{operation}: the server at {self.base_url} has no vLLM sleep endpoints (engine 'openai'); "
            "it is evicted at process level: retain+freeze, retain+cuda_suspend, retain+checkpoint or retain+stop"
        )

    async def sleep(self, level: int = 1, mode: str = "abort") -> dict[str, Any]:
        raise self._no_sleep_api(f"sleep level {level}")

    async def wake_up(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        raise self._no_sleep_api("wake_up")

    async def is_sleeping(self) -> bool:
        """Never asleep at the HTTP level: a server that answers is awake (a frozen or
        stopped one does not answer). Raises when it does not answer."""
        await self.health()
        return False

    async def collective_rpc(self, method: str, **_: Any) -> list[Any] | None:
        raise self._no_sleep_api(f"collective_rpc {method}")

    async def reload_weights(self) -> None:
        raise self._no_sleep_api("reload_weights")

    async def reset_prefix_cache(self, *, reset_running_requests: bool = False) -> bool:
        raise self._no_sleep_api("reset_prefix_cache")

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
