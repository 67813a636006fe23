"""The fleet signal: one host's state as a router needs it, and its JSON form.

`GET /llmux/v1/state` on every llmux host answers `HostSignal.to_json()`; routers
and `llmuxctl fleet` read it back with `HostSignal.from_json()`. Both sides use
this module, so a field is named in exactly one place. Standard library only:
this is imported inside LiteLLM's process.

Per model, a router needs what a new request would meet on this host:
- `state`: `awake` (serving now), `starting` (a switch is bringing it up),
  `asleep` (not on the GPU, or being put away: draining or evicting) or `failed`
  (its last wake failed or its backend died; the next request retries);
- `accepts`: False when a request would be refused at once (the host is in
  manual mode pinned to another model, or the model's queue is full);
- `in_flight`, `queue_depth`: requests being served, and waiting for it;
- `wait_estimate_s`: the switcher's own estimate of the seconds until it would
  serve a new request (the one behind `Retry-After`);
- `fits_without_eviction`: whether it can be woken without putting another model
  to sleep (its GPU group has room for it now);
- `warm`: its backend is loaded on this host (woken here before, and its eviction
  keeps the process: asleep in host RAM, frozen or suspended), so waking it costs a
  wake, not a cold start.
Per GPU group, the budget use: what is awake and how much of the budget it takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

#: where every llmux host serves its signal (readable without authentication)
STATE_PATH = "/llmux/v1/state"
#: the `object` field of a host signal, and its format version
OBJECT = "llmux.host_state"
FORMAT = 1

AWAKE, STARTING, ASLEEP, FAILED = "awake", "starting", "asleep", "failed"
STATES = (AWAKE, STARTING, ASLEEP, FAILED)

#: the switcher's model states (llmuxd.switching.state.ModelState values) as a router sees them
SWITCHER_TO_FLEET: Dict[str, str] = {
    "active": AWAKE,
    "waking": STARTING,
    "asleep": ASLEEP,
    "draining": ASLEEP,  # refusing new leases: about to be put to sleep
    "evicting": ASLEEP,
    "failed": FAILED,
}


class SignalError(ValueError):
    """A body that is not an llmux host signal (not llmux, or a newer format)."""


def fleet_state(switcher_state: str) -> str:
    """The fleet state of a switcher state; unknown states count as asleep (not serving)."""
    return SWITCHER_TO_FLEET.get(str(switcher_state), ASLEEP)


def state_url(base_url: str) -> str:
    """The signal's URL for a host given as its base or its OpenAI base (`…/v1`)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + STATE_PATH


@dataclass(frozen=True)
class ModelSignal:
    state: str
    switcher_state: str
    accepts: bool
    in_flight: int
    queue_depth: int
    wait_estimate_s: float
    fits_without_eviction: bool
    warm: bool = False
    group: str = "default"
    gpu_memory_gib: Optional[float] = None
    last_error: Optional[str] = None

    @property
    def load(self) -> int:
        return self.in_flight + self.queue_depth


@dataclass(frozen=True)
class GroupSignal:
    #: None: one model awake at a time (no memory budget configured)
    budget_gib: Optional[float]
    #: GiB held by awake models (None without a budget)
    used_gib: Optional[float]
    #: share of the group taken: used_gib / budget_gib, or awake models / 1 without a budget
    used_ratio: float
    awake: Tuple[str, ...] = ()
    state: str = "idle"


@dataclass(frozen=True)
class HostSignal:
    version: str
    mode: str
    pinned: Optional[str]
    policy: str
    queue_limit: int
    models: Dict[str, ModelSignal] = field(default_factory=dict)
    groups: Dict[str, GroupSignal] = field(default_factory=dict)

    @property
    def load(self) -> int:
        """Requests on this host: served plus waiting, all models."""
        return sum(m.load for m in self.models.values())

    def awake_models(self) -> List[str]:
        return sorted(n for n, m in self.models.items() if m.state == AWAKE)

    def to_json(self) -> Dict[str, Any]:
        body = asdict(self)
        for group in body["groups"].values():
            group["awake"] = list(group["awake"])
        return {"object": OBJECT, "format": FORMAT, **body}

    @classmethod
    def from_json(cls, data: Any) -> "HostSignal":
        """Parse a body; SignalError (one line) for anything that is not a signal we read."""
        if not isinstance(data, Mapping) or data.get("object") != OBJECT:
            raise SignalError("not an llmux host state (no \"object\": \"llmux.host_state\")")
        if data.get("format") != FORMAT:
            raise SignalError(f"host state format {data.get('format')!r}; this llmux reads format {FORMAT}")
        try:
            models = {str(n): _model(m) for n, m in dict(data.get("models") or {}).items()}
            groups = {str(n): _group(g) for n, g in dict(data.get("groups") or {}).items()}
            return cls(
                version=str(data.get("version", "")),
                mode=str(data.get("mode", "auto")),
                pinned=data.get("pinned"),
                policy=str(data.get("policy", "")),
                queue_limit=int(data.get("queue_limit", 0)),
                models=models,
                groups=groups,
            )
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SignalError(f"malformed llmux host state: {exc}") from None


def _model(m: Mapping[str, Any]) -> ModelSignal:
    memory = m.get("gpu_memory_gib")
    return ModelSignal(
        state=str(m["state"]) if m["state"] in STATES else ASLEEP,
        switcher_state=str(m.get("switcher_state", "")),
        accepts=bool(m.get("accepts", True)),
        in_flight=int(m.get("in_flight", 0)),
        queue_depth=int(m.get("queue_depth", 0)),
        wait_estimate_s=float(m.get("wait_estimate_s", 0.0)),
        fits_without_eviction=bool(m.get("fits_without_eviction", False)),
        warm=bool(m.get("warm", False)),
        group=str(m.get("group", "default")),
        gpu_memory_gib=None if memory is None else float(memory),
        last_error=m.get("last_error"),
    )


def _group(g: Mapping[str, Any]) -> GroupSignal:
    budget, used = g.get("budget_gib"), g.get("used_gib")
    return GroupSignal(
        budget_gib=None if budget is None else float(budget),
        used_gib=None if used is None else float(used),
        used_ratio=float(g.get("used_ratio", 0.0)),
        awake=tuple(str(a) for a in g.get("awake") or ()),
        state=str(g.get("state", "")),
    )
