"""Properties of the config parsers and the name escapings, over generated input (hypothesis).

Two kinds of claims, for every input hypothesis can think of, not just the
examples in test_config.py and test_names.py:
- round trips: what a person writes ('1h30m', '16MiB', '[::1]:3000', a model
  name) comes back as the value it means; an escaped name unescapes to itself;
- never a crash: any other input is refused with a ValueError whose message
  says what is allowed (the config loader turns it into a ConfigError naming
  the file and key), never a traceback. The escapings are also checked against
  libsystemd's own sd_bus_path_encode/decode and the `systemd-escape` binary.
"""

from __future__ import annotations

import ctypes
import math
import string
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmuxd.config import Config, ConfigError, parse_duration, parse_listen, parse_size
from llmuxd.names import bus_path_escape, bus_path_unescape, systemd_escape, systemd_unescape
from test_names import LIBSYSTEMD

#: pure functions, but the machine is shared: no per-example deadline
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: anything a YAML file or a caller could hand over
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(), st.binary(), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.from_regex(r"\s*-?[0-9]{1,12}(\.[0-9]*)?\s*[a-zA-Z]{0,4}\s*", fullmatch=True),
)
#: numbers of every magnitude, bare and as text with a unit (YAML reads 1e400 as inf, 10**400 as an int)
MAGNITUDES = st.builds(lambda digits, sign: sign * 10**digits - sign, st.integers(0, 500), st.sampled_from([1, -1]))
ANY_VALUE = st.one_of(ANY_VALUE, MAGNITUDES, st.builds(lambda n, unit: f"{n}{unit}", MAGNITUDES,
                                                        st.sampled_from(["", "s", "ms", "h", "MiB", "GB", "k"])))


def refused_or(fn, value, check) -> None:
    """fn(value) returns a result or raises ValueError; `check(result, message)`
    judges either. Any other exception is the failure."""
    try:
        result = fn(value)
    except ValueError as exc:
        check(None, str(exc))
        return
    check(result, None)


# ----------------------------------------------------------------- durations

UNITS_S = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}


@relaxed
@given(st.dictionaries(st.sampled_from(list(UNITS_S)), st.integers(0, 10**6), min_size=1),
       st.sampled_from(["", " "]))
def test_a_compound_duration_is_the_sum_of_its_parts(parts, gap):
    text = gap.join(f"{n}{unit}" for unit, n in sorted(parts.items(), key=lambda kv: -UNITS_S[kv[0]]))
    expected = sum(n * UNITS_S[unit] for unit, n in parts.items())
    assert parse_duration(text) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert parse_duration(text.upper()) == parse_duration(text)


@relaxed
@given(st.one_of(st.integers(0, 10**15), st.floats(0, 1e15)))
def test_a_number_of_seconds_is_itself_as_number_or_text(seconds):
    assert parse_duration(seconds) == float(seconds)
    assert parse_duration(repr(seconds)) == float(seconds)
    if seconds:
        with pytest.raises(ValueError, match="negative duration"):
            parse_duration(-seconds)


@relaxed
@given(ANY_VALUE)
def test_parse_duration_never_crashes(value):
    def check(result, error):
        if error is None:
            assert isinstance(result, float) and math.isfinite(result) and result >= 0, result
        else:
            assert "duration" in error, error

    refused_or(parse_duration, value, check)


# --------------------------------------------------------------------- sizes

SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
              "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


@relaxed
@given(st.integers(1, 10**6), st.sampled_from(list(SIZE_UNITS)), st.sampled_from(["", " "]), st.booleans())
def test_a_size_with_a_unit_is_that_many_bytes(n, unit, gap, upper):
    text = f"{n}{gap if unit else ''}{unit.upper() if upper else unit}"
    assert parse_size(text) == n * SIZE_UNITS[unit]
    assert parse_size(n) == n


@relaxed
@given(ANY_VALUE)
def test_parse_size_never_crashes(value):
    def check(result, error):
        if error is None:
            assert isinstance(result, int) and result > 0, result
        else:
            assert "size" in error, error

    refused_or(parse_size, value, check)


# ------------------------------------------------------------ listen address

#: every character str.isdigit() accepts: digits of any script, superscripts
DIGITS = [c for c in map(chr, range(0x30000)) if c.isdigit()]
HOSTS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
)
PORTS = st.integers(1, 65535)


@relaxed
@given(HOSTS, PORTS)
def test_host_and_port_round_trip(host, port):
    assert parse_listen(f"{host}:{port}") == ("tcp", host, port)


@relaxed
@given(st.ip_addresses(v=6).map(str), PORTS)
def test_a_bracketed_ipv6_address_round_trips(host, port):
    assert parse_listen(f"[{host}]:{port}") == ("tcp", host, port)


@relaxed
@given(st.text(min_size=1).map(lambda t: "/" + t))
def test_a_unix_socket_path_round_trips(path):
    assert parse_listen(f"unix:{path}") == ("unix", path, 0)


@relaxed
@given(st.one_of(ANY_VALUE, st.builds(lambda h, p: f"{h}:{p}", st.text(max_size=8), st.text(max_size=6))))
def test_parse_listen_never_crashes_and_says_what_is_allowed(value):
    _judge_listen(value)


@relaxed
@given(HOSTS, st.text(st.sampled_from(DIGITS), min_size=1, max_size=5))
def test_a_port_in_digits_of_another_script_is_refused_with_help(host, port):
    _judge_listen(f"{host}:{port}")


def _judge_listen(value) -> None:
    def check(result, error):
        if error is None:
            kind, where, port = result
            assert (kind == "unix" and where.startswith("/") and port == 0) or \
                   (kind == "tcp" and where and 1 <= port <= 65535), result
        else:
            assert "HOST:PORT" in error, error

    refused_or(parse_listen, value, check)


# ------------------------------------------------------------------ escaping

UNIT_ESCAPED = set(string.ascii_letters + string.digits + ":_.-\\x")
BUS_ESCAPED = set(string.ascii_letters + string.digits + "_")


@relaxed
@given(st.text())
def test_systemd_escape_round_trips_into_unit_name_characters(text):
    escaped = systemd_escape(text)
    assert set(escaped) <= UNIT_ESCAPED and not escaped.startswith(".")
    assert systemd_unescape(escaped) == text


@settings(deadline=None, max_examples=25)  # one process per example
@given(st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1))
def test_systemd_escape_is_what_the_systemd_escape_binary_prints(text):
    real = subprocess.run(["systemd-escape", "--", text], capture_output=True, text=True, check=True)
    assert systemd_escape(text) == real.stdout.rstrip("\n")


@relaxed
@given(st.text())
def test_systemd_unescape_of_anything_is_text_or_a_value_error(text):
    try:
        assert isinstance(systemd_unescape(text), str)
    except ValueError:  # malformed escape, or bytes that are not UTF-8
        pass


@relaxed
@given(st.text())
def test_bus_path_escape_round_trips_into_path_characters(text):
    escaped = bus_path_escape(text)
    assert escaped and set(escaped) <= BUS_ESCAPED and not escaped[0].isdigit()
    assert bus_path_unescape(escaped) == text


def _sd_bus(fn, *args: bytes) -> bytes | None:
    """Call sd_bus_path_encode (0: done) or _decode (1: done, 0: prefix did
    not match); the string it allocated, or None."""
    out = ctypes.c_void_p()
    if fn(*args, ctypes.byref(out)) < 0 or not out.value:
        return None
    try:
        return ctypes.string_at(out.value)
    finally:
        ctypes.CDLL(None).free(out)


@relaxed
@given(st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))))
def test_bus_path_escape_is_sd_bus_path_encode(text):
    assert LIBSYSTEMD is not None, "libsystemd is part of the systemd package the tests need"
    encoded = _sd_bus(LIBSYSTEMD.sd_bus_path_encode, b"/p", text.encode())
    assert encoded == f"/p/{bus_path_escape(text)}".encode()


@relaxed
@given(st.text(alphabet=sorted(BUS_ESCAPED), min_size=1))
def test_bus_path_unescape_is_sd_bus_path_decode(element):
    assert LIBSYSTEMD is not None, "libsystemd is part of the systemd package the tests need"
    decoded = _sd_bus(LIBSYSTEMD.sd_bus_path_decode, f"/p/{element}".encode(), b"/p")
    try:
        ours = bus_path_unescape(element).encode()
    except UnicodeDecodeError:  # sd-bus hands back the raw bytes; they are not text
        assert decoded is not None
        with pytest.raises(UnicodeDecodeError):
            decoded.decode("utf-8")
        return
    assert decoded == ours


# ------------------------------------- what the properties found, as a user sees it


@pytest.mark.parametrize("settings_, key", [
    ({"policy": {"request_timeout": 10**400}}, "policy.request_timeout"),
    ({"max_body_bytes": "9" * 400}, "max_body_bytes"),
    ({"listen": "127.0.0.1:\u00b2"}, "listen"),
], ids=["duration-beyond-float", "size-beyond-float", "superscript-port"])
def test_a_config_with_such_values_is_refused_naming_the_key(settings_, key):
    """Before: OverflowError tracebacks from load_config, and int()'s own message."""
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"models": {"a": {"model_path": "org/a"}}, **settings_})
    assert f"{key}:" in str(err.value) and ("too large" in str(err.value) or "HOST:PORT" in str(err.value)), err.value
