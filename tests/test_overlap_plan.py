"""The overlap plan (llmuxd/switching/overlap.py): pure, table-driven."""

from __future__ import annotations

import pytest

from llmuxd.eviction import Eviction
from llmuxd.switching.overlap import OVERLAPPED, Side, plan_overlap, switch_summary

OFFLOAD = Eviction.parse("offload+keep_running")
DISCARD = Eviction.parse("discard+keep_running")
FREEZE = Eviction.parse("offload+freeze")
STOP = Eviction.parse("retain+stop")


def side(name: str, weights=16.0, eviction=OFFLOAD, refused=None, parts=True) -> Side:
    return Side(name, weights, eviction, refused, parts)


CASES = [
    # id, mode, budget, others, victims, target, reason starts with
    ("offload-offload", "auto", 40, 0, [side("a")], side("b"), OVERLAPPED),
    ("offload-discard", "auto", 40, 0, [side("a")], side("b", eviction=DISCARD), OVERLAPPED),
    ("discard-offload", "on", 40, 0, [side("a", eviction=DISCARD)], side("b"), OVERLAPPED),
    ("exactly-fits", "auto", 32, 0, [side("a")], side("b"), OVERLAPPED),
    ("two-victims", "auto", 40, 0, [side("a", 8), side("c", 8)], side("b"), OVERLAPPED),
    ("off", "off", 40, 0, [side("a")], side("b"), "off:"),
    ("over-budget", "auto", 30, 0, [side("a")], side("b"), "budget: weights a 16 + b 16 GiB exceed budget_gib 30"),
    ("others-hold", "auto", 40, 10, [side("a")], side("b"), "budget: weights a 16 + b 16 GiB + 10 held by others"),
    ("no-budget", "auto", None, 0, [side("a")], side("b"), "budget: the group has no budget_gib"),
    ("unknown-size", "auto", 40, 0, [side("a", None)], side("b"), "budget: the weights size of a is unknown"),
    ("victim-freeze", "auto", 40, 0, [side("a", eviction=FREEZE)], side("b"), "eviction: a:"),
    ("victim-stop", "auto", 40, 0, [side("a", eviction=STOP)], side("b"), "eviction: a:"),
    ("target-cold", "auto", 40, 0, [side("a")], side("b", parts=False), "eviction: b: not asleep"),
    ("refused-before", "auto", 40, 0, [side("a", refused="HTTP 500: no")], side("b"), "engine: a refused"),
]


@pytest.mark.parametrize("mode,budget,others,victims,target,reason",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(mode, budget, others, victims, target, reason):
    plan = plan_overlap(mode, budget, others, victims, target)
    assert plan.reason.startswith(reason), plan.reason
    assert plan.overlap is (reason == OVERLAPPED)


def test_backends_without_partial_steps_do_not_overlap():
    plan = plan_overlap("auto", 40, 0, [side("a")], side("b"), partial_steps=False)
    assert not plan.overlap and plan.reason.startswith("engine:")


@pytest.mark.parametrize("overlap,head", [
    (OVERLAPPED, "overlapped in 1.00s: "),
    ("budget: too big", "sequential (budget: too big) in 1.00s: "),
    (None, "sequential in 1.00s: "),
])
def test_switch_summary_says_how_and_each_phase(overlap, head):
    line = switch_summary(1.0, {"drain": 0.1, "weights_in": 0.5}, overlap)
    assert line == head + "drain 0.10s, weights_in 0.50s"
    assert switch_summary(1.0, {}, overlap, ok=False) == "FAILED: " + head.rstrip(": ")
