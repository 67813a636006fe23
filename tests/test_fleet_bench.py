"""The fleet benchmark's simulation counts what it claims to count (benchmarks/fleet.py).

A verdict of "0 lost, 0 misrouted" means something only if a lost or misrouted request
would be counted: the negative controls inject both and must see them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fleet  # noqa: E402

SMALL = dict(service=0.5, switch_cost=5.0, start_cost=20.0, duration=40.0, refresh=1.0, seed=3)


@pytest.mark.parametrize("routing", fleet.SIM_ROUTINGS)
def test_every_routing_serves_every_request_of_a_skewed_shifting_fleet(routing: str) -> None:
    t = fleet.simulate(fleet.SimProfile(3, "shift"), routing, **SMALL)
    assert t.requests > 50
    assert (t.lost, t.misrouted, t.other) == (0, 0, 0)
    assert t.served == t.requests


@pytest.mark.parametrize("fault, counted", [("misroute", "misrouted"), ("drop", "lost")])
def test_injected_faults_are_counted(fault: str, counted: str) -> None:
    t = fleet.simulate(fleet.SimProfile(3, "uniform", 1), "shuffle", fault=fault, **SMALL)
    assert getattr(t, counted) > 0
    assert t.served < t.requests


def test_the_static_assignment_gives_a_hot_model_several_hosts() -> None:
    profile = fleet.SimProfile(8, "zipf")
    names = [f"m{i}" for i in range(profile.models)]
    where = fleet.static_assignment(profile, names, [f"h{i}" for i in range(8)])
    assert profile.demand(False)[0] > 1.0  # the hot model asks more than one host
    assert len(where[names[0]]) >= 2
    assert all(where[n] for n in names)


def test_shift_moves_popularity_in_the_second_half() -> None:
    profile = fleet.SimProfile(4, "shift")
    early, late = profile.demand(False), profile.demand(True)
    assert early[0] == max(early) and late[0] < early[0] and sum(early) == pytest.approx(sum(late))
