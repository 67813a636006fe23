"""Scalar values as users write them (durations, sizes, listen addresses) and
the strict pydantic field types built on them.

pydantic is used through its v1 API, imported from ``pydantic.v1`` on
pydantic 2 and from ``pydantic`` on 1.10 (Debian 12), so both behave the
same. Scalars use small strict types (no "5" -> 5 coercion) whose messages
are ours.
"""

from __future__ import annotations

import math
import re
from typing import Any, List, Tuple

try:  # pydantic 2 ships the v1 API under pydantic.v1
    import pydantic.v1 as pyd
except ImportError:  # pragma: no cover - pydantic 1.10 (Debian 12)
    import pydantic as pyd  # type: ignore[no-redef]

from llmuxd.config.issues import shown


# ------------------------------------------------------------- scalar parsing

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)")
DURATION_HELP = "write seconds as a number or a string like '500ms', '30s', '5m', '1h', '1m30s'"


def parse_duration(value: Any) -> float:
    """Seconds from a number or '500ms' / '30s' / '5m' / '1h' / '1m30s';
    raises ValueError with what is allowed."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a duration, got {shown(value)}; {DURATION_HELP}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            raise ValueError(f"duration {shown(value)} is too large; {DURATION_HELP}") from None
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
        raise ValueError(f"expected a duration, got {shown(value)}; {DURATION_HELP}")
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
        raise ValueError(f"expected a size, got {shown(value)}; {SIZE_HELP}")
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
        raise ValueError(f"expected a size, got {shown(value)}; {SIZE_HELP}")
    if size <= 0:
        raise ValueError(f"size must be more than 0, got {shown(value)}; {SIZE_HELP}")
    return size


def parse_listen(listen: str) -> Tuple[str, str, int]:
    """``("tcp", host, port)`` for 'host:port' / '[v6]:port', ``("unix", path, 0)``
    for 'unix:/path'; raises ValueError."""
    help_ = "write 'HOST:PORT' (e.g. '127.0.0.1:3000', '[::1]:3000') or 'unix:/absolute/path'"
    if not isinstance(listen, str):
        raise ValueError(f"expected a string, got {shown(listen)}; {help_}")
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
        raise TypeError(f"expected a string, got {shown(v)}; quote it")
    return v


def _check_nonempty_str(v: Any) -> str:
    if not _check_str(v).strip():
        raise ValueError("must not be empty")
    return v


def _check_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {shown(v)}")
    return v


def _check_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected a whole number, got {shown(v)}")
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
        raise TypeError(f"expected a number, got {shown(v)}")
    return float(v)


def _check_positive_number(v: Any) -> float:
    if not _check_number(v) > 0:
        raise ValueError(f"must be more than 0, got {shown(v)}")
    return float(v)


def _check_nonnegative_number(v: Any) -> float:
    if not _check_number(v) >= 0:
        raise ValueError(f"must be 0 or more, got {shown(v)}")
    return float(v)


def _check_gpu_index(v: Any) -> int:
    if _check_int(v) < 0:
        raise ValueError(f"GPU index must be 0 or more, got {v}")
    return v


def _check_positive_duration(v: Any) -> float:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError(f"must be more than 0, got {shown(v)}; {DURATION_HELP}")
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
NonNegativeNumber = _strict("NonNegativeNumber", _check_nonnegative_number)
GpuIndex = _strict("GpuIndex", _check_gpu_index)
Duration = _strict("Duration", parse_duration)
PositiveDuration = _strict("PositiveDuration", _check_positive_duration)
Listen = _strict("Listen", _check_listen)
Size = _strict("Size", parse_size)


class StrictModel(pyd.BaseModel):
    """Base of the schema. Field annotations such as ``Str`` or ``Duration``
    name validators; the stored values are plain str / int / float."""

    class Config:
        extra = pyd.Extra.forbid
        arbitrary_types_allowed = True

