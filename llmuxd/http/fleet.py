"""`GET /llmux/v1/state`: this host's fleet signal, for the routers in front of a fleet.

A router that balances several llmux hosts (LiteLLM's proxy with
`llmuxd.fleet.litellm`, or a person running `llmuxctl fleet`) polls this to learn,
per model, whether it is awake here, how busy it is and how long a new request
would wait (the same `Switcher` estimate that sets `Retry-After`), and how much of
each GPU group's budget is in use. It is built from one `Switcher.status()`
snapshot and the configuration, so it costs what `/v1/models` costs; like
`/v1/models` it is readable without authentication and controls nothing.

The wire format is `llmuxd.fleet.signal.HostSignal`; the same numbers are on
`/metrics` through `llmuxd.metrics.FleetCollector`, and a model's `fleet` block
in `/v1/models` carries its per-model part.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from aiohttp import web

from llmuxd.errors import LLMuxError
from llmuxd.fleet.signal import STATE_PATH, GroupSignal, HostSignal, ModelSignal, fleet_state
from llmuxd.http.errors import error_response
from llmuxd.metrics import FleetCollector

log = logging.getLogger(__name__)

#: switcher states in which a model holds its GPU group's memory
OCCUPYING = frozenset({"active", "draining", "evicting", "waking"})
#: budget arithmetic tolerance (GiB), as the switcher's
_EPS = 1e-6
#: eviction process strategies that leave the backend loaded (a wake, not a cold start)
KEEPS_PROCESS = frozenset({"keep_running", "freeze", "cuda_suspend"})


def host_signal(config: Any, status: Any, version: str = "") -> HostSignal:
    """This host's signal from a `SwitcherStatus` and the configuration it runs."""
    occupying: Dict[str, list] = {}
    for name, ms in status.models.items():
        if ms.state in OCCUPYING:
            occupying.setdefault(ms.group, []).append(name)
    groups = {
        name: _group_signal(config, gs, occupying.get(name, []))
        for name, gs in status.groups.items()
    }
    queue_limit = int(config.policy.queue_limit)
    models = {
        name: _model_signal(config, status, name, ms, occupying.get(ms.group, []), queue_limit)
        for name, ms in status.models.items()
    }
    return HostSignal(
        version=version,
        mode=str(status.mode),
        pinned=status.pinned,
        policy=str(status.policy),
        queue_limit=queue_limit,
        models=models,
        groups=groups,
    )


def _memory(config: Any, model: str, budget: Optional[float]) -> float:
    """GiB a model takes in a budgeted group (the whole budget when it names none, as the switcher counts)."""
    mc = config.models.get(model)
    need = getattr(mc, "gpu_memory_gib", None) if mc is not None else None
    return float(need if need is not None else budget or 0.0)


def _group_signal(config: Any, gs: Any, occupying: list) -> GroupSignal:
    budget = gs.budget_gib
    if budget is None:
        used, ratio = None, float(len(occupying))
    else:
        used = sum(_memory(config, m, budget) for m in occupying)
        ratio = used / budget
    return GroupSignal(
        budget_gib=budget,
        used_gib=used,
        used_ratio=round(ratio, 4),
        awake=tuple(gs.active_models),
        state=str(gs.state),
    )


def _fits(config: Any, status: Any, name: str, occupying: list) -> bool:
    """Could `name` be woken now without putting another model of its group to sleep?"""
    others = [m for m in occupying if m != name]
    if name in occupying:
        return True
    group = status.groups.get(status.models[name].group)
    budget = getattr(group, "budget_gib", None)
    if budget is None:
        return not others
    used = sum(_memory(config, m, budget) for m in others)
    return used + _memory(config, name, budget) <= budget + _EPS


def _warm(ms: Any) -> bool:
    """Loaded on this host: awake, or woken here before and put away without stopping it."""
    if ms.state == "active":
        return True
    process = str(ms.eviction).partition("+")[2]
    return ms.state != "failed" and ms.last_switch_s is not None and process in KEEPS_PROCESS


def _model_signal(config: Any, status: Any, name: str, ms: Any, occupying: list, queue_limit: int) -> ModelSignal:
    state = fleet_state(ms.state)
    refused_by_pin = status.mode == "manual" and name != status.pinned and ms.state != "active"
    mc = config.models.get(name)
    return ModelSignal(
        state=state,
        switcher_state=str(ms.state),
        accepts=not refused_by_pin and ms.queue_depth < queue_limit,
        in_flight=int(ms.in_flight),
        queue_depth=int(ms.queue_depth),
        wait_estimate_s=round(float(ms.wait_estimate), 3),
        fits_without_eviction=_fits(config, status, name, occupying),
        warm=_warm(ms),
        group=str(ms.group),
        gpu_memory_gib=getattr(mc, "gpu_memory_gib", None),
        last_error=ms.last_error,
    )


def model_fleet_fields(frontend: Any, status: Any, name: str) -> Optional[Dict[str, Any]]:
    """The per-model part of the signal, for `/v1/models`' `llmux.fleet` block (None: no status)."""
    if status is None or name not in getattr(status, "models", {}):
        return None
    try:
        signal = host_signal(frontend.config, status, frontend.version).models[name]
    except Exception:  # noqa: BLE001 - listing models must not fail on it
        log.exception("could not build the fleet signal of %s", name)
        return None
    return {
        "state": signal.state,
        "accepts": signal.accepts,
        "wait_estimate_s": signal.wait_estimate_s,
        "fits_without_eviction": signal.fits_without_eviction,
        "warm": signal.warm,
    }


class FleetRoute:
    """The `/llmux/v1/state` handler and the fleet gauges of one front end."""

    def __init__(self, frontend: Any):
        self.frontend = frontend

    def current(self) -> Optional[HostSignal]:
        fe = self.frontend
        status = fe._status()
        return None if status is None else host_signal(fe.config, status, fe.version)

    async def state(self, request: web.Request) -> web.Response:
        signal = self.current()
        if signal is None:
            return error_response(LLMuxError("the switcher has no status; see the daemon log"))
        return web.json_response(signal.to_json(), headers={"Cache-Control": "no-store"})


def register(app: web.Application, frontend: Any) -> None:
    """Add the route to `app` (before any catch-all) and the fleet gauges to the front
    end's metrics registry (once per registry: an app may be built more than once)."""
    route = FleetRoute(frontend)
    app.router.add_get(STATE_PATH, route.state)
    metrics = frontend.metrics
    if not getattr(metrics, "_fleet_collector", None):
        metrics._fleet_collector = FleetCollector(route.current)
        metrics.registry.register(metrics._fleet_collector)
