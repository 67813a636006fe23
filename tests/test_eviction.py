"""Eviction: parsing every accepted spelling, formatting, legacy levels, and
the combinations that are refused."""

from __future__ import annotations

import pytest

from llmuxd.eviction import (
    DEFAULT_EVICTION,
    STOP_EVICTION,
    Eviction,
    EvictionError,
    ProcessStrategy as P,
    WeightStrategy as W,
)

PARSES = [
    ("offload+keep_running", W.OFFLOAD, P.KEEP_RUNNING),
    ("discard+checkpoint", W.DISCARD, P.CHECKPOINT),
    ("retain+cuda_suspend", W.RETAIN, P.CUDA_SUSPEND),
    ("retain+stop", W.RETAIN, P.STOP),
    ("offload+freeze", W.OFFLOAD, P.FREEZE),
    (" Offload + Keep-Running ", W.OFFLOAD, P.KEEP_RUNNING),  # case, spaces, dash
    ({"weights": "discard", "process": "keep_running"}, W.DISCARD, P.KEEP_RUNNING),  # llmux 0.7 JSON
    (1, W.OFFLOAD, P.KEEP_RUNNING),
    (2, W.DISCARD, P.KEEP_RUNNING),
    (3, W.RETAIN, P.CUDA_SUSPEND),
    (4, W.DISCARD, P.CHECKPOINT),
    (5, W.RETAIN, P.STOP),
    ("4", W.DISCARD, P.CHECKPOINT),
]


@pytest.mark.parametrize("value,weights,process", PARSES)
def test_parse(value, weights, process):
    assert Eviction.parse(value) == Eviction(weights, process)


def test_parse_passes_an_eviction_through():
    assert Eviction.parse(DEFAULT_EVICTION) is DEFAULT_EVICTION


@pytest.mark.parametrize("weights", list(W))
@pytest.mark.parametrize("process", list(P))
def test_format_round_trips_for_every_combination(weights, process):
    eviction = Eviction(weights, process)
    assert str(eviction) == f"{weights.value}+{process.value}"
    assert Eviction.parse(str(eviction)) == eviction
    assert Eviction.parse(eviction.to_dict()) == eviction


BAD = [
    ("offload", "invalid eviction 'offload'; write 'WEIGHTS+PROCESS'"),
    ("offload+", "invalid eviction 'offload+'; write 'WEIGHTS+PROCESS'"),
    ("a+b+c", "invalid eviction 'a+b+c'"),
    ("offlaod+keep_running", "unknown weights strategy 'offlaod'; allowed: retain, offload, discard"),
    ("offload+sleep", "unknown process strategy 'sleep'; allowed: keep_running, freeze, cuda_suspend, checkpoint, stop"),
    (0, "legacy eviction level 0 does not exist; use 1-5"),
    (6, "legacy eviction level 6 does not exist; use 1-5"),
    ("9", "legacy eviction level 9 does not exist"),
    (True, "eviction must be a string, not True"),
    (1.5, "eviction must be a string, not float"),
    (None, "eviction must be a string, not NoneType"),
    ({"weights": "offload"}, "eviction is missing ['process']"),
    ({"weights": "offload", "process": "stop", "level": 1}, "unknown eviction key(s) ['level']; allowed: weights, process"),
]


@pytest.mark.parametrize("value,message", BAD)
def test_bad_evictions_say_what_is_allowed(value, message):
    with pytest.raises(EvictionError) as info:
        Eviction.parse(value)
    assert str(info.value).startswith(message)


def test_eviction_error_is_a_value_error():
    assert issubclass(EvictionError, ValueError)


@pytest.mark.parametrize(
    "eviction,level",
    [("retain+stop", None), ("offload+keep_running", 1), ("discard+checkpoint", 2), ("retain+cuda_suspend", None)],
)
def test_sleep_level(eviction, level):
    assert Eviction.parse(eviction).sleep_level == level


@pytest.mark.parametrize(
    "eviction,noop,frees",
    [
        ("retain+keep_running", True, False),
        ("offload+keep_running", False, False),
        ("retain+freeze", False, False),
        ("discard+checkpoint", False, True),
        ("retain+stop", False, True),
    ],
)
def test_noop_and_frees_process(eviction, noop, frees):
    parsed = Eviction.parse(eviction)
    assert parsed.is_noop is noop
    assert parsed.frees_process is frees


def test_defaults():
    assert str(DEFAULT_EVICTION) == "offload+keep_running"
    assert str(STOP_EVICTION) == "retain+stop"



def test_eviction_is_hashable_and_immutable():
    eviction = Eviction.parse("offload+freeze")
    assert {eviction: 1}[Eviction(W.OFFLOAD, P.FREEZE)] == 1
    with pytest.raises(Exception):
        eviction.weights = W.DISCARD  # type: ignore[misc]
