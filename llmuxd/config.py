"""Configuration: the schema, the loader, and errors a person can act on.

Where configuration comes from
    ``/etc/llmux/llmux.yaml`` (YAML), then every ``models.d/*.yaml`` beside it
    (or in an explicit ``dropin_dir``) in file-name order. A drop-in holds only
    ``models:``. **Merge rule: later files win per model** — a model defined
    again replaces the earlier definition as a whole (no key-by-key merge, so
    a drop-in never inherits half of someone else's eviction or args); each
    replacement is recorded in ``Config.notes``. ``Config.sources`` lists the
    files read, in order, and ``Config.model_sources`` which file defined
    each model.

llmux 0.7 compatibility
    A JSON file (``.json``, or content that parses as JSON) is read as an
    llmux 0.7 config and loads unchanged: ``port`` becomes ``listen:
    127.0.0.1:<port>`` (0.7 bound 0.0.0.0; we bind loopback unless ``listen``
    says otherwise), ``vllm_command`` becomes the default ``command``
    (``[vllm_command, "serve"]``), ``policy.policy_type`` / ``*_secs`` /
    ``*_ms`` become ``type`` / seconds, ``sleep_level`` (older 0.x) is a legacy
    eviction level, ``metrics_port: 0`` means off. In a JSON file a model
    without ``eviction`` gets ``policy.eviction`` or, when that is absent too,
    0.7's effective default ``retain+stop``; in YAML the default is
    ``offload+keep_running``. The legacy keys are accepted in YAML as well, so a
    0.7 config converts by renaming the file.

Everything is validated by pydantic models written to the v1 API, imported
from ``pydantic.v1`` on pydantic 2 and from ``pydantic`` on 1.10 (Debian 12),
so both behave the same. Scalars use small strict types (no "5" -> 5
coercion) whose messages are ours. All durations are float seconds.
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

try:  # pydantic 2 ships the v1 API under pydantic.v1
    import pydantic.v1 as pyd
except ImportError:  # pragma: no cover - pydantic 1.10 (Debian 12)
    import pydantic as pyd  # type: ignore[no-redef]

from llmuxd.errors import InvalidConfig
from llmuxd.eviction import (
    DEFAULT_EVICTION,
    STOP_EVICTION,
    Eviction,
    EvictionError,
    ProcessStrategy,
    WeightStrategy,
)
from llmuxd.names import validate_model_name

DEFAULT_CONFIG_PATH = "/etc/llmux/llmux.yaml"
DROPIN_DIRNAME = "models.d"
DEFAULT_LISTEN = "127.0.0.1:3000"
DEFAULT_PORT_RANGE = (8100, 8999)
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_STATE_DIR = "/var/lib/llmux"
DEFAULT_GROUP = "default"
LEGACY_BIND_HOST = "127.0.0.1"
LEGACY_DEFAULT_EVICTION = STOP_EVICTION  # what llmux 0.7 gave a model without eviction
POLICY_TYPES = ("fifo", "cost_aware", "time_slice")


# --------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: where (file, key path) and what to do about it."""

    file: str
    path: str  # dotted key path, "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}" if self.path else f"{self.file}: {self.message}"


class ConfigError(InvalidConfig):
    """The configuration is invalid; ``str()`` has one line per problem,
    ``FILE: KEY.PATH: what was wrong; what is allowed``."""

    def __init__(self, issues: "list[ConfigIssue] | ConfigIssue"):
        if isinstance(issues, ConfigIssue):
            issues = [issues]
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


def _show(value: Any) -> str:
    """A value as the user wrote it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, Mapping)):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _unknown_key_message(key: Any, allowed: Iterable[str], legacy: Iterable[str] = ()) -> str:
    """'did you mean' the closest key (legacy llmux 0.7 spellings included),
    else the list of current keys."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(key), allowed + sorted(legacy), n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; allowed keys: {', '.join(allowed)}"


# ------------------------------------------------------------- scalar parsing

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)")
DURATION_HELP = "write seconds as a number or a string like '500ms', '30s', '5m', '1h', '1m30s'"


def parse_duration(value: Any) -> float:
    """Seconds from a number or '500ms' / '30s' / '5m' / '1h' / '1m30s';
    raises ValueError with what is allowed."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a duration, got {_show(value)}; {DURATION_HELP}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            raise ValueError(f"duration {_show(value)} is too large; {DURATION_HELP}") from None
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("-"):
            raise ValueError(f"negative duration {value!r}; durations must be 0 or more")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos and text[pos : match.start()].strip():
                    break
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos == 0 or text[pos:].strip():
                raise ValueError(f"invalid duration {value!r}; {DURATION_HELP}") from None
    else:
        raise ValueError(f"expected a duration, got {_show(value)}; {DURATION_HELP}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {value!r}; {DURATION_HELP}")
    if seconds < 0:
        raise ValueError(f"negative duration {value!r}; durations must be 0 or more")
    return seconds


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}  # fmt: skip
_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?)\s*([a-z]*)$")
SIZE_HELP = "write a number of bytes or a string like '16MiB', '512KiB', '1GB'"


def parse_size(value: Any) -> int:
    """Bytes from an int or '16MiB' / '1GB'; raises ValueError."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a size, got {_show(value)}; {SIZE_HELP}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value.strip().lower())
        if not match or match.group(2) not in _SIZE_UNITS:
            raise ValueError(f"invalid size {value!r}; {SIZE_HELP}")
        number = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
        if math.isinf(number):
            raise ValueError(f"size {value!r} is too large; {SIZE_HELP}")
        size = int(number)
    else:
        raise ValueError(f"expected a size, got {_show(value)}; {SIZE_HELP}")
    if size <= 0:
        raise ValueError(f"size must be more than 0, got {_show(value)}; {SIZE_HELP}")
    return size


def parse_listen(listen: str) -> Tuple[str, str, int]:
    """``("tcp", host, port)`` for 'host:port' / '[v6]:port', ``("unix", path, 0)``
    for 'unix:/path'; raises ValueError."""
    help_ = "write 'HOST:PORT' (e.g. '127.0.0.1:3000', '[::1]:3000') or 'unix:/absolute/path'"
    if not isinstance(listen, str):
        raise ValueError(f"expected a string, got {_show(listen)}; {help_}")
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"invalid listen address {listen!r}; {help_}")
        return ("unix", path, 0)
    host, sep, port_s = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port_s.isascii() and port_s.isdigit()) or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"invalid listen address {listen!r}; {help_}")
    return ("tcp", host, int(port_s))


def tensor_parallel_size_from_args(args: List[str]) -> int:
    """The TP size vLLM will use, read from its argv: ``--tensor-parallel-size N``,
    ``--tensor-parallel-size=N``, ``-tp N`` / ``-tp=N``; 1 when absent."""
    size = 1
    for i, arg in enumerate(args):
        for flag in ("--tensor-parallel-size", "-tp"):
            raw = None
            if arg == flag and i + 1 < len(args):
                raw = args[i + 1]
            elif arg.startswith(flag + "="):
                raw = arg[len(flag) + 1 :]
            if raw is not None:
                if not raw.isdigit() or int(raw) < 1:
                    raise ValueError(
                        f"{flag} must be a whole number of GPUs (1 or more), got {raw!r}"
                    )
                size = int(raw)
    return size


# ------------------------------------------------------ strict pydantic types


def _strict(name: str, check):
    """A pydantic (v1 API) field type whose only validator is `check`;
    pydantic reports its TypeError/ValueError message verbatim."""

    def __get_validators__(cls):  # noqa: N807
        yield check

    return type(name, (), {"__get_validators__": classmethod(__get_validators__)})


def _check_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {_show(v)}; quote it")
    return v


def _check_nonempty_str(v: Any) -> str:
    if not _check_str(v).strip():
        raise ValueError("must not be empty")
    return v


def _check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {_show(v)}")
    return v


def _check_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected a whole number, got {_show(v)}")
    return v


def _check_port(v: Any) -> int:
    if not 1 <= _check_int(v) <= 65535:
        raise ValueError(f"port {v} is out of range; use 1-65535")
    return v


def _check_positive_int(v: Any) -> int:
    if _check_int(v) < 1:
        raise ValueError(f"must be 1 or more, got {v}")
    return v


def _check_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number, got {_show(v)}")
    return float(v)


def _check_positive_number(v: Any) -> float:
    if not _check_number(v) > 0:
        raise ValueError(f"must be more than 0, got {_show(v)}")
    return float(v)


def _check_gpu_index(v: Any) -> int:
    if _check_int(v) < 0:
        raise ValueError(f"GPU index must be 0 or more, got {v}")
    return v


def _check_positive_duration(v: Any) -> float:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError(f"must be more than 0, got {_show(v)}; {DURATION_HELP}")
    return seconds


def _check_listen(v: Any) -> str:
    parse_listen(v)
    return v


Str = _strict("Str", _check_str)
NonEmptyStr = _strict("NonEmptyStr", _check_nonempty_str)
Bool = _strict("Bool", _check_bool)
Int = _strict("Int", _check_int)
Port = _strict("Port", _check_port)
PositiveInt = _strict("PositiveInt", _check_positive_int)
PositiveNumber = _strict("PositiveNumber", _check_positive_number)
GpuIndex = _strict("GpuIndex", _check_gpu_index)
Duration = _strict("Duration", parse_duration)
PositiveDuration = _strict("PositiveDuration", _check_positive_duration)
Listen = _strict("Listen", _check_listen)
Size = _strict("Size", parse_size)


class _Strict(pyd.BaseModel):
    """Base of the schema. Field annotations such as ``Str`` or ``Duration``
    name validators; the stored values are plain str / int / float."""

    class Config:
        extra = pyd.Extra.forbid
        arbitrary_types_allowed = True


# ------------------------------------------------------------------- schema


class GroupConfig(_Strict):
    """GPUs shared by some models. Without a budget only one of its models is
    awake at a time (llmux 0.7); with one, models whose gpu_memory_gib fit
    may be awake together."""

    budget_gib: Optional[PositiveNumber] = None


class CheckpointConfig(_Strict):
    """Where CRIU / cuda-checkpoint live and where images go (0.7's section)."""

    criu_path: NonEmptyStr = "criu"
    cuda_plugin_dir: NonEmptyStr = "/usr/lib/criu/"
    images_dir: NonEmptyStr = "/var/lib/llmux/checkpoints"
    cuda_checkpoint_path: NonEmptyStr = "cuda-checkpoint"
    keep_images: Bool = True
    quota_gib: Optional[PositiveNumber] = None


class PolicyConfig(_Strict):
    """When to switch. Durations in seconds."""

    type: Str = "fifo"
    request_timeout: PositiveDuration = 300.0
    drain_before_switch: Bool = True
    drain_timeout: Duration = 60.0
    min_active: Duration = 5.0
    coalesce_window: Duration = 2.0
    amortization_factor: PositiveNumber = 0.5
    max_wait: Duration = 15.0
    tick_interval: PositiveDuration = 0.5
    min_quantum: Duration = 2.0
    queue_limit: PositiveInt = 1000
    sleep_timeout: PositiveDuration = 120.0
    wake_timeout: PositiveDuration = 120.0
    failure_backoff: Duration = 2.0
    #: the eviction of models that do not name one (llmux 0.7's policy.eviction)
    eviction: Eviction = DEFAULT_EVICTION

    @pyd.validator("type")
    def _known_type(cls, v: str) -> str:  # noqa: N805
        if v not in POLICY_TYPES:
            raise ValueError(f"unknown policy {v!r}; allowed: {', '.join(POLICY_TYPES)}")
        return v

    @pyd.validator("eviction", pre=True)
    def _parse_eviction(cls, v: Any) -> Eviction:  # noqa: N805
        return Eviction.parse(v)


class ModelConfig(_Strict):
    """One model served under `name` (its key in ``models:``)."""

    name: NonEmptyStr
    model_path: NonEmptyStr
    command: List[NonEmptyStr] = ["vllm", "serve"]
    port: Optional[Port] = None  # resolved by the loader
    host: NonEmptyStr = "127.0.0.1"
    eviction: Eviction = DEFAULT_EVICTION
    extra_args: List[Str] = []
    env: Dict[str, Str] = {}
    gpu_group: NonEmptyStr = DEFAULT_GROUP
    gpu_memory_gib: Optional[PositiveNumber] = None
    gpus: List[GpuIndex] = []
    checkpoint_path: Optional[NonEmptyStr] = None
    startup_timeout: PositiveDuration = 600.0
    sleep_mode: Bool = True
    user: Optional[NonEmptyStr] = None
    warmup_prompt: Str = "Hello"
    tensor_parallel_size: int = 1  # derived from extra_args

    @pyd.validator("name")
    def _safe_name(cls, v: str) -> str:  # noqa: N805
        validate_model_name(v)
        return v

    @pyd.validator("command")
    def _command_not_empty(cls, v: List[str]) -> List[str]:  # noqa: N805
        if not v:
            raise ValueError("command is empty; give the program, e.g. ['vllm', 'serve']")
        return v

    @pyd.validator("eviction", pre=True)
    def _parse_eviction(cls, v: Any) -> Eviction:  # noqa: N805
        return Eviction.parse(v)

    @pyd.validator("tensor_parallel_size", pre=True, always=True)
    def _tp_from_args(cls, v: Any, values: Dict[str, Any]) -> int:  # noqa: N805
        return tensor_parallel_size_from_args(values.get("extra_args") or [])


class Config(_Strict):
    """The whole effective configuration (see the module docstring)."""

    listen: Listen = DEFAULT_LISTEN
    models: Dict[str, ModelConfig] = {}
    policy: PolicyConfig = PolicyConfig()
    groups: Dict[str, GroupConfig] = {}
    port_range: Tuple[Port, Port] = DEFAULT_PORT_RANGE
    max_body_bytes: Size = DEFAULT_MAX_BODY_BYTES
    metrics_port: Optional[Port] = None
    admin_port: Optional[Port] = None
    state_dir: NonEmptyStr = DEFAULT_STATE_DIR
    checkpoint: Optional[CheckpointConfig] = None
    warmup: Bool = False
    stop_backends_on_exit: Bool = False
    user: Optional[NonEmptyStr] = "llmux"
    #: files read, in order (main file first, then drop-ins)
    sources: List[str] = []
    #: which file defined each model (the last one, when redefined)
    model_sources: Dict[str, str] = {}
    #: informational lines check-config shows (overrides, warnings)
    notes: List[str] = []

    @pyd.validator("groups", always=True)
    def _default_group(cls, v: Dict[str, GroupConfig]) -> Dict[str, GroupConfig]:  # noqa: N805
        if DEFAULT_GROUP not in v:
            v = {DEFAULT_GROUP: GroupConfig(), **v}
        return v

    @pyd.validator("port_range")
    def _ordered_range(cls, v: Tuple[int, int]) -> Tuple[int, int]:  # noqa: N805
        if v[0] > v[1]:
            raise ValueError(f"port_range {v[0]}-{v[1]} is empty; write [LOW, HIGH] with LOW <= HIGH")
        return v

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>", *, legacy: bool = False) -> "Config":
        """Validate an already-parsed config. ``legacy=True`` applies llmux 0.7
        JSON defaults (see the module docstring)."""
        return _build(data, source, legacy=legacy, model_sources={})

    @property
    def listen_port(self) -> Optional[int]:
        """The TCP port of `listen`, or None for a unix socket."""
        kind, _, port = parse_listen(self.listen)
        return port if kind == "tcp" else None

    def model_user(self, model: str) -> Optional[str]:
        """The User= a model's unit runs as (its own, else the global one)."""
        return self.models[model].user or self.user

    def to_dict(self) -> Dict[str, Any]:
        """The effective config as plain JSON-serialisable data (evictions as
        'weights+process' strings); loading it again gives the same config."""
        data = _plain(self.dict(exclude={"sources", "model_sources", "notes", "models"}))
        data["models"] = {
            name: _plain(model.dict(exclude={"name", "tensor_parallel_size"}))
            for name, model in self.models.items()
        }
        return {key: data[key] for key in self.__fields__ if key in data}  # schema order


def _plain(value: Any) -> Any:
    if isinstance(value, Eviction):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(val) for key, val in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------ loading


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
            ConfigIssue(path, "", f"expected a mapping of keys (listen, models, policy, ...), got {_show(data)}")
        )
    data = dict(data)
    sources = [path]
    model_sources: Dict[str, str] = {}
    notes: List[str] = []
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
            raise ConfigError(ConfigIssue(dropin, "", f"expected a mapping with 'models:', got {_show(drop)}"))
        for key in drop:
            if key != "models":
                raise ConfigError(
                    ConfigIssue(dropin, str(key), "unknown key; a drop-in holds only 'models:' (other keys go in the main file)")
                )
        drop_models = drop.get("models") or {}
        if not isinstance(drop_models, dict):
            raise ConfigError(
                ConfigIssue(dropin, "models", f"expected a mapping of model name to settings, got {_show(drop_models)}")
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
    config = _build(data, path, legacy=is_json, model_sources=model_sources)
    config.sources = sources
    config.notes = notes + config.notes
    return config


# -------------------------------------------------------------- normalising

_LEGACY_POLICY = {  # llmux 0.7 key -> (our key, factor to seconds or None)
    "policy_type": ("type", None),
    "request_timeout_secs": ("request_timeout", 1.0),
    "min_active_secs": ("min_active", 1.0),
    "coalesce_window_ms": ("coalesce_window", 0.001),
    "max_wait_secs": ("max_wait", 1.0),
    "tick_interval_ms": ("tick_interval", 0.001),
    "min_quantum_ms": ("min_quantum", 0.001),
}


class _Issues:
    """Problems found while normalising, each tagged with the file it came from."""

    def __init__(self, main_file: str, model_sources: Mapping[str, str]):
        self.main_file = main_file
        self.model_sources = model_sources
        self.items: List[ConfigIssue] = []
        #: models whose eviction is policy.eviction (problems are reported there)
        self.inherited_eviction: set = set()

    def file_for(self, loc: Tuple[Any, ...]) -> str:
        if len(loc) >= 2 and loc[0] == "models":
            return self.model_sources.get(loc[1], self.main_file)
        return self.main_file

    def add(self, loc: Tuple[Any, ...], message: str) -> None:
        issue = ConfigIssue(self.file_for(loc), _dotted(loc), message)
        if issue not in self.items:
            self.items.append(issue)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def _to_argv(value: Any, loc: Tuple[Any, ...], issues: _Issues) -> Any:
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
                issues.add(loc + (i,), f"expected a string, got {_show(item)}; quote it")
        return out
    return value


def _normalise_policy(raw: Any, legacy: bool, issues: _Issues) -> Any:
    if not isinstance(raw, dict):
        return raw
    policy = dict(raw)
    for old, (new, factor) in _LEGACY_POLICY.items():
        if old not in policy:
            continue
        value = policy.pop(old)
        if new in raw:
            issues.add(("policy", old), f"given together with '{new}'; keep only '{new}'")
            continue
        if factor is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                unit = "milliseconds" if old.endswith("_ms") else "seconds"
                issues.add(("policy", old), f"expected a number of {unit}, got {_show(value)}")
                continue
            if value < 0:
                issues.add(("policy", old), f"negative duration {value!r}; durations must be 0 or more")
                continue
            value = value * factor
        policy[new] = value
    if "sleep_level" in policy:  # 0.x before eviction existed
        level = policy.pop("sleep_level")
        if "eviction" in raw:
            issues.add(("policy", "sleep_level"), "given together with 'eviction'; keep only 'eviction'")
        else:
            policy["eviction"] = level
    if "eviction" not in policy and legacy:
        policy["eviction"] = LEGACY_DEFAULT_EVICTION
    return policy


def _normalise_model(name: Any, raw: Any, default_eviction: Any, default_command: List[str], issues: _Issues) -> Any:
    loc = ("models", name)
    if raw is None:
        issues.add(loc, "has no settings; give at least model_path")
        return None
    if not isinstance(raw, dict):
        issues.add(loc, f"expected a mapping of settings (model_path, port, eviction, ...), got {_show(raw)}")
        return None
    model = dict(raw)
    if "name" in model and model["name"] != name:
        issues.add(loc + ("name",), f"is {_show(model['name'])} but the model's key is {name!r}; remove 'name' (the key is the name)")
    model["name"] = name
    if "tensor_parallel_size" in model:
        issues.add(loc + ("tensor_parallel_size",), "is read from extra_args; write '--tensor-parallel-size N' in extra_args instead")
        model.pop("tensor_parallel_size")
    if "sleep_level" in model:  # 0.x spelling of a legacy eviction level
        level = model.pop("sleep_level")
        if "eviction" in raw:
            issues.add(loc + ("sleep_level",), "given together with 'eviction'; keep only 'eviction'")
        else:
            model["eviction"] = level
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
        model["command"] = list(default_command)
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


def _normalise(raw: Mapping[str, Any], legacy: bool, issues: _Issues) -> Dict[str, Any]:
    """Translate llmux 0.7 keys, inject model names and defaults, parse
    evictions; what is left is plain pydantic input."""
    data = dict(raw)
    if "port" in data:
        port = data.pop("port")
        if "listen" in raw:
            issues.add(("port",), "given together with 'listen'; keep only 'listen' (port is llmux 0.7's spelling)")
        elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            issues.add(("port",), f"expected a port number 1-65535, got {_show(port)}")
        else:
            data["listen"] = f"{LEGACY_BIND_HOST}:{port}"
    default_command = ["vllm", "serve"]
    if "vllm_command" in data:
        program = data.pop("vllm_command")
        if not isinstance(program, str) or not program.strip():
            issues.add(("vllm_command",), f"expected the vLLM program as a string, got {_show(program)}")
        else:
            default_command = [program, "serve"]
    if data.get("metrics_port") == 0 and not isinstance(data.get("metrics_port"), bool):
        data["metrics_port"] = None  # 0.7: 0 disables metrics
    if isinstance(data.get("port_range"), str):
        match = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", data["port_range"])
        if match:
            data["port_range"] = [int(match.group(1)), int(match.group(2))]
        else:
            issues.add(("port_range",), f"invalid port range {data['port_range']!r}; write [LOW, HIGH] or 'LOW-HIGH'")
            data.pop("port_range")
    if isinstance(data.get("checkpoint"), dict) and "object_store" in data["checkpoint"]:
        issues.add(("checkpoint", "object_store"), "object stores are not supported; remove it (images stay in images_dir)")
        data["checkpoint"] = {k: v for k, v in data["checkpoint"].items() if k != "object_store"}
    if legacy and "policy" not in data:
        data["policy"] = {}
    if "policy" in data:
        data["policy"] = _normalise_policy(data["policy"], legacy, issues)
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
            normal = _normalise_model(name, model, default_eviction, default_command, issues)
            if normal is not None:
                fixed[name] = normal
        data["models"] = fixed
    elif models is not None:
        issues.add(("models",), f"expected a mapping of model name to settings, got {_show(models)}")
        data.pop("models")
    groups = data.get("groups")
    if groups is None and "groups" in data:
        data.pop("groups")
    elif isinstance(groups, dict):
        data["groups"] = {name: ({} if group is None else group) for name, group in groups.items()}
    return data


_INTERNAL_FIELDS = ("name", "tensor_parallel_size", "sources", "model_sources", "notes")
_LEGACY_KEYS: Dict[str, List[str]] = {
    "Config": ["port", "vllm_command"],
    "PolicyConfig": [*_LEGACY_POLICY, "sleep_level"],
    "ModelConfig": ["sleep_level"],
}


def _allowed_keys(model_cls: type) -> Tuple[List[str], List[str]]:
    """(keys a user writes, llmux 0.7 keys also accepted) of a schema class."""
    keys = [f for f in model_cls.__fields__ if f not in _INTERNAL_FIELDS]
    return keys, _LEGACY_KEYS.get(model_cls.__name__, [])


def _schema_at(loc: Tuple[Any, ...]) -> Optional[type]:
    """The pydantic model class that owns the key at `loc` (for suggestions)."""
    if len(loc) == 1:
        return Config
    head = loc[0]
    if head == "policy" and len(loc) == 2:
        return PolicyConfig
    if head == "checkpoint" and len(loc) == 2:
        return CheckpointConfig
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
        return loc, _unknown_key_message(loc[-1], allowed, legacy)
    if kind == "value_error.missing":
        hint = _MISSING_HINTS.get(str(loc[-1]))
        return loc, "required key is missing" + (f"; {hint}" if hint else "")
    if kind in _PYDANTIC_MESSAGES:
        message = _PYDANTIC_MESSAGES[kind]
        if kind != "value_error.missing":
            message += f", got {_show(_value_at(data, loc))}"
        return loc, message
    if kind.startswith("value_error.tuple") or kind == "value_error.list.max_items":
        return loc, "expected a list of two port numbers [LOW, HIGH]"
    return loc, error["msg"]


def _build(raw: Mapping[str, Any], source: str, *, legacy: bool, model_sources: Dict[str, str]) -> Config:
    issues = _Issues(source, model_sources)
    if not isinstance(raw, Mapping):
        issues.add((), f"expected a mapping of keys (listen, models, policy, ...), got {_show(raw)}")
        issues.raise_if_any()
    data = _normalise(raw, legacy, issues)
    try:
        config = Config.parse_obj(data)
    except pyd.ValidationError as exc:
        for error in exc.errors():
            loc, message = _translate(error, data)
            issues.add(loc, message)
        issues.raise_if_any()
        raise  # pragma: no cover - every error is translated above
    issues.raise_if_any()
    config.model_sources = {name: model_sources.get(name, source) for name in config.models}
    config.sources = [source]
    _check_semantics(config, issues)
    issues.raise_if_any()
    _allocate_ports(config, issues)
    issues.raise_if_any()
    return config


# vLLM flags llmux itself passes, and the key that controls each
_MANAGED_FLAGS = {"--port": "port", "--host": "host", "--enable-sleep-mode": "sleep_mode", "--model": "model_path"}


def _plain_absolute(path: str) -> bool:
    """An absolute path that does not climb with '..' (checkpoint image paths)."""
    return path.startswith("/") and ".." not in path.split("/")


def _check_semantics(config: Config, issues: _Issues) -> None:
    """Rules that span keys: groups, budgets, checkpoint section, evictions."""
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
        if name in issues.inherited_eviction:
            eviction_loc: Tuple[Any, ...] = ("policy", "eviction")
            used_by = f" (the eviction of model '{name}', which sets none)"
        else:
            eviction_loc, used_by = loc + ("eviction",), ""
        try:
            model.eviction.check_allowed(shared_budget=shared)
        except EvictionError as exc:
            issues.add(eviction_loc, f"{exc}{used_by}")
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
        for flag, key in _MANAGED_FLAGS.items():
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


def _allocate_ports(config: Config, issues: _Issues) -> None:
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
