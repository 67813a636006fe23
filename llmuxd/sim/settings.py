"""Simulator knobs: the vLLM command line it accepts and the LLMUX_SIM_* environment.

The environment variables are documented in `llmuxd.sim.server`'s docstring;
this module only reads them, in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

VLLM_VERSION = "0.32.0"
#: weights of a --device simulator that names no size (MiB)
DEFAULT_DEVICE_WEIGHTS_MB = 256

# vLLM flags that take no value (everything else starting with -- may take one)
_BOOL_FLAGS = {
    "--enforce-eager",
    "--enable-sleep-mode",
    "--disable-custom-all-reduce",
    "--trust-remote-code",
    "--disable-log-requests",
    "--disable-log-stats",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--enable-chunked-prefill",
    "--enable-lora",
    "--disable-frontend-multiprocessing",
    "--enable-auto-tool-choice",
    "--headless",
}


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"llmux-vllm-sim: {name}={raw!r} is not a number; set it to e.g. {default}")


def _env_int(name: str, default: int) -> int:
    return int(_env_float(name, default))


@dataclass
class SimSettings:
    model: str
    served_names: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 2048
    max_num_seqs: int = 256
    tp: int = 1
    enable_sleep_mode: bool = False
    shutdown_timeout: float = 0.0
    dev_mode: bool = False
    load_time: float = 0.0
    weights_mb: int = 0
    cache_dir: str = "/tmp/llmux-sim-cache"
    drop_cache: bool = True
    tokens_per_s: float = 200.0
    sleep_time: float = 0.0
    wake_time: float = 0.0
    gpu_ledger: str | None = None
    gpu_mb: int = 0
    gpu_capacity_mb: int | None = None
    gpu_residue_mb: int = 500
    term_hang: bool = False
    embed_dim: int = 384
    platform: str = "cuda"
    legacy_503: bool = False
    workers: int = 0
    #: None = the JSON ledger only (no torch); "cuda" | "cpu" = real tensors (llmuxd/sim/device.py)
    device: str | None = None
    #: vLLM's --gpu-memory-utilization (sizes the KV cache with --device cuda)
    gpu_memory_utilization: float = 0.9
    #: --sim-kv-cache-gib: the KV cache size, overriding how vLLM would size it
    kv_cache_gib: float | None = None
    #: host link bandwidth in GB/s each way (0: transfers take no time; llmuxd/sim/link.py)
    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    #: the weights' share of gpu_mb in the ledger (None: 60 % of what is above the residue)
    gpu_weights_mb: int | None = None
    #: False: /release_kv_cache_memory answers 500 like vLLM on the CPU (LLMUX_SIM_PLATFORM=cpu)
    selective_discard: bool = True
    ignored_flags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.served_names[0]


_VALUE_FLAGS = {"--model", "--port", "--host", "--max-model-len", "--tensor-parallel-size", "-tp",
                "--shutdown-timeout", "--max-num-seqs", "--gpu-memory-utilization", "--device",
                "--sim-weights-gib", "--sim-kv-cache-gib",
                "--h2d-gbps", "--d2h-gbps"}
DEVICES = ("cuda", "cpu")

USAGE = (
    "usage: llmux-vllm-sim serve MODEL [--port P] [--host H] [--served-model-name NAME ...]\n"
    "       llmux-vllm-sim --model MODEL [--port P] ...   (other vLLM flags are accepted and ignored)\n"
    "       --device cuda|cpu [--sim-weights-gib G] [--gpu-memory-utilization U] [--sim-kv-cache-gib K]\n"
    "                         weights and KV cache as real torch tensors (needs llmux[torch])\n"
    "       --h2d-gbps G --d2h-gbps G  host link bandwidth each way (weights cross it on sleep/wake)"
)


def _split_argv(argv: list[str]) -> tuple[dict[str, list[str]], list[str], list[str], set[str]]:
    """Split argv into known flag values, positionals and ignored flags.

    vLLM has hundreds of flags; the simulator must accept all of them, so an
    unknown `--flag` takes the next word as its value unless it is a known
    boolean flag or the next word is itself a flag."""
    values: dict[str, list[str]] = {}
    positional: list[str] = []
    ignored: list[str] = []
    bools: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            name, eq, inline = arg.partition("=")
            if name == "--served-model-name":
                names = [inline] if eq else []
                while not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    names.append(argv[i + 1])
                    i += 1
                values[name] = names
            elif name in _VALUE_FLAGS:
                if eq:
                    values[name] = [inline]
                elif i + 1 < len(argv):
                    values[name] = [argv[i + 1]]
                    i += 1
                else:
                    raise SystemExit(f"llmux-vllm-sim: {name} needs a value\n{USAGE}")
            elif name == "--enable-sleep-mode":
                bools.add(name)
            else:
                ignored.append(arg)
                if (not eq and name not in _BOOL_FLAGS and i + 1 < len(argv)
                        and (not argv[i + 1].startswith("-") or _is_number(argv[i + 1]))):
                    ignored.append(argv[i + 1])
                    i += 1
        else:
            positional.append(arg)
        i += 1
    return values, positional, ignored, bools


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_args(argv: list[str]) -> SimSettings:
    """Parse `serve MODEL [--flags]` or `--model MODEL [--flags]` (the two ways
    vLLM is started) and read the environment."""
    values, pos, ignored, bools = _split_argv(argv)
    if pos and pos[0] == "serve":
        pos = pos[1:]
    model = (values.get("--model") or [None])[0] or (pos[0] if pos else None)
    if not model:
        raise SystemExit(f"llmux-vllm-sim: no model given\n{USAGE}")
    ignored += pos[1:]

    def num(flag: str, default: float, cast=int):
        raw = (values.get(flag) or [None])[0]
        if raw is None:
            return default
        try:
            return cast(raw)
        except ValueError:
            raise SystemExit(f"llmux-vllm-sim: {flag} {raw!r} is not a number\n{USAGE}")

    env = os.environ
    device = (values.get("--device") or [None])[0]
    if device is not None and device not in DEVICES:
        raise SystemExit(f"llmux-vllm-sim: --device {device!r} is not one of {', '.join(DEVICES)}\n{USAGE}")
    utilization = num("--gpu-memory-utilization", 0.9, float)
    if not 0 < utilization <= 1:
        raise SystemExit(f"llmux-vllm-sim: --gpu-memory-utilization {utilization} must be in (0, 1]")
    weights_gib = num("--sim-weights-gib", -1.0, float)
    weights_mb = int(round(weights_gib * 1024)) if weights_gib >= 0 else _env_int("LLMUX_SIM_WEIGHTS_MB", 0)
    if device is not None and weights_mb <= 0:
        weights_mb = DEFAULT_DEVICE_WEIGHTS_MB
    kv_gib = num("--sim-kv-cache-gib", -1.0, float)
    h2d = num("--h2d-gbps", _env_float("LLMUX_SIM_H2D_GBPS", 0.0), float)
    d2h = num("--d2h-gbps", _env_float("LLMUX_SIM_D2H_GBPS", 0.0), float)
    if h2d < 0 or d2h < 0:
        raise SystemExit(f"llmux-vllm-sim: --h2d-gbps and --d2h-gbps must not be negative\n{USAGE}")
    platform = env.get("LLMUX_SIM_PLATFORM", "cuda")
    tp = num("--tensor-parallel-size", 0) or num("-tp", 0) or _env_int("LLMUX_SIM_TP", 1)
    return SimSettings(
        model=model,
        served_names=values.get("--served-model-name") or [model],
        host=(values.get("--host") or ["127.0.0.1"])[0],
        port=num("--port", 8000),
        max_model_len=num("--max-model-len", 2048),
        max_num_seqs=max(1, num("--max-num-seqs", 256)),
        tp=max(1, tp),
        enable_sleep_mode="--enable-sleep-mode" in bools,
        shutdown_timeout=num("--shutdown-timeout", 0.0, float),
        dev_mode=env.get("VLLM_SERVER_DEV_MODE", "") in ("1", "true", "True"),
        load_time=_env_float("LLMUX_SIM_LOAD_TIME", 0.0),
        weights_mb=weights_mb,
        cache_dir=env.get("LLMUX_SIM_CACHE", "") or "/tmp/llmux-sim-cache",
        drop_cache=env.get("LLMUX_SIM_DROP_CACHE", "1") != "0",
        tokens_per_s=_env_float("LLMUX_SIM_TOKENS_PER_S", 200.0),
        sleep_time=_env_float("LLMUX_SIM_SLEEP_TIME", 0.0),
        wake_time=_env_float("LLMUX_SIM_WAKE_TIME", 0.0),
        gpu_ledger=env.get("LLMUX_SIM_GPU_LEDGER") or None,
        gpu_mb=_env_int("LLMUX_SIM_GPU_MB", 0),
        gpu_capacity_mb=(
            _env_int("LLMUX_SIM_GPU_CAPACITY_MB", 0) if env.get("LLMUX_SIM_GPU_CAPACITY_MB") else None
        ),
        gpu_residue_mb=_env_int("LLMUX_SIM_GPU_RESIDUE_MB", 500),
        term_hang=env.get("LLMUX_SIM_TERM_HANG", "") == "1",
        embed_dim=_env_int("LLMUX_SIM_EMBED_DIM", 384),
        platform=platform,
        legacy_503=env.get("LLMUX_SIM_LEGACY_503", "") == "1",
        workers=max(0, _env_int("LLMUX_SIM_WORKERS", 0)),
        device=device,
        gpu_memory_utilization=utilization,
        kv_cache_gib=kv_gib if kv_gib >= 0 else None,
        h2d_gbps=h2d,
        d2h_gbps=d2h,
        gpu_weights_mb=_env_int("LLMUX_SIM_GPU_WEIGHTS_MB", 0) or None,
        selective_discard=platform != "cpu" and env.get("LLMUX_SIM_SELECTIVE_DISCARD", "1") != "0",
        ignored_flags=ignored,
    )
