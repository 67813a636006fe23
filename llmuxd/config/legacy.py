"""llmux 0.7 configurations, translated into this schema.

A JSON file (``.json``, or content that parses as JSON) is read as an llmux
0.7 config and loads unchanged: ``port`` becomes ``listen: 127.0.0.1:<port>``
(0.7 bound 0.0.0.0; we bind loopback unless ``listen`` says otherwise),
``vllm_command`` becomes the default ``command`` (``[vllm_command, "serve"]``),
``policy.policy_type`` / ``*_secs`` / ``*_ms`` become ``type`` / seconds,
``sleep_level`` (older 0.x) is a legacy eviction level, ``metrics_port: 0``
means off, ``startup_timeout_secs`` (in 0.7's example configs; read by 0.9)
is the ``startup_timeout`` of every model that sets none. In a JSON file a
model without ``eviction`` gets ``policy.eviction`` or, when that is absent
too, 0.7's effective default ``retain+stop``, and a model without a startup
timeout gets 0.7.7's fixed 1800 s. The legacy keys are accepted in YAML as
well, so a 0.7 config converts by renaming the file.

What 0.7 documents and llmux does not do loads with a warning that says what
llmux does instead: ``admin_port`` (control is on D-Bus, authorized by polkit;
no unauthenticated port is opened) and ``max_sleeping`` (never implemented by
0.7 either). Zero values mean what they meant in 0.7: ``min_active_secs``,
``coalesce_window_ms``, ``max_wait_secs`` and ``min_quantum_ms`` 0 switch
without that wait, ``amortization_factor: 0`` switches as soon as a request
waits, ``tick_interval_ms: 0`` ticks as fast as the scheduler can;
``request_timeout_secs: 0`` is refused (see LEGACY_ZERO_TIMEOUT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from llmuxd.config.issues import Issues, shown
from llmuxd.config.schema import POLICY_TYPES, unknown_policy_message
from llmuxd.eviction import STOP_EVICTION

LEGACY_BIND_HOST = "127.0.0.1"
LEGACY_DEFAULT_EVICTION = STOP_EVICTION  # what llmux 0.7 gave a model without eviction
LEGACY_STARTUP_TIMEOUT = 1800.0  # llmux 0.7.7's fixed startup timeout (since 0.7.6)
LEGACY_METRICS_PORT = 9090  # where llmux 0.7 served metrics when metrics_port was absent
DEFAULT_COMMAND = ["vllm", "serve"]

LEGACY_POLICY_KEYS = {  # llmux 0.7 key -> (our key, factor to seconds or None)
    "policy_type": ("type", None),
    "request_timeout_secs": ("request_timeout", 1.0),
    "min_active_secs": ("min_active", 1.0),
    "coalesce_window_ms": ("coalesce_window", 0.001),
    "max_wait_secs": ("max_wait", 1.0),
    "tick_interval_ms": ("tick_interval", 0.001),
    "min_quantum_ms": ("min_quantum", 0.001),
}

#: 0.7 spellings each schema class also accepts (for "did you mean" suggestions)
LEGACY_KEYS: Dict[str, List[str]] = {
    "Config": ["port", "vllm_command", "startup_timeout_secs", "max_sleeping"],
    "PolicyConfig": [*LEGACY_POLICY_KEYS, "sleep_level"],
    "ModelConfig": ["sleep_level"],
}

LEGACY_ZERO_TIMEOUT = (
    "0 would turn away every request that has to wait for a switch (llmux 0.7 answered 504 "
    "to all of them but the one that started the switch); give the seconds a request may "
    "wait for its model, e.g. 300 (0.7's default)"
)

BUS_CALL = "busctl call io.llmux.LLMux1 /io/llmux/LLMux1 io.llmux.LLMux1.Manager"

#: llmux 0.7's control routes and what does the same here: (route, llmuxctl, bus method)
CONTROL_ROUTES: Tuple[Tuple[str, str, str], ...] = (
    ("GET /control/status", "llmuxctl status", "GetStatus"),
    ("POST /control/mode", "llmuxctl mode auto|manual", "SetMode s MODE"),
    ("POST /control/pin", "llmuxctl pin MODEL", "Pin s MODEL"),
    ("POST /control/unpin", "llmuxctl unpin", "Unpin"),
    ("POST /control/switch", "llmuxctl switch --force MODEL",
     "SwitchWithOptions sa{sv} MODEL 2 force b true wait b true"),
    ("GET /control/eviction", "llmuxctl eviction MODEL", "GetStatus"),
    ("POST /control/eviction", "llmuxctl eviction MODEL WEIGHTS+PROCESS", "SetEviction ss MODEL WEIGHTS+PROCESS"),
    ("POST /control/sleep", "llmuxctl sleep MODEL [WEIGHTS+PROCESS]", "Sleep ss MODEL WEIGHTS+PROCESS"),
    ("POST /control/wake", "llmuxctl wake MODEL", "Wake s MODEL"),
)


def admin_port_warning() -> str:
    """What admin_port users get instead of 0.7's unauthenticated control port."""
    routes = "; ".join(f"{route} -> {ctl} ({method})" for route, ctl, method in CONTROL_ROUTES)
    return (
        "not opened: llmux takes control calls on D-Bus (io.llmux.LLMux1, authorized by polkit), "
        f"never on an unauthenticated port; llmux 0.7's routes map to: {routes} "
        f"(methods: {BUS_CALL} METHOD ARGS); remove admin_port to silence this"
    )


MAX_SLEEPING_WARNING = (
    "not supported, ignored (llmux 0.7 ignored it as well); every model sleeps with its own "
    "eviction: give models whose sleeping process must not keep memory a '...+stop' or "
    "'...+checkpoint' eviction"
)


@dataclass
class ModelDefaults:
    """What a 0.7 top level says about every model that does not say otherwise."""

    command: List[str]
    startup_timeout: Optional[float] = None


def _seconds(value: Any, loc: Tuple[Any, ...], issues: Issues) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        issues.add(loc, f"expected a number of seconds, got {shown(value)}")
        return None
    if value < 0:
        issues.add(loc, f"negative duration {value!r}; durations must be 0 or more")
        return None
    return float(value)


def translate_top_level(data: Dict[str, Any], raw: Mapping[str, Any], issues: Issues, *,
                        legacy: bool = False) -> ModelDefaults:
    """Rewrite 0.7's top-level keys in `data` in place; return what they say
    about every model (``vllm_command``, ``startup_timeout_secs``)."""
    if "port" in data:
        port = data.pop("port")
        if "listen" in raw:
            issues.add(("port",), "given together with 'listen'; keep only 'listen' (port is llmux 0.7's spelling)")
        elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            issues.add(("port",), f"expected a port number 1-65535, got {shown(port)}")
        else:
            data["listen"] = f"{LEGACY_BIND_HOST}:{port}"
    defaults = ModelDefaults(list(DEFAULT_COMMAND), LEGACY_STARTUP_TIMEOUT if legacy else None)
    if "vllm_command" in data:
        program = data.pop("vllm_command")
        if not isinstance(program, str) or not program.strip():
            issues.add(("vllm_command",), f"expected the vLLM program as a string, got {shown(program)}")
        else:
            defaults.command = [program, "serve"]
    if "startup_timeout_secs" in data:
        seconds = _seconds(data.pop("startup_timeout_secs"), ("startup_timeout_secs",), issues)
        if seconds == 0:
            issues.warn(("startup_timeout_secs",), "0 ignored (llmux 0.7.7 ignored this key); models keep "
                        f"startup_timeout {defaults.startup_timeout or 600:g}s unless they set their own")
        elif seconds is not None:
            defaults.startup_timeout = seconds
            issues.notes.append(f"startup_timeout_secs: {seconds:g}s is the startup_timeout of every model that "
                                "sets none (llmux 0.7.7 ignored this key and waited 1800s; 0.9 reads it as here)")
    if "max_sleeping" in data:
        data.pop("max_sleeping")
        issues.warn(("max_sleeping",), MAX_SLEEPING_WARNING)
    if data.get("metrics_port") == 0 and not isinstance(data.get("metrics_port"), bool):
        data["metrics_port"] = None  # 0.7: 0 disables metrics
    elif legacy and "metrics_port" not in data:
        issues.notes.append(f"metrics_port: not set; llmux 0.7 served metrics on port {LEGACY_METRICS_PORT} "
                            "then, llmux serves /metrics on the listen address (and on metrics_port when set)")
    if data.get("admin_port") is not None:
        if data["admin_port"] == 0 and not isinstance(data["admin_port"], bool):
            data["admin_port"] = None
        issues.warn(("admin_port",), admin_port_warning())
    return defaults


def translate_policy(raw: Any, legacy: bool, issues: Issues) -> Any:
    """0.7's policy keys (``policy_type``, ``*_secs``, ``*_ms``, ``sleep_level``)
    as this schema's; a 0.7 JSON file without an eviction gets 0.7's default."""
    if not isinstance(raw, dict):
        return raw
    policy = dict(raw)
    for old, (new, factor) in LEGACY_POLICY_KEYS.items():
        if old not in policy:
            continue
        value = policy.pop(old)
        if new in raw:
            issues.add(("policy", old), f"given together with '{new}'; keep only '{new}'")
            continue
        if factor is None and value not in POLICY_TYPES:
            issues.add(("policy", old), unknown_policy_message(value))
            continue
        if factor is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                unit = "milliseconds" if old.endswith("_ms") else "seconds"
                issues.add(("policy", old), f"expected a number of {unit}, got {shown(value)}")
                continue
            if value < 0:
                issues.add(("policy", old), f"negative duration {value!r}; durations must be 0 or more")
                continue
            if value == 0 and new == "request_timeout":
                issues.add(("policy", old), LEGACY_ZERO_TIMEOUT)
                continue
            value = value * factor
        policy[new] = value
    translate_sleep_level(policy, raw, ("policy",), issues)
    if "eviction" not in policy and legacy:
        policy["eviction"] = LEGACY_DEFAULT_EVICTION
    return policy


def translate_sleep_level(section: Dict[str, Any], raw: Mapping[str, Any], loc: Tuple[Any, ...], issues: Issues) -> None:
    """0.x's ``sleep_level`` (before eviction existed) is a legacy eviction level."""
    if "sleep_level" not in section:
        return
    level = section.pop("sleep_level")
    if "eviction" in raw:
        issues.add(loc + ("sleep_level",), "given together with 'eviction'; keep only 'eviction'")
    else:
        section["eviction"] = level
