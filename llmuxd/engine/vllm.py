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

from typing import Any, Sequence

from llmuxd.engine.errors import EngineError
from llmuxd.engine.openai import EngineTimeouts, OpenAIClient, metric_value, parse_prometheus  # noqa: F401 (their home was here)
from llmuxd.eviction import ENGINE_WEIGHTS, WeightStrategy

SLEEP_LEVELS = (0, 1, 2)
SLEEP_MODES = ("abort", "wait", "keep")
WAKE_TAGS = ("weights", "kv_cache", "scheduling")


class VllmClient(OpenAIClient):
    """One vLLM server (or `llmux-vllm-sim`) at `base_url`: the OpenAI-compatible core
    plus vLLM's sleep endpoints, so it can offload and discard its weights."""

    weight_strategies: frozenset[WeightStrategy] = ENGINE_WEIGHTS["vllm"]

    async def health(self, timeout: float | None = None) -> None:
        """One probe of `/health`; returns when it is 200, raises otherwise
        (503 = engine dead)."""
        await self._call("GET", "/health", operation="health",
                         timeout=self.timeouts.health_probe if timeout is None else timeout)

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

