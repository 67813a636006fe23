"""Eviction: what happens to a model's weights and to its process when it sleeps.

Two independent axes (as in llmux 0.7), written ``weights+process`` in config
and on the bus, e.g. ``offload+keep_running``. Sleep applies the weight step
first, then the process step; wake reverses them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping


class EvictionError(ValueError):
    """An eviction that cannot be parsed or makes no sense; the message says why."""


class WeightStrategy(str, enum.Enum):
    RETAIN = "retain"  # no vLLM sleep
    OFFLOAD = "offload"  # vLLM sleep level 1: weights to host RAM
    DISCARD = "discard"  # vLLM sleep level 2: weights dropped, reloaded on wake

    def __str__(self) -> str:
        return self.value


class ProcessStrategy(str, enum.Enum):
    KEEP_RUNNING = "keep_running"
    FREEZE = "freeze"  # cgroup freezer / SIGSTOP: no CPU, memory kept
    CUDA_SUSPEND = "cuda_suspend"  # cuda-checkpoint --toggle
    CHECKPOINT = "checkpoint"  # CRIU dump to disk, process gone
    STOP = "stop"  # process gone, cold start on wake

    def __str__(self) -> str:
        return self.value


_SLEEP_LEVEL = {WeightStrategy.RETAIN: None, WeightStrategy.OFFLOAD: 1, WeightStrategy.DISCARD: 2}

# llmux 0.7's numeric levels (its From<u8>); anything else was retain+stop there,
# here it is an error: a typo should not silently stop a model.
LEGACY_LEVELS: dict[int, tuple[WeightStrategy, ProcessStrategy]] = {
    1: (WeightStrategy.OFFLOAD, ProcessStrategy.KEEP_RUNNING),
    2: (WeightStrategy.DISCARD, ProcessStrategy.KEEP_RUNNING),
    3: (WeightStrategy.RETAIN, ProcessStrategy.CUDA_SUSPEND),
    4: (WeightStrategy.DISCARD, ProcessStrategy.CHECKPOINT),
    5: (WeightStrategy.RETAIN, ProcessStrategy.STOP),
}

_WEIGHTS = ", ".join(w.value for w in WeightStrategy)
_PROCESSES = ", ".join(p.value for p in ProcessStrategy)
FORMAT_HELP = (
    f"write 'WEIGHTS+PROCESS' with WEIGHTS one of {_WEIGHTS} and PROCESS one of "
    f"{_PROCESSES} (e.g. 'offload+keep_running'), or a legacy level 1-5"
)


def _enum_value(enum_cls: type[enum.Enum], raw: Any, axis: str) -> Any:
    text = str(raw).strip().lower().replace("-", "_")
    try:
        return enum_cls(text)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise EvictionError(f"unknown {axis} strategy '{raw}'; allowed: {allowed}") from None


@dataclass(frozen=True)
class Eviction:
    """One point on the two eviction axes."""

    weights: WeightStrategy
    process: ProcessStrategy

    @classmethod
    def parse(cls, value: "str | int | Mapping[str, Any] | Eviction") -> "Eviction":
        """Accept ``'offload+keep_running'``, ``{'weights':..,'process':..}``,
        a legacy level 1-5 (int or digit string), or an Eviction."""
        if isinstance(value, Eviction):
            return value
        if isinstance(value, bool):
            raise EvictionError(f"eviction must be a string, not {value!r}; {FORMAT_HELP}")
        if isinstance(value, int):
            return cls._from_level(value)
        if isinstance(value, Mapping):
            return cls._from_mapping(value)
        if not isinstance(value, str):
            raise EvictionError(f"eviction must be a string, not {type(value).__name__}; {FORMAT_HELP}")
        text = value.strip()
        if text.isdigit():
            return cls._from_level(int(text))
        parts = text.split("+")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise EvictionError(f"invalid eviction '{value}'; {FORMAT_HELP}")
        weights = _enum_value(WeightStrategy, parts[0], "weights")
        process = _enum_value(ProcessStrategy, parts[1], "process")
        return cls(weights, process)

    @classmethod
    def _from_level(cls, level: int) -> "Eviction":
        if level not in LEGACY_LEVELS:
            raise EvictionError(f"legacy eviction level {level} does not exist; use 1-5 or {FORMAT_HELP}")
        return cls(*LEGACY_LEVELS[level])

    @classmethod
    def _from_mapping(cls, value: Mapping[str, Any]) -> "Eviction":
        extra = set(value) - {"weights", "process"}
        if extra:
            raise EvictionError(f"unknown eviction key(s) {sorted(extra)}; allowed: weights, process")
        missing = {"weights", "process"} - set(value)
        if missing:
            raise EvictionError(f"eviction is missing {sorted(missing)}; {FORMAT_HELP}")
        return cls(
            _enum_value(WeightStrategy, value["weights"], "weights"),
            _enum_value(ProcessStrategy, value["process"], "process"),
        )

    @property
    def sleep_level(self) -> int | None:
        """The vLLM ``/sleep?level=`` this eviction uses, or None for retain."""
        return _SLEEP_LEVEL[self.weights]

    @property
    def is_noop(self) -> bool:
        """retain+keep_running evicts nothing: the model stays on the GPU (llmux 0.7's
        "no-op"; it loads, with a warning where its group has no budget: config/habits.py).
        Every other pair 0.7's README lists loads too; ``offload+stop`` and ``discard+stop``
        stop the process without the weight step, as in 0.7."""
        return self.weights is WeightStrategy.RETAIN and self.process is ProcessStrategy.KEEP_RUNNING

    @property
    def frees_process(self) -> bool:
        """True when no backend process remains after sleep (checkpoint, stop)."""
        return self.process in (ProcessStrategy.CHECKPOINT, ProcessStrategy.STOP)

    def to_dict(self) -> dict[str, str]:
        return {"weights": self.weights.value, "process": self.process.value}

    def __str__(self) -> str:
        return f"{self.weights.value}+{self.process.value}"


DEFAULT_EVICTION = Eviction(WeightStrategy.OFFLOAD, ProcessStrategy.KEEP_RUNNING)
STOP_EVICTION = Eviction(WeightStrategy.RETAIN, ProcessStrategy.STOP)

#: the engines a model's `engine:` names, and the weight strategies each can apply. vLLM
#: sleeps its weights through /sleep (offload = level 1, discard = level 2); any other
#: OpenAI-compatible server ("openai": llama.cpp, SGLang, TGI, Ollama ...) has no such
#: endpoint, so its weights stay where they are and it is evicted at process level only.
#: The clients in llmuxd/engine/ declare these same sets; the table lives here, below the
#: engine room, because config checks and the switcher need it too.
ENGINE_WEIGHTS: dict[str, frozenset[WeightStrategy]] = {
    "vllm": frozenset(WeightStrategy),
    "openai": frozenset({WeightStrategy.RETAIN}),
}
DEFAULT_ENGINE = "vllm"


def engine_evictions(engine: str) -> list[Eviction]:
    """The evictions `engine` can do that free something, strongest last (for messages)."""
    weights = [w for w in WeightStrategy if w in ENGINE_WEIGHTS[engine]]
    return [Eviction(w, p) for w in weights for p in ProcessStrategy
            if not Eviction(w, p).is_noop and not (w is not WeightStrategy.RETAIN and p is ProcessStrategy.STOP)]


def check_engine(eviction: Eviction, engine: str, model: str) -> None:
    """Refuse a weight strategy `engine` cannot apply, naming the model and what it can do."""
    if eviction.weights in ENGINE_WEIGHTS[engine]:
        return
    can = ", ".join(str(e) for e in engine_evictions(engine))
    raise EvictionError(
        f"model '{model}' runs engine '{engine}', which cannot {eviction.weights.value} its weights "
        f"(that needs vLLM's sleep endpoints); it can do: {can}"
    )
