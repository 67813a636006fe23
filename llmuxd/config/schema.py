"""The configuration schema: what each key means and its default.

Validation of single values lives in llmuxd/config/values.py; rules that
span keys in llmuxd/config/checks.py; reading files in llmuxd/config/loader.py.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from llmuxd.config.values import (
    Bool,
    Duration,
    GpuIndex,
    Listen,
    NonEmptyStr,
    NonNegativeNumber,
    Port,
    PositiveDuration,
    PositiveInt,
    PositiveNumber,
    Size,
    Str,
    StrictModel,
    parse_listen,
    pyd,
    tensor_parallel_size_from_args,
)
from llmuxd.eviction import DEFAULT_EVICTION, Eviction
from llmuxd.names import validate_model_name

DEFAULT_CONFIG_PATH = "/etc/llmux/llmux.yaml"
DROPIN_DIRNAME = "models.d"
DEFAULT_LISTEN = "127.0.0.1:3000"
DEFAULT_PORT_RANGE = (8100, 8999)
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_STATE_DIR = "/var/lib/llmux"
DEFAULT_GROUP = "default"
POLICY_TYPES = ("fifo", "cost_aware", "time_slice")
#: where verified eviction reads a backend's GPU memory (llmuxd/checkpoint/gpu_probe.py):
#: auto = NVML when pynvml and a driver answer, else nvidia-smi when it works, else none;
#: ledger = the simulator's JSON ledger named by the model's LLMUX_SIM_GPU_LEDGER (tests, demos)
GPU_PROBES = ("auto", "nvml", "nvidia-smi", "ledger", "none")
#: who may call (llmuxd/http/auth.py): auto = API keys when any are configured, else open,
#: which only a loopback listen address may be; none = open on any address, said explicitly
AUTH_MODES = ("auto", "none")


def unknown_policy_message(value: Any) -> str:
    """The error for a policy type that does not exist (llmux 0.7 ran fifo instead, silently)."""
    return (
        f"unknown policy {value!r}; allowed: {', '.join(POLICY_TYPES)} "
        "(llmux 0.7 silently used fifo for an unknown policy_type; write 'fifo' to keep that)"
    )


class GroupConfig(StrictModel):
    """GPUs shared by some models. Without a budget only one of its models is
    awake at a time (llmux 0.7); with one, models whose gpu_memory_gib fit
    may be awake together."""

    budget_gib: Optional[PositiveNumber] = None


class ObjectStoreConfig(StrictModel):
    """An S3-compatible bucket that holds checkpoint images (llmux 0.7's
    ``checkpoint.object_store``, plus ``prefix``). Credentials may be left
    out here: they then come from systemd credentials (``LoadCredential=``)
    or the usual AWS environment variables."""

    endpoint: NonEmptyStr
    bucket: NonEmptyStr
    access_key: Optional[NonEmptyStr] = None
    secret_key: Optional[NonEmptyStr] = pyd.Field(None, repr=False)  # never in a log line or a repr
    region: NonEmptyStr = "us-east-1"
    prefix: Str = ""


class CheckpointConfig(StrictModel):
    """Where CRIU / cuda-checkpoint live and where images go (0.7's section)."""

    criu_path: NonEmptyStr = "criu"
    cuda_plugin_dir: NonEmptyStr = "/usr/lib/criu/"
    images_dir: NonEmptyStr = "/var/lib/llmux/checkpoints"
    cuda_checkpoint_path: NonEmptyStr = "cuda-checkpoint"
    keep_images: Bool = True
    quota_gib: Optional[PositiveNumber] = None
    object_store: Optional[ObjectStoreConfig] = None


class PolicyConfig(StrictModel):
    """When to switch. Durations in seconds."""

    type: Str = "fifo"
    request_timeout: PositiveDuration = 300.0
    drain_before_switch: Bool = True
    drain_timeout: Duration = 60.0
    min_active: Duration = 5.0
    coalesce_window: Duration = 2.0
    #: 0: switch as soon as a request waits (llmux 0.7: "0.0 = always switch immediately")
    amortization_factor: NonNegativeNumber = 0.5
    max_wait: Duration = 15.0
    #: 0: as often as the scheduler can (every 10 ms)
    tick_interval: Duration = 0.5
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
            raise ValueError(unknown_policy_message(v))
        return v

    @pyd.validator("eviction", pre=True)
    def _parse_eviction(cls, v: Any) -> Eviction:  # noqa: N805
        return Eviction.parse(v)


class ModelConfig(StrictModel):
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


class Config(StrictModel):
    """The whole effective configuration (see the module docstring)."""

    listen: Listen = DEFAULT_LISTEN
    models: Dict[str, ModelConfig] = {}
    policy: PolicyConfig = PolicyConfig()
    groups: Dict[str, GroupConfig] = {}
    port_range: Tuple[Port, Port] = DEFAULT_PORT_RANGE
    max_body_bytes: Size = DEFAULT_MAX_BODY_BYTES
    #: a second port serving only /metrics (llmux 0.7's metrics server), on the host of `listen`
    metrics_port: Optional[Port] = None
    #: llmux 0.7's control port: never opened (control is on D-Bus); loading it warns
    admin_port: Optional[Port] = None
    state_dir: NonEmptyStr = DEFAULT_STATE_DIR
    checkpoint: Optional[CheckpointConfig] = None
    warmup: Bool = False
    stop_backends_on_exit: Bool = False
    user: Optional[NonEmptyStr] = "llmux"
    gpu_probe: Str = "auto"
    #: API key files (llmuxd/keys/files.py); None: /etc/llmux/keys.d when it exists
    keys_dir: Optional[NonEmptyStr] = None
    auth: Str = "auto"
    #: files read, in order (main file first, then drop-ins)
    sources: List[str] = []
    #: which file defined each model (the last one, when redefined)
    model_sources: Dict[str, str] = {}
    #: informational lines check-config shows (overrides, translations)
    notes: List[str] = []
    #: ``FILE: KEY: what`` lines for what loads but deserves a look: unknown keys
    #: (ignored), llmux 0.7 keys without effect; ``check-config --strict`` fails on them
    warnings: List[str] = []

    @pyd.validator("groups", always=True)
    def _default_group(cls, v: Dict[str, GroupConfig]) -> Dict[str, GroupConfig]:  # noqa: N805
        if DEFAULT_GROUP not in v:
            v = {DEFAULT_GROUP: GroupConfig(), **v}
        return v

    @pyd.validator("gpu_probe")
    def _known_probe(cls, v: str) -> str:  # noqa: N805
        if v not in GPU_PROBES:
            raise ValueError(f"unknown GPU probe {v!r}; allowed: {', '.join(GPU_PROBES)}")
        return v

    @pyd.validator("auth")
    def _known_auth(cls, v: str) -> str:  # noqa: N805
        if v not in AUTH_MODES:
            raise ValueError(f"unknown auth {v!r}; allowed: auto (API keys from keys_dir when there are any), "
                             "none (no keys on any address)")
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
        from llmuxd.config.loader import build  # the loader builds on this schema

        return build(data, source, legacy=legacy, model_sources={})

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
        data = _plain(self.dict(exclude={"sources", "model_sources", "notes", "warnings", "models"}))
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
