"""Names: what a model may be called, and how that name is spelled elsewhere.

A model name becomes a systemd unit name, a D-Bus object path, a metric label
and a directory name, so the allowed set is narrow and each escaping is a pure
function here. Bus names and paths live here too, in one place.
"""

from __future__ import annotations

import re

BUS_NAME = "io.llmux.LLMux1"
MANAGER_PATH = "/io/llmux/LLMux1"
MODEL_PATH_PREFIX = MANAGER_PATH + "/model"
MANAGER_IFACE = "io.llmux.LLMux1.Manager"
MODEL_IFACE = "io.llmux.LLMux1.Model"
ERROR_PREFIX = "io.llmux.LLMux1.Error."
POLKIT_ACTION_PREFIX = "io.llmux.LLMux1."

SLICE = "llmux.slice"
UNIT_PREFIX = "llmux-model-"
UNIT_SUFFIX = ".service"
UNIT_PATTERN = UNIT_PREFIX + "*" + UNIT_SUFFIX
SYSLOG_PREFIX = "llmux-"
JOURNAL_MODEL_FIELD = "LLMUX_MODEL"

MODEL_NAME_MAX = 64
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")
MODEL_NAME_RULE = (
    f"1-{MODEL_NAME_MAX} characters from A-Z a-z 0-9 . _ : @ + -, starting with a letter "
    "or digit, without '..' (no '/', spaces or other characters: the name becomes a unit "
    "name, a D-Bus path, a metric label and a directory)"
)


def validate_model_name(name: object) -> None:
    """Raise ValueError saying what is allowed when `name` is not a safe model name."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, not {type(name).__name__}; {MODEL_NAME_RULE}")
    if not name or len(name) > MODEL_NAME_MAX or ".." in name or not _MODEL_NAME_RE.match(name):
        raise ValueError(f"invalid model name {name!r}: use {MODEL_NAME_RULE}")


_HEX = frozenset("0123456789abcdefABCDEF")
_UNIT_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def systemd_escape(text: str) -> str:
    """`systemd-escape TEXT` (not --path): '/' -> '-', unsafe bytes -> \\xNN,
    a leading '.' escaped too."""
    out = []
    for i, byte in enumerate(text.encode("utf-8")):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif ch in _UNIT_SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def systemd_unescape(text: str) -> str:
    """Inverse of `systemd_escape`; raises ValueError on a malformed escape
    (as `systemd-escape --unescape` fails)."""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "\\":
            code = text[i + 2 : i + 4]
            if not text.startswith("\\x", i) or len(code) != 2 or not set(code) <= _HEX:
                raise ValueError(f"malformed escape in {text!r} at {i}; expected \\xNN")
            raw.append(int(code, 16))
            i += 4
        elif text[i] == "-":
            raw.append(ord("/"))
            i += 1
        else:
            raw.extend(text[i].encode())
            i += 1
    return raw.decode("utf-8")


def unit_name(model: str) -> str:
    """The transient unit that runs `model`: llmux-model-<escaped>.service."""
    return f"{UNIT_PREFIX}{systemd_escape(model)}{UNIT_SUFFIX}"


def model_from_unit(unit: str) -> str | None:
    """The model a llmux unit name belongs to, or None if it is not one of ours."""
    if not (unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX)):
        return None
    try:
        return systemd_unescape(unit[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)])
    except (ValueError, UnicodeDecodeError):
        return None


def bus_path_escape(text: str) -> str:
    """sd_bus_path_encode()'s rule for one path element: bytes outside
    [A-Za-z0-9], and a digit in first place, become _xx (lower-case hex);
    the empty string is '_'."""
    if not text:
        return "_"
    out = []
    for i, byte in enumerate(text.encode("utf-8")):
        ch = chr(byte)
        keep = ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0))
        out.append(ch if keep else f"_{byte:02x}")
    return "".join(out)


def bus_path_unescape(text: str) -> str:
    """Inverse of `bus_path_escape` (sd_bus_path_decode): '_' not followed
    by two hex digits is taken literally, as sd-bus does."""
    if text == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "_" and i + 2 < len(text) and text[i + 1] in _HEX and text[i + 2] in _HEX:
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(text[i].encode())
            i += 1
    return raw.decode("utf-8")


def model_object_path(model: str) -> str:
    return f"{MODEL_PATH_PREFIX}/{bus_path_escape(model)}"


def model_from_object_path(path: str) -> str | None:
    prefix = MODEL_PATH_PREFIX + "/"
    if not path.startswith(prefix) or "/" in path[len(prefix) :]:
        return None
    try:
        return bus_path_unescape(path[len(prefix) :])
    except (ValueError, UnicodeDecodeError):
        return None
