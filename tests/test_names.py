"""Model names and their spellings as unit names and D-Bus object paths.

The escapings are checked against the real implementations where this
machine has them: the `systemd-escape` binary and libsystemd's
sd_bus_path_encode/decode (through ctypes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess

import pytest

from llmuxd.names import (
    MODEL_NAME_MAX,
    bus_path_escape,
    bus_path_unescape,
    model_from_object_path,
    model_from_unit,
    model_object_path,
    systemd_escape,
    systemd_unescape,
    unit_name,
    validate_model_name,
)

GOOD_NAMES = [
    "qwen",
    "llama-3.1-8b",
    "Qwen3-14B",
    "7b-chat",
    "org:model@v2",
    "a+b_c.d",
    "x" * MODEL_NAME_MAX,
]

BAD_NAMES = [
    ("", "empty"),
    ("org/model", "slash"),
    ("my model", "space"),
    ("ünïcode", "non-ASCII"),
    ("a..b", "dot dot"),
    ("..", "parent dir"),
    (".hidden", "leading dot"),
    ("-flag", "leading dash"),
    ("tab\tname", "control char"),
    ("x" * (MODEL_NAME_MAX + 1), "too long"),
    ("a\\b", "backslash"),
]

# Names the escapings must handle even though they are not valid model names
# (unit and path helpers are also used on arbitrary strings).
ESCAPE_SAMPLES = GOOD_NAMES + ["a b", "org/model", ".hidden", "ünï", "a\\b", "x-y/z", "3"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted(name):
    validate_model_name(name)


@pytest.mark.parametrize("name,why", BAD_NAMES)
def test_bad_names_are_rejected_with_the_rule(name, why):
    with pytest.raises(ValueError) as info:
        validate_model_name(name)
    message = str(info.value)
    assert message.startswith(f"invalid model name {name!r}: use 1-{MODEL_NAME_MAX} characters")
    assert "no '/', spaces" in message


@pytest.mark.parametrize("value", [None, 5, b"bytes"])
def test_non_string_names_say_what_type_they_were(value):
    with pytest.raises(ValueError, match=f"model name must be a string, not {type(value).__name__}"):
        validate_model_name(value)


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="needs systemd-escape")
@pytest.mark.parametrize("text", ESCAPE_SAMPLES)
def test_systemd_escape_matches_the_real_binary(text):
    real = subprocess.run(["systemd-escape", "--", text], capture_output=True, text=True, check=True)
    assert systemd_escape(text) == real.stdout.rstrip("\n")
    back = subprocess.run(
        ["systemd-escape", "--unescape", "--", systemd_escape(text)], capture_output=True, text=True, check=True
    )
    assert systemd_unescape(systemd_escape(text)) == back.stdout.rstrip("\n")


@pytest.mark.parametrize(
    "text,escaped",
    [
        ("llama-3.1-8b", "llama\\x2d3.1\\x2d8b"),
        ("org/model", "org-model"),
        (".hidden", "\\x2ehidden"),
        ("a b", "a\\x20b"),
        ("qwen:7b@v2", "qwen:7b\\x40v2"),
    ],
)
def test_systemd_escape_known_outputs(text, escaped):
    assert systemd_escape(text) == escaped
    assert systemd_unescape(escaped) == text


@pytest.mark.parametrize("bad", ["a\\x2", "a\\b", "a\\xZZ"])
def test_systemd_unescape_rejects_malformed_escapes(bad):
    with pytest.raises(ValueError, match="malformed escape"):
        systemd_unescape(bad)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_unit_name_round_trips(name):
    unit = unit_name(name)
    assert unit.startswith("llmux-model-") and unit.endswith(".service")
    assert model_from_unit(unit) == name


def test_unit_name_example():
    assert unit_name("llama-3.1-8b") == "llmux-model-llama\\x2d3.1\\x2d8b.service"


@pytest.mark.parametrize("unit", ["sshd.service", "llmux-model-x.socket", "llmux-model-bad\\x2.service"])
def test_foreign_or_malformed_units_are_not_models(unit):
    assert model_from_unit(unit) is None


@pytest.mark.parametrize(
    "text,escaped",
    [  # known sd-bus outputs
        ("llama-3.1-8b", "llama_2d3_2e1_2d8b"),
        ("Qwen", "Qwen"),
        ("x_y", "x_5fy"),
        ("7b-chat", "_37b_2dchat"),  # a leading digit is escaped
        ("a b", "a_20b"),
        ("ünï", "_c3_bcn_c3_af"),
        ("", "_"),
    ],
)
def test_bus_path_escape_known_outputs(text, escaped):
    assert bus_path_escape(text) == escaped
    assert bus_path_unescape(escaped) == text


def _libsystemd():
    path = ctypes.util.find_library("systemd")
    if not path:
        return None
    lib = ctypes.CDLL(path)
    lib.sd_bus_path_encode.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.sd_bus_path_decode.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    return lib


def _take_string(pointer: ctypes.c_void_p) -> str:
    try:
        return ctypes.string_at(pointer.value).decode("utf-8")
    finally:
        ctypes.CDLL(None).free(pointer)


LIBSYSTEMD = _libsystemd()


@pytest.mark.skipif(LIBSYSTEMD is None, reason="needs libsystemd")
@pytest.mark.parametrize("text", ESCAPE_SAMPLES)
def test_bus_path_escape_matches_sd_bus(text):
    out = ctypes.c_void_p()
    assert LIBSYSTEMD.sd_bus_path_encode(b"/io/llmux/LLMux1/model", text.encode(), ctypes.byref(out)) >= 0
    assert model_object_path(text) == _take_string(out)


@pytest.mark.skipif(LIBSYSTEMD is None, reason="needs libsystemd")
@pytest.mark.parametrize("element", ["_2d", "a_", "a_4", "a_zz12", "_33b", "x_5fy_", "_"])
def test_bus_path_unescape_matches_sd_bus_on_odd_input(element):
    out = ctypes.c_void_p()
    assert LIBSYSTEMD.sd_bus_path_decode(f"/p/{element}".encode(), b"/p", ctypes.byref(out)) > 0
    assert bus_path_unescape(element) == _take_string(out)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_model_object_path_round_trips(name):
    path = model_object_path(name)
    assert path.startswith("/io/llmux/LLMux1/model/")
    assert model_from_object_path(path) == name


@pytest.mark.parametrize("path", ["/io/llmux/LLMux1", "/io/llmux/LLMux1/model/a/b", "/other/model/x"])
def test_other_object_paths_are_not_models(path):
    assert model_from_object_path(path) is None
