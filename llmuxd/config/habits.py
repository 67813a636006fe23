"""Rules for the keys users bring from llama-swap, Ollama and llmux 0.7
(issue 25): aliases, preload, idle_timeout, and what a 0.7 config meant.

Kept apart from llmuxd/config/checks.py so that each rule set stays short;
`check_habits` is called from `check_semantics` with the same `Issues`.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

from llmuxd.config.issues import Issues
from llmuxd.config.schema import Config
from llmuxd.eviction import ProcessStrategy, WeightStrategy

#: what an alias may be: any printable name without white space (clients send
#: "gpt-4o", "openai/gpt-4o", "llama3:8b"); it is never a unit name or a label
_ALIAS_RE = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")
#: directories llmuxd.service cannot share with the host (PrivateTmp=yes)
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp")
#: the eviction llmux 0.7.7 gave a model without one (its per-model serde default)
EVICTION_07 = "retain+stop"


def check_habits(config: Config, issues: Issues, *, legacy: bool = False) -> None:
    """Aliases, preload, idle timeouts and llmux 0.7 meanings (see the module docstring)."""
    _check_aliases(config, issues)
    _check_preload(config, issues)
    _check_idle_timeouts(config, issues)
    _note_07_evictions(config, issues, legacy=legacy)
    _check_images_dir(config, issues)


def _check_aliases(config: Config, issues: Issues) -> None:
    owners: Dict[str, str] = {}
    for name, model in config.models.items():
        loc = ("models", name, "aliases")
        seen: set = set()
        for alias in model.aliases:
            if not _ALIAS_RE.match(alias):
                issues.add(loc, f"{alias!r} is not a usable name; write it without spaces or control characters")
            elif alias in config.models:
                issues.add(loc, f"{alias!r} is the name of model '{alias}' ({issues.file_for(('models', alias))}); "
                                f"remove it from the aliases of model '{name}' or rename one of the two models")
            elif alias in owners and owners[alias] != name:
                other = owners[alias]
                where = issues.file_for(("models", other))
                issues.add(loc, f"{alias!r} is also an alias of model '{other}' ({where}); "
                                f"give it to one of '{other}' and '{name}' only")
            elif alias in seen:
                issues.add(loc, f"{alias!r} is listed twice; list it once")
            seen.add(alias)
            owners.setdefault(alias, name)


def _check_preload(config: Config, issues: Issues) -> None:
    seen: set = set()
    for i, name in enumerate(config.preload):
        loc = ("preload", i)
        target = config.resolve_model(name)
        if target is None:
            known = ", ".join(config.models) or "none"
            issues.add(loc, f"{name!r} is not a model; preload names models under 'models:' (known: {known})")
            continue
        if target in seen:
            issues.add(loc, f"'{target}' is preloaded twice; list it once")
            continue
        seen.add(target)
    _note_preload_budget(config, [n for n in (config.resolve_model(p) for p in config.preload) if n])


def _note_preload_budget(config: Config, preload: List[str]) -> None:
    """Say what happens when a group cannot hold every preloaded model awake."""
    by_group: Dict[str, List[str]] = {}
    for name in dict.fromkeys(preload):
        by_group.setdefault(config.models[name].gpu_group, []).append(name)
    for group, names in by_group.items():
        budget = config.groups[group].budget_gib if group in config.groups else None
        if budget is None and len(names) > 1:
            config.notes.append(
                f"preload: {', '.join(names)} share GPU group '{group}', which keeps one model awake: each is "
                f"started and woken in turn and put to sleep with its own eviction when the next wakes; "
                f"'{names[-1]}' stays awake")
        elif budget is not None:
            need = sum(config.models[n].gpu_memory_gib or 0.0 for n in names)
            if need > budget:
                config.notes.append(
                    f"preload: {', '.join(names)} need {need:g} GiB awake together, more than group '{group}''s "
                    f"budget_gib {budget:g}: the ones woken first are put to sleep when the later ones do not fit")


def _check_idle_timeouts(config: Config, issues: Issues) -> None:
    min_active = config.policy.min_active
    policy_idle = config.policy.idle_timeout
    if 0 < policy_idle < min_active:
        issues.warn(("policy", "idle_timeout"), _below_min_active(policy_idle, min_active))
    for name, model in config.models.items():
        own = model.idle_timeout
        if own is not None and 0 < own < min_active:
            issues.warn(("models", name, "idle_timeout"), _below_min_active(own, min_active))


def _below_min_active(idle: float, min_active: float) -> str:
    return (f"{idle:g}s is below policy.min_active {min_active:g}s: a model stays awake at least min_active "
            f"after it wakes, so an idle model is evicted after {min_active:g}s at the earliest; raise "
            "idle_timeout or lower min_active")


def _note_07_evictions(config: Config, issues: Issues, *, legacy: bool) -> None:
    """llmux 0.7's eviction pairs and defaults, said in llmux's words."""
    for name, model in config.models.items():
        ev = model.eviction
        inherited = name in issues.inherited_eviction
        loc = ("policy", "eviction") if inherited else ("models", name, "eviction")
        if ev.process is ProcessStrategy.STOP and ev.weights is not WeightStrategy.RETAIN:
            config.notes.append(
                f"models.{name}.eviction: '{ev}' stops the process as llmux 0.7 did (the weight step is "
                "skipped: the process and its memory are gone either way); 'retain+stop' says the same")
        group = config.groups.get(model.gpu_group)
        if ev.is_noop and (group is None or group.budget_gib is None):
            issues.warn(loc, (
                f"'{ev}' (model '{name}') evicts nothing, as in llmux 0.7: the model keeps its GPU memory while "
                f"another model of group '{model.gpu_group}' serves, so they must fit the GPU together (lower "
                "--gpu-memory-utilization); give the group a budget_gib and the models gpu_memory_gib to say so, "
                "or choose e.g. 'offload+keep_running'"))
        if legacy and inherited and str(ev) != EVICTION_07:
            issues.warn(("models", name), (
                f"sets no eviction, so it gets policy.eviction '{ev}' as llmux 0.7 documented; llmux 0.7.7 "
                f"itself applied '{EVICTION_07}' to such a model (its per-model default); write "
                f"\"eviction\": \"{EVICTION_07}\" to keep what 0.7.7 did"))


def _check_images_dir(config: Config, issues: Issues) -> None:
    images: Optional[str] = config.checkpoint.images_dir if config.checkpoint is not None else None
    if images is None:
        return
    top = "/" + images.strip("/").split("/", 1)[0]
    top2 = "/" + "/".join(images.strip("/").split("/")[:2])
    if top in PRIVATE_TMP_DIRS or top2 in PRIVATE_TMP_DIRS:
        issues.warn(("checkpoint", "images_dir"), (
            f"{images!r} is under {top2 if top2 in PRIVATE_TMP_DIRS else top}, which llmuxd.service sees as its "
            "own private /tmp (PrivateTmp=yes): images there are invisible to the host and lost when the service "
            "restarts (llmux 0.7's default was /tmp/llmux-checkpoints); use /var/lib/llmux/checkpoints (the "
            "default when images_dir is not set) or another directory, added with ReadWritePaths= in "
            "`systemctl edit llmuxd`"))
