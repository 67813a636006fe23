"""llmux 0.7 configurations, translated into this schema.

A JSON file (``.json``, or content that parses as JSON) is read as an llmux
0.7 config and loads unchanged: ``port`` becomes ``listen: 127.0.0.1:<port>``
(0.7 bound 0.0.0.0; we bind loopback unless ``listen`` says otherwise),
``vllm_command`` becomes the default ``command`` (``[vllm_command, "serve"]``),
``policy.policy_type`` / ``*_secs`` / ``*_ms`` become ``type`` / seconds,
``sleep_level`` (older 0.x) is a legacy eviction level, ``metrics_port: 0``
means off. In a JSON file a model without ``eviction`` gets
``policy.eviction`` or, when that is absent too, 0.7's effective default
``retain+stop``. The legacy keys are accepted in YAML as well, so a 0.7 config
converts by renaming the file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from llmuxd.config.issues import Issues, shown
from llmuxd.eviction import STOP_EVICTION

LEGACY_BIND_HOST = "127.0.0.1"
LEGACY_DEFAULT_EVICTION = STOP_EVICTION  # what llmux 0.7 gave a model without eviction
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
    "Config": ["port", "vllm_command"],
    "PolicyConfig": [*LEGACY_POLICY_KEYS, "sleep_level"],
    "ModelConfig": ["sleep_level"],
}


def translate_top_level(data: Dict[str, Any], raw: Mapping[str, Any], issues: Issues) -> List[str]:
    """Rewrite 0.7's top-level keys in `data` in place; return the default
    backend command (0.7's ``vllm_command``)."""
    if "port" in data:
        port = data.pop("port")
        if "listen" in raw:
            issues.add(("port",), "given together with 'listen'; keep only 'listen' (port is llmux 0.7's spelling)")
        elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            issues.add(("port",), f"expected a port number 1-65535, got {shown(port)}")
        else:
            data["listen"] = f"{LEGACY_BIND_HOST}:{port}"
    default_command = list(DEFAULT_COMMAND)
    if "vllm_command" in data:
        program = data.pop("vllm_command")
        if not isinstance(program, str) or not program.strip():
            issues.add(("vllm_command",), f"expected the vLLM program as a string, got {shown(program)}")
        else:
            default_command = [program, "serve"]
    if data.get("metrics_port") == 0 and not isinstance(data.get("metrics_port"), bool):
        data["metrics_port"] = None  # 0.7: 0 disables metrics
    return default_command


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
        if factor is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                unit = "milliseconds" if old.endswith("_ms") else "seconds"
                issues.add(("policy", old), f"expected a number of {unit}, got {shown(value)}")
                continue
            if value < 0:
                issues.add(("policy", old), f"negative duration {value!r}; durations must be 0 or more")
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
