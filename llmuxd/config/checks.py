"""Rules that span keys (groups and budgets, the checkpoint section, evictions,
flags llmux manages) and backend port allocation."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from llmuxd.config.issues import Issues
from llmuxd.config.placeholders import PLACEHOLDERS, placeholders_in
from llmuxd.config.schema import Config, ModelConfig
from llmuxd.eviction import STOP_EVICTION, EvictionError, ProcessStrategy, WeightStrategy, check_engine, overlap_problem


_MANAGED_FLAGS = {"--port": "port", "--host": "host", "--enable-sleep-mode": "sleep_mode", "--model": "model_path"}


def _plain_absolute(path: str) -> bool:
    """An absolute path that does not climb with '..' (checkpoint image paths)."""
    return path.startswith("/") and ".." not in path.split("/")


def _check_weights(config: Config, name: str, model: Any, group: Any, issues: Issues) -> None:
    """weights_gib against the budget, and policy.overlap: on against what cannot overlap (issue #26)."""
    loc = ("models", name, "weights_gib")
    weights = model.weights_gib
    if weights is not None and group.budget_gib is not None and weights > group.budget_gib:
        issues.add(loc, f"{weights:g} GiB of weights is more than the budget_gib {group.budget_gib:g} of group "
                   f"{model.gpu_group!r} (groups.{model.gpu_group}.budget_gib); lower it or raise the budget")
    elif weights is not None and model.gpu_memory_gib is not None and weights > model.gpu_memory_gib:
        issues.add(loc, f"{weights:g} GiB of weights is more than the model's gpu_memory_gib "
                   f"{model.gpu_memory_gib:g}, which includes them; lower it or raise gpu_memory_gib")
    if config.policy.overlap != "on":
        return
    why = overlap_problem(model.eviction)
    if why is None and group.budget_gib is None:
        why = f"its group {model.gpu_group!r} has no budget_gib, so two models' weights never share it"
    if why is None and weights is None:
        why = ("it has no weights_gib, so the budget at the widest point is unknown until a GPU probe "
               "measures its weights at its first wake")
    if why is None and weights <= group.budget_gib:  # (above it, the error says so already)
        peers = [o.weights_gib for n, o in config.models.items()
                 if n != name and o.gpu_group == model.gpu_group and o.weights_gib is not None]
        if peers and all(weights + w > group.budget_gib for w in peers):
            why = (f"its {weights:g} GiB of weights and any other model's in group {model.gpu_group!r} "
                   f"exceed budget_gib {group.budget_gib:g} together")
    if why is not None:
        issues.warn(("policy", "overlap"), f"'on', but model '{name}' cannot overlap its switches: {why}")


def check_semantics(config: Config, issues: Issues) -> None:
    """Rules that span keys: groups, budgets, checkpoint section, evictions."""
    if config.metrics_port is not None and config.metrics_port == config.listen_port:
        issues.add(("metrics_port",), f"{config.metrics_port} is the listen port, which serves /metrics "
                   "already; give metrics_port another port, or null")
    groups = config.groups
    for name, model in config.models.items():
        loc = ("models", name)
        group = groups.get(model.gpu_group)
        if group is None:
            defined = ", ".join(sorted(groups))
            issues.add(loc + ("gpu_group",), f"group {model.gpu_group!r} is not defined; define it under 'groups:' or use one of: {defined}")
            continue
        shared = group.budget_gib is not None
        if shared:
            if model.gpu_memory_gib is None:
                issues.add(loc + ("gpu_memory_gib",), f"required in group {model.gpu_group!r}, which has budget_gib {group.budget_gib:g}; give the GiB the model needs awake")
            elif model.gpu_memory_gib > group.budget_gib:
                issues.add(loc + ("gpu_memory_gib",), f"{model.gpu_memory_gib:g} GiB is more than the budget_gib {group.budget_gib:g} of group {model.gpu_group!r}; lower it or raise the budget")
        _check_weights(config, name, model, group, issues)
        if name in issues.inherited_eviction:
            eviction_loc: Tuple[Any, ...] = ("policy", "eviction")
            used_by = f" (the eviction of model '{name}', which sets none)"
        else:
            eviction_loc, used_by = loc + ("eviction",), ""
        if model.engine != "vllm":
            _check_openai_model(config, name, model, issues)
        if config.checkpoint is None:
            if model.eviction.process is ProcessStrategy.CHECKPOINT:
                issues.add(eviction_loc, f"'{model.eviction}'{used_by} needs a top-level 'checkpoint:' section; add 'checkpoint: {{}}' for the defaults or choose another process strategy")
            if model.checkpoint_path is not None:
                issues.add(loc + ("checkpoint_path",), "needs a top-level 'checkpoint:' section; add 'checkpoint: {}' for the defaults or remove checkpoint_path")
        if model.checkpoint_path is not None and not _plain_absolute(model.checkpoint_path):
            # added by the stress room: refused here, not only when a restore tries it
            issues.add(loc + ("checkpoint_path",), f"{model.checkpoint_path!r} must be an absolute path without '..'; give the image directory itself")
        if model.eviction.weights is not WeightStrategy.RETAIN and not model.sleep_mode:
            # allowed: vLLM's CPU build rejects --enable-sleep-mode, yet its dev-mode
            # /sleep still pauses the scheduler; on a GPU the sleep fails and escalates
            config.notes.append(
                f"models.{name}: sleep_mode is false, so '{model.eviction}' only pauses vLLM's "
                "scheduler (CPU builds) and frees no memory; on a GPU the sleep fails and llmux "
                "stops the model instead"
            )
        for flag, key in _MANAGED_FLAGS.items() if model.engine == "vllm" else ():
            if any(arg == flag or arg.startswith(flag + "=") for arg in model.extra_args):
                issues.add(loc + ("extra_args",), f"'{flag}' is set by llmux; remove it and use the model's '{key}' key")
        if model.gpus and len(model.gpus) < model.tensor_parallel_size:
            issues.add(
                loc + ("gpus",),
                f"lists {len(model.gpus)} GPU(s) but extra_args ask for tensor parallel size "
                f"{model.tensor_parallel_size}; list at least that many GPUs or leave gpus empty",
            )
        needs_cuda_ckpt = model.eviction.process in (ProcessStrategy.CUDA_SUSPEND, ProcessStrategy.CHECKPOINT)
        if needs_cuda_ckpt and model.tensor_parallel_size > 1:
            missing = [f for f in ("--enforce-eager", "--disable-custom-all-reduce") if f not in model.extra_args]
            if missing:
                config.notes.append(
                    f"models.{name}: tensor parallel {model.tensor_parallel_size} with '{model.eviction}' "
                    f"usually needs {' and '.join(missing)} in extra_args"
                )


def _check_openai_model(config: Config, name: str, model: ModelConfig, issues: Issues) -> None:
    """An `engine: openai` model: an eviction its engine can do, a command that says where
    the server listens. An eviction inherited from policy.eviction that the engine cannot do
    becomes retain+stop (what frees everything, llama-swap's only eviction), with a note."""
    loc = ("models", name)
    try:
        check_engine(model.eviction, model.engine, name)
    except EvictionError as exc:
        if name not in issues.inherited_eviction:
            issues.add(loc + ("eviction",), str(exc))
        else:
            config.notes.append(
                f"models.{name}: engine '{model.engine}' cannot do policy.eviction '{model.eviction}', "
                f"so the model sleeps with '{STOP_EVICTION}'; set its eviction to choose another")
            model.eviction = STOP_EVICTION
    argv = list(model.command) + list(model.extra_args)
    unknown = [p for p in placeholders_in(argv) if p not in PLACEHOLDERS]
    if unknown:
        allowed = ", ".join("${" + p + "}" for p in PLACEHOLDERS)
        issues.add(loc + ("command",), f"unknown placeholder ${{{unknown[0]}}}; allowed: {allowed}")
    if "PORT" not in placeholders_in(argv):
        issues.add(loc + ("command",), "engine 'openai' runs the command as written, so it must say where "
                   "the server listens: put ${PORT} in it (e.g. '--port', '${PORT}'), llmux fills in the model's port")
    if any("llama_cpp.server" in arg for arg in model.command) and "--interrupt_requests" not in argv:
        config.notes.append(
            f"models.{name}: llama-cpp-python ends a running stream when another request comes "
            "(interrupt_requests); add '--interrupt_requests False' to its command so requests wait their turn")


def allocate_ports(config: Config, issues: Issues) -> None:
    """Check explicit backend ports, then give the others the lowest free port
    in port_range (deterministic: only configured ports count, the OS is not
    probed, so the same file always gives the same ports)."""
    reserved: Dict[int, str] = {}
    if config.listen_port is not None:
        reserved[config.listen_port] = "the listen port"
    if config.metrics_port is not None:
        reserved.setdefault(config.metrics_port, "metrics_port")
    if config.admin_port is not None:
        reserved.setdefault(config.admin_port, "admin_port")
    owners: Dict[int, str] = {}
    fix = "give each model its own port, or omit port to pick a free one from port_range"
    for name, model in config.models.items():
        if model.port is None:
            continue
        if model.port in reserved:
            issues.add(("models", name, "port"), f"port {model.port} is {reserved[model.port]}; {fix}")
        elif model.port in owners:
            issues.add(("models", name, "port"), f"port {model.port} is also used by model '{owners[model.port]}'; {fix}")
        else:
            owners[model.port] = name
    low, high = config.port_range
    candidate = low
    for name, model in config.models.items():
        if model.port is not None:
            continue
        while candidate <= high and (candidate in owners or candidate in reserved):
            candidate += 1
        if candidate > high:
            issues.add(("models", name, "port"), f"no free port left in port_range {low}-{high}; widen port_range or set port")
            continue
        model.port = candidate
        owners[candidate] = name
