"""LiteLLM routing by what each llmux host has awake.

Add to the LiteLLM proxy's config (llmux installed in LiteLLM's environment,
`pip install 'llmux[fleet]'`, or on its PYTHONPATH)::

    litellm_settings:
      callbacks: ["llmuxd.fleet.litellm.llmux_routing"]

and list each llmux host as a deployment of each model it serves
(`llmuxctl fleet http://host1:3000 http://host2:3000` prints that model_list)::

    model_list:
      - model_name: qwen
        litellm_params: {model: openai/qwen, api_base: "http://host1:3000/v1", api_key: none}
      - model_name: qwen
        litellm_params: {model: openai/qwen, api_base: "http://host2:3000/v1", api_key: none}

How it hooks in: LiteLLM's router asks every callback's `async_filter_deployments`
which of a model group's healthy deployments may serve a request, then its own
routing strategy picks among those. This hook keeps the hosts where the model is
awake (all of them: the configured strategy balances between them) or, when it is
awake nowhere, the one host best placed to wake it (`llmuxd.fleet.ranking`). The
signal is polled in the background (`llmuxd.fleet.view`): the request path never
waits on the network, and a stale or unreachable host is skipped, never fatal —
with no usable signal at all, every deployment is returned and LiteLLM routes as
it would without llmux. A connection error seen by LiteLLM marks that host down
until its next successful poll, so retries go elsewhere at once.

Settings, from the environment of the LiteLLM process (or pass them to
`LLMuxRouting(...)` in a callbacks module of your own):
LLMUX_FLEET_REFRESH_S (default 1), LLMUX_FLEET_STALE_S (default 3 x refresh, at
least 2), LLMUX_FLEET_TIMEOUT_S (one poll; default refresh, between 0.5 and 2).

Python SDK users: `litellm.callbacks = [llmux_routing]` before building the Router.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Tuple

from litellm.integrations.custom_logger import CustomLogger

from llmuxd.fleet.view import DEFAULT_REFRESH_S, FleetView

log = logging.getLogger("llmux.fleet")

#: LiteLLM provider prefixes that speak OpenAI's API to `api_base` with the rest as the model name
OPENAI_COMPATIBLE = frozenset({"openai", "hosted_vllm", "text-completion-openai", "custom_openai"})
#: exception classes (by name, anywhere in an MRO along the exception's chain) that mean
#: "the host did not answer": LiteLLM reports a dropped connection as an InternalServerError
#: caused by openai's APIConnectionError, caused by httpx's and aiohttp's own errors
CONNECTION_ERRORS = frozenset({
    "APIConnectionError", "APITimeoutError", "ConnectError", "ConnectTimeout", "ClientConnectionError",
    "ConnectionError",
})


def deployment_target(deployment: Any) -> Optional[Tuple[str, str]]:
    """(host base URL, model name on the host) of a LiteLLM deployment; None when it
    does not name an OpenAI-compatible `api_base` (then it is not an llmux host)."""
    params = deployment.get("litellm_params") or {} if isinstance(deployment, dict) else {}
    base, model = params.get("api_base"), str(params.get("model") or "")
    if not base:
        return None
    provider, _, name = model.partition("/")
    if not name or provider not in OPENAI_COMPATIBLE:
        return None
    return str(base), name


def connection_failure(exc: Optional[BaseException]) -> bool:
    """Whether `exc` or anything that caused it is a failure to reach the host."""
    seen = 0
    while exc is not None and seen < 10:
        if any(c.__name__ in CONNECTION_ERRORS for c in type(exc).__mro__):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _env_float(name: str) -> Optional[float]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        log.error("llmux fleet: %s=%r is not a number of seconds; using the default", name, value)
        return None


class LLMuxRouting(CustomLogger):
    """The hook; `llmux_routing` below is the instance a proxy config names."""

    def __init__(self, *, refresh_s: Optional[float] = None, stale_s: Optional[float] = None,
                 timeout_s: Optional[float] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.view = FleetView(
            refresh_s=refresh_s or _env_float("LLMUX_FLEET_REFRESH_S") or DEFAULT_REFRESH_S,
            stale_s=stale_s if stale_s is not None else _env_float("LLMUX_FLEET_STALE_S"),
            timeout_s=timeout_s if timeout_s is not None else _env_float("LLMUX_FLEET_TIMEOUT_S"),
        )

    async def async_filter_deployments(self, model: str, healthy_deployments: List[dict], messages: Any,
                                       request_kwargs: Optional[dict] = None,
                                       parent_otel_span: Any = None) -> List[dict]:
        entries = []
        for index, deployment in enumerate(healthy_deployments):
            target = deployment_target(deployment)
            if target is not None:
                entries.append((index, *target))
        if not entries:
            return healthy_deployments
        try:
            chosen = self.view.choose(entries)
        except Exception:  # noqa: BLE001 - routing must go on without the signal
            log.exception("llmux fleet: choosing a deployment for %s failed; default routing", model)
            return healthy_deployments
        return [healthy_deployments[i] for i in chosen] or healthy_deployments

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        exc = kwargs.get("exception") if isinstance(kwargs, dict) else None
        if not connection_failure(exc):
            return
        params = kwargs.get("litellm_params") or {}
        base = params.get("api_base") or (kwargs.get("standard_logging_object") or {}).get("api_base")
        if base:
            self.view.mark_down(str(base), f"{type(exc).__name__} from LiteLLM")


llmux_routing = LLMuxRouting()
