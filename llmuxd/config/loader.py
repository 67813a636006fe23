"""Reading configuration files: the main YAML (or llmux 0.7 JSON) file, its
``models.d/*.yaml`` drop-ins, and the way from raw data to a checked Config.

Where configuration comes from
    ``/etc/llmux/llmux.yaml`` (YAML), then every ``models.d/*.yaml`` beside it
    (or in an explicit ``dropin_dir``) in file-name order. A drop-in holds only
    ``models:``. **Merge rule: later files win per model** — a model defined
    again replaces the earlier definition as a whole (no key-by-key merge, so
    a drop-in never inherits half of someone else's eviction or args); each
    replacement is recorded in ``Config.notes``. ``Config.sources`` lists the
    files read, in order, and ``Config.model_sources`` which file defined
    each model.

In YAML a model without ``eviction`` gets ``policy.eviction``, else
``offload+keep_running``; llmux 0.7 JSON is translated by llmuxd/config/legacy.py.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from llmuxd.config.checks import allocate_ports, check_semantics
from llmuxd.config.habits import check_habits
from llmuxd.config.issues import ConfigError, ConfigIssue, Issues, shown, unknown_key_message
from llmuxd.config.legacy import (
    LEGACY_KEYS,
    ModelDefaults,
    translate_policy,
    translate_sleep_level,
    translate_top_level,
)
from llmuxd.config.schema import (
    DEFAULT_CONFIG_PATH,
    DROPIN_DIRNAME,
    CheckpointConfig,
    Config,
    GroupConfig,
    ModelConfig,
    ObjectStoreConfig,
    PolicyConfig,
)
from llmuxd.config.secrets import shown_at
from llmuxd.config.values import pyd, tensor_parallel_size_from_args
from llmuxd.eviction import DEFAULT_EVICTION, Eviction, EvictionError
from llmuxd.names import validate_model_name


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that rejects a key given twice in one mapping (plain YAML
    would silently keep the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: Dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader raises its own error below
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice; remove one", mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read(path: str) -> Tuple[Any, bool]:
    """(data, is_json). JSON by extension, or by content that parses as JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(ConfigIssue(path, "", f"cannot read: {exc.strerror or exc}")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(ConfigIssue(path, "", f"not UTF-8 text ({exc.reason}); save it as UTF-8")) from None
    is_json = path.endswith(".json")
    if not is_json and text.lstrip().startswith("{"):
        try:
            return json.loads(text), True
        except ValueError:
            pass  # YAML flow style; let YAML say what is wrong
    if is_json:
        try:
            return json.loads(text), True
        except json.JSONDecodeError as exc:
            raise ConfigError(
                ConfigIssue(path, "", f"line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}")
            ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), False
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "syntax error"
        if not isinstance(exc, yaml.constructor.ConstructorError):
            what += "; check the indentation and quoting there"
        raise ConfigError(ConfigIssue(path, "", f"{where}invalid YAML: {what}")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(ConfigIssue(path, "", f"invalid YAML: {exc}")) from None


def load_config(path: Optional[str] = None, dropin_dir: Optional[str] = None) -> Config:
    """Read the main file (default /etc/llmux/llmux.yaml) and its drop-ins;
    raise ConfigError listing every problem found."""
    path = path or DEFAULT_CONFIG_PATH
    data, is_json = _read(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            ConfigIssue(path, "", f"expected a mapping of keys (listen, models, policy, ...), got {shown(data)}")
        )
    data = dict(data)
    sources = [path]
    model_sources: Dict[str, str] = {}
    notes: List[str] = []
    warnings: List[ConfigIssue] = []
    models = data.get("models")
    if isinstance(models, dict):
        model_sources = {name: path for name in models}
        models = dict(models)
    directory = dropin_dir if dropin_dir is not None else os.path.join(os.path.dirname(path) or ".", DROPIN_DIRNAME)
    dropins = sorted(glob.glob(os.path.join(glob.escape(directory), "*.yaml")))
    for dropin in dropins:
        drop, _ = _read(dropin)
        sources.append(dropin)
        if drop is None:
            continue
        if not isinstance(drop, dict):
            raise ConfigError(ConfigIssue(dropin, "", f"expected a mapping with 'models:', got {shown(drop)}"))
        for key in drop:
            if key != "models":
                warnings.append(ConfigIssue(
                    dropin, str(key), "unknown key, ignored; a drop-in holds only 'models:' (other keys go in the main file)"
                ))
        drop_models = drop.get("models") or {}
        if not isinstance(drop_models, dict):
            raise ConfigError(
                ConfigIssue(dropin, "models", f"expected a mapping of model name to settings, got {shown(drop_models)}")
            )
        if not isinstance(models, dict):
            if models is not None:
                break  # the main file's models is wrong; _build reports it
            models = {}
        for name, model in drop_models.items():
            if name in models:
                notes.append(f"models.{name}: {dropin} replaces the definition in {model_sources[name]}")
            models[name] = model
            model_sources[name] = dropin
    if models is not None or dropins:
        data["models"] = models if models is not None else {}
    try:
        config = build(data, path, legacy=is_json, model_sources=model_sources)
    except ConfigError as exc:
        exc.warnings[:0] = warnings
        raise
    config.sources = sources
    config.notes = notes + config.notes
    config.warnings = [str(w) for w in warnings] + config.warnings
    return config


# -------------------------------------------------------------- normalising


def _to_argv(value: Any, loc: Tuple[Any, ...], issues: Issues) -> Any:
    """A string is shell-split; list items that are numbers become strings
    (YAML reads `- 0.9` as a float); anything else is left for pydantic."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            issues.add(loc, f"cannot split {value!r} into arguments ({exc}); use a list")
            return []
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                out.append(str(item))
            elif isinstance(item, str):
                out.append(item)
            else:
                issues.add(loc + (i,), f"expected a string, got {shown_at(loc, item)}; quote it")
        return out
    return value


def _normalise_model(name: Any, raw: Any, default_eviction: Any, defaults: ModelDefaults, issues: Issues) -> Any:
    loc = ("models", name)
    if raw is None:
        issues.add(loc, "has no settings; give at least model_path")
        return None
    if not isinstance(raw, dict):
        issues.add(loc, f"expected a mapping of settings (model_path, port, eviction, ...), got {shown(raw)}")
        return None
    model = dict(raw)
    if "name" in model and model["name"] != name:
        issues.add(loc + ("name",), f"is {shown(model['name'])} but the model's key is {name!r}; remove 'name' (the key is the name)")
    model["name"] = name
    if "tensor_parallel_size" in model:
        issues.add(loc + ("tensor_parallel_size",), "is read from extra_args; write '--tensor-parallel-size N' in extra_args instead")
        model.pop("tensor_parallel_size")
    translate_sleep_level(model, raw, loc, issues)
    if "eviction" in model:
        try:
            model["eviction"] = Eviction.parse(model["eviction"])
        except EvictionError as exc:
            issues.add(loc + ("eviction",), str(exc))
            model.pop("eviction")
    elif isinstance(default_eviction, Eviction):
        model["eviction"] = default_eviction
        issues.inherited_eviction.add(name)
    if "command" in model:
        model["command"] = _to_argv(model["command"], loc + ("command",), issues)
    else:
        model["command"] = list(defaults.command)
    if defaults.startup_timeout is not None:
        model.setdefault("startup_timeout", defaults.startup_timeout)
    if "extra_args" in model:
        model["extra_args"] = _to_argv(model["extra_args"], loc + ("extra_args",), issues)
        if isinstance(model["extra_args"], list):
            try:
                tensor_parallel_size_from_args(model["extra_args"])
            except ValueError as exc:
                issues.add(loc + ("extra_args",), str(exc))
                model.pop("extra_args")
    env = model.get("env")
    if isinstance(env, dict):
        fixed = {}
        for key, value in env.items():
            if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                issues.add(loc + ("env", str(key)), "invalid environment variable name; use letters, digits and '_', not starting with a digit")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                fixed[key] = str(value)
            else:
                fixed[key] = value
        model["env"] = fixed
    return model


def _normalise(raw: Mapping[str, Any], legacy: bool, issues: Issues) -> Dict[str, Any]:
    """Translate llmux 0.7 keys, inject model names and defaults, parse
    evictions; what is left is plain pydantic input."""
    data = dict(raw)
    defaults = translate_top_level(data, raw, issues, legacy=legacy)
    if isinstance(data.get("port_range"), str):
        match = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", data["port_range"])
        if match:
            data["port_range"] = [int(match.group(1)), int(match.group(2))]
        else:
            issues.add(("port_range",), f"invalid port range {data['port_range']!r}; write [LOW, HIGH] or 'LOW-HIGH'")
            data.pop("port_range")
    if legacy and "policy" not in data:
        data["policy"] = {}
    if "policy" in data:
        data["policy"] = translate_policy(data["policy"], legacy, issues)
    default_eviction: Any = DEFAULT_EVICTION
    policy = data.get("policy")
    if isinstance(policy, dict) and "eviction" in policy:
        try:
            default_eviction = policy["eviction"] = Eviction.parse(policy["eviction"])
        except EvictionError as exc:
            issues.add(("policy", "eviction"), str(exc))
            policy.pop("eviction")
            default_eviction = None
    models = data.get("models")
    if models is None and "models" in data:
        data["models"] = models = {}
    if isinstance(models, dict):
        fixed: Dict[str, Any] = {}
        for name, model in models.items():
            try:
                validate_model_name(name)
            except ValueError as exc:
                issues.add(("models", str(name)), str(exc))
                continue
            normal = _normalise_model(name, model, default_eviction, defaults, issues)
            if normal is not None:
                fixed[name] = normal
        data["models"] = fixed
    elif models is not None:
        issues.add(("models",), f"expected a mapping of model name to settings, got {shown(models)}")
        data.pop("models")
    groups = data.get("groups")
    if groups is None and "groups" in data:
        data.pop("groups")
    elif isinstance(groups, dict):
        data["groups"] = {name: ({} if group is None else group) for name, group in groups.items()}
    return data


_INTERNAL_FIELDS = ("name", "tensor_parallel_size", "sources", "model_sources", "notes", "warnings")


def _allowed_keys(model_cls: type) -> Tuple[List[str], List[str]]:
    """(keys a user writes, llmux 0.7 keys also accepted) of a schema class."""
    keys = [f for f in model_cls.__fields__ if f not in _INTERNAL_FIELDS]
    return keys, LEGACY_KEYS.get(model_cls.__name__, [])


def _schema_at(loc: Tuple[Any, ...]) -> Optional[type]:
    """The pydantic model class that owns the key at `loc` (for suggestions)."""
    if len(loc) == 1:
        return Config
    head = loc[0]
    if head == "policy" and len(loc) == 2:
        return PolicyConfig
    if head == "checkpoint" and len(loc) == 2:
        return CheckpointConfig
    if loc[:2] == ("checkpoint", "object_store") and len(loc) == 3:
        return ObjectStoreConfig
    if head == "models" and len(loc) == 3:
        return ModelConfig
    if head == "groups" and len(loc) == 3:
        return GroupConfig
    return None


_PYDANTIC_MESSAGES = {
    "value_error.missing": "required key is missing",
    "type_error.dict": "expected a mapping (key: value)",
    "type_error.list": "expected a list",
    "type_error.tuple": "expected a list",
    "type_error.none.not_allowed": "must not be null",
}
_MISSING_HINTS = {"model_path": "give a Hugging Face model id or a local directory"}


def _value_at(data: Any, loc: Tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _translate(error: Dict[str, Any], data: Mapping[str, Any]) -> Tuple[Tuple[Any, ...], str]:
    loc = tuple(error["loc"])
    kind = error["type"]
    if loc and loc[-1] == "__root__":
        loc = loc[:-1]
    if kind == "value_error.extra":
        schema = _schema_at(loc)
        allowed, legacy = _allowed_keys(schema) if schema else ([], [])
        return loc, unknown_key_message(loc[-1], allowed, legacy)
    if kind == "value_error.missing":
        hint = _MISSING_HINTS.get(str(loc[-1]))
        return loc, "required key is missing" + (f"; {hint}" if hint else "")
    if kind in _PYDANTIC_MESSAGES:
        message = _PYDANTIC_MESSAGES[kind]
        if kind != "value_error.missing":
            message += f", got {shown_at(loc, _value_at(data, loc))}"
        return loc, message
    if kind.startswith("value_error.tuple") or kind == "value_error.list.max_items":
        return loc, "expected a list of two port numbers [LOW, HIGH]"
    return loc, error["msg"]


def _drop(data: Dict[str, Any], loc: Tuple[Any, ...]) -> None:
    """Remove the key at `loc` (an unknown key) from the normalised data,
    copying the mappings on the way: the caller's data stays as it was."""
    node = data
    for part in loc[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return
        node[part] = node = dict(child)
    node.pop(loc[-1], None)


def _parse(data: Dict[str, Any], issues: Issues) -> Optional[Config]:
    """The Config, with unknown keys dropped and warned about; None (and the
    problems in `issues`) when anything else is wrong."""
    for _ in range(2):  # pydantic reports every unknown key at once; the second pass has none
        try:
            return Config.parse_obj(data)
        except pyd.ValidationError as exc:
            errors = exc.errors()
        unknown = [e for e in errors if e["type"] == "value_error.extra"]
        for error in unknown:
            loc, message = _translate(error, data)
            issues.warn(loc, message)
            _drop(data, tuple(error["loc"]))
        for error in errors:
            if error["type"] != "value_error.extra":
                loc, message = _translate(error, data)
                issues.add(loc, message)
        if issues.items or not unknown:
            return None
    return None  # pragma: no cover - the second pass has no unknown keys left


def build(raw: Mapping[str, Any], source: str, *, legacy: bool, model_sources: Dict[str, str]) -> Config:
    issues = Issues(source, model_sources)
    if not isinstance(raw, Mapping):
        issues.add((), f"expected a mapping of keys (listen, models, policy, ...), got {shown(raw)}")
        issues.raise_if_any()
    data = _normalise(raw, legacy, issues)
    config = _parse(data, issues)
    issues.raise_if_any()
    assert config is not None
    config.model_sources = {name: model_sources.get(name, source) for name in config.models}
    config.sources = [source]
    config.notes = list(issues.notes)
    check_semantics(config, issues)
    check_habits(config, issues, legacy=legacy)
    issues.raise_if_any()
    allocate_ports(config, issues)
    issues.raise_if_any()
    config.warnings = [str(w) for w in issues.warnings]
    return config
