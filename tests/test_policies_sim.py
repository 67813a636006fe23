"""The policy benchmark keeps working and keeps its promise (virtual time: no wall-clock timing).

benchmarks/policy_sim.py drives the real switcher through llmux 0.7's workloads; here it runs the
main sweep and checks what benchmarks/README.md claims: no request lost, and our best policy's
GPU serving share at least llmux 0.7's best on every profile and switch cost.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "policy_sim.py")
_spec = importlib.util.spec_from_file_location("policy_sim", _PATH)
policy_sim = importlib.util.module_from_spec(_spec)
sys.modules["policy_sim"] = policy_sim  # dataclasses look their module up there
_spec.loader.exec_module(policy_sim)  # type: ignore[union-attr]


@pytest.mark.parametrize("cost", policy_sim.SWITCH_COSTS)
def test_best_policy_matches_or_beats_llmux_07(cost):
    shortfalls = []
    for profile in policy_sim.PROFILES:
        results = [policy_sim.simulate(profile, p, cost, 0.5) for p in policy_sim.POLICIES]
        assert all(r.served == r.requests for r in results)
        ours = max(r.gpu_percent for r in results)
        ref = policy_sim.LLMUX_BEST_GPU[profile][policy_sim.SWITCH_COSTS.index(cost)]
        if ours + 0.05 < ref:
            shortfalls.append(f"{profile}: ours {ours:.1f}% < llmux {ref:.1f}%")
    assert not shortfalls


def test_overhead_reports_microseconds():
    assert "µs per request" in policy_sim.overhead(iterations=1000)


#: profiles whose arrivals are llmux's own: the `random_*` ones come from our LCG, not llmux's,
#: so their waits are not comparable point by point (benchmarks/README.md)
SAME_ARRIVALS = [p for p in policy_sim.PROFILES if not p.startswith("random_")]


@pytest.mark.parametrize("cost", policy_sim.SWITCH_COSTS)
def test_time_slice_waits_at_most_llmux_timeslice(cost):
    """Issue #26: our best policy's worst wait is at or below llmux 0.7's TimeSlice's (to the
    0.1 s its table gives), with the GPU share at or above llmux's best, on every profile."""
    i = policy_sim.SWITCH_COSTS.index(cost)
    worse = []
    for profile in SAME_ARRIVALS:
        r = policy_sim.simulate(profile, "time_slice", cost, 0.5)
        if round(r.max_wait, 1) > policy_sim.LLMUX_TIMESLICE_MAX_WAIT[profile][i]:
            worse.append(f"{profile}: max wait {r.max_wait:.2f} s > {policy_sim.LLMUX_TIMESLICE_MAX_WAIT[profile][i]}")
        if r.gpu_percent + 0.05 < policy_sim.LLMUX_BEST_GPU[profile][i]:
            worse.append(f"{profile}: GPU {r.gpu_percent:.1f} % < {policy_sim.LLMUX_BEST_GPU[profile][i]}")
    assert not worse


@pytest.mark.parametrize("policy", policy_sim.POLICIES)
def test_mixed_priority_profiles_serve_every_request(policy):
    """Issue #23: batch is never starved, nothing is lost, with priorities and without."""
    for profile in policy_sim.PRIORITY_PROFILES:
        for priorities in (True, False):
            r = policy_sim.simulate(profile, policy, 5.0, 0.5, priorities=priorities)
            assert r.served == r.requests  # simulate() asserts it too; here it is the point
            batch = sum(1 for w in policy_sim.PRIORITY_PROFILES[profile] if w[2] is policy_sim.Priority.BATCH)
            assert len(r.waits["batch"]) == batch and r.batch_done_at > 0


@pytest.mark.parametrize("model,wake", [("sequential", 10.0), ("overlap-l1", 10.0 * 10.6 / 12.8),
                                        ("overlap-l2", 10.0 * 6.5 / 6.8)])
def test_overlap_cost_model_costs_the_larger_half(model, wake):
    assert policy_sim.switch_delays(10.0, model) == pytest.approx((0.0, wake))


def test_overlap_never_costs_more_gpu_time():
    seq = policy_sim.simulate("three_model", "time_slice", 10.0, 0.5)
    for model in ("overlap-l1", "overlap-l2"):
        r = policy_sim.simulate("three_model", "time_slice", 10.0, 0.5, cost_model=model)
        assert r.served == r.requests and r.switch_time < seq.switch_time
