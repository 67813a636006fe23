"""The one exception <-> D-Bus error name registry."""

from __future__ import annotations

import pytest
from dbus_fast import DBusError
from dbus_fast.validators import is_interface_name_valid

import llmuxd.switcher  # noqa: F401  (registers the switcher's own errors)
from llmuxd.bus.errors import describe, error_name, registry, to_dbus_error
from llmuxd.errors import (
    InvalidConfig,
    InvalidEviction,
    ModelPinned,
    NotSupported,
    QueueFull,
    SwitchFailed,
    SwitchTimeout,
    UnknownModel,
)
from llmuxd.eviction import Eviction, EvictionError

E = "io.llmux.LLMux1.Error."


def test_every_llmux_error_has_a_valid_bus_name():
    names = registry()
    assert all(is_interface_name_valid(n) for n in names), sorted(names)
    assert {E + "NoSuchModel", E + "ModelPinned", E + "InvalidEviction", E + "SwitchFailed",
            E + "Timeout", E + "InvalidConfig", E + "NotSupported", E + "QueueFull"} <= set(names)


@pytest.mark.parametrize(
    "exc,name",
    [
        (UnknownModel("x", ["a"]), E + "NoSuchModel"),
        (ModelPinned("x", "a"), E + "ModelPinned"),
        (InvalidEviction("bad"), E + "InvalidEviction"),
        (SwitchFailed("x", "wake", "oom"), E + "SwitchFailed"),
        (SwitchTimeout("x", 3.0), E + "Timeout"),
        (InvalidConfig("bad"), E + "InvalidConfig"),
        (NotSupported("no criu"), E + "NotSupported"),
        (QueueFull("x", 10), E + "QueueFull"),
    ],
)
def test_llmux_errors_keep_their_message(exc, name):
    err = to_dbus_error(exc)
    assert (err.type, err.text) == (name, str(exc))
    assert error_name(type(exc)) == name


def test_eviction_parse_errors_are_invalid_eviction():
    with pytest.raises(EvictionError) as info:
        Eviction.parse("offload+nap")
    err = to_dbus_error(info.value)
    assert err.type == E + "InvalidEviction" and "nap" in err.text


def test_a_bug_becomes_failed_without_internals(caplog):
    try:
        raise KeyError("/usr/lib/python3/dist-packages/llmuxd/x.py line 3\nmore")
    except KeyError as exc:
        err = to_dbus_error(exc)
    assert err.type == "org.freedesktop.DBus.Error.Failed"
    assert err.text == "internal error (KeyError); details are in the daemon's log (journalctl -u llmuxd)"
    assert "KeyError" in caplog.text  # the operator still gets the traceback


def test_multi_line_messages_become_one_line():
    err = to_dbus_error(InvalidConfig("config.yaml:\n  models.x: bad\nconfig.yaml: listen: bad  port\n"))
    assert err.text == "config.yaml: models.x: bad; config.yaml: listen: bad port"


def test_dbus_errors_pass_through_and_names_shorten():
    original = DBusError("org.freedesktop.DBus.Error.AccessDenied", "no")
    assert to_dbus_error(original) is original
    assert describe(E + "NoSuchModel") == "NoSuchModel"
    assert describe("org.freedesktop.DBus.Error.AccessDenied") == "AccessDenied"
