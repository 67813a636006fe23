"""The three-model variant: llmux 0.7 added qwen3-4b to some scripts for
memory pressure (10_repro_l2_wake_failure found "/wake_up returned error"
after level-2 sleeps in three-model cycling).

`alpha` sleeps at level 1, `beta` at level 2 (weights discarded, reloaded on
wake), `gamma` offloads and is frozen (SIGSTOP of its process group in
embedded mode). A second daemon runs the same models in one GPU group whose
memory budget admits two awake at once; the watcher then allows two, never
three.
"""

from __future__ import annotations

import pytest

from harness import (
    Req, Scenario, SimModel, Wave, alternating, burst, check, mixed, run_scenario, start_daemon,
    stop_and_check,
)

A, B, G = "alpha", "beta", "gamma"


def models(**extra) -> list[SimModel]:
    return [SimModel(A, eviction="offload+keep_running", extra=dict(extra)),
            SimModel(B, eviction="discard+keep_running", extra=dict(extra)),
            SimModel(G, eviction="offload+freeze", extra=dict(extra))]


def chain(groups: list[list[Req]], prefix: str) -> list[Wave]:
    return [Wave(reqs, name=f"{prefix}{i}", after=f"{prefix}{i - 1}" if i else None)
            for i, reqs in enumerate(groups)]


SCENARIOS = [
    Scenario("10_repro_l2_wake_failure",
             chain([[Req(m)] for _ in range(6) for m in (B, A, B, G)], "l"),
             note="level-2 sleep/wake of beta between the two others: no wake failure, no garbage"),
    Scenario("04_rapid_alternation_3", [Wave(alternating([A, B, G], 30))]),
    Scenario("08_switch_storm_3", [Wave(burst(A, 10) + burst(B, 10) + burst(G, 10), at=0.3 * i)
                                   for i in range(5)]),
    Scenario("13_abandoned_streams_frozen",
             [Wave([Req(G)], name="prime"),
              Wave(burst(G, 6, stream=True, max_tokens=2000, abandon_after=0.5), after="prime", name="gone"),
              Wave(burst(A, 5) + burst(B, 5) + burst(G, 5), after="gone")],
             note="gamma is frozen after its abandoned streams drain; then it is thawed and serves"),
    Scenario("14_mega_storm_3",
             [Wave(burst(A, 60)), Wave(burst(B, 60), at=0.1), Wave(burst(G, 60), at=0.2),
              Wave(alternating([A, B, G], 30, stream=True, max_tokens=10), at=0.3),
              Wave(alternating([G, B, A], 90, max_tokens=1), at=0.4)]),
    Scenario("19_endurance_3", chain([mixed([A, B, G], 20, seed=300 + i) for i in range(6)], "e")),
]


@pytest.fixture(scope="module")
def daemon(stress_tmp):
    d = start_daemon(stress_tmp / "one-awake", models())
    yield d
    stop_and_check(d)


@pytest.fixture(scope="module")
def budget_daemon(stress_tmp):
    """Three 20 GiB models in a 40 GiB group: two may be awake together."""
    d = start_daemon(stress_tmp / "budget", models(gpu_memory_gib=20),
                     groups={"default": {"budget_gib": 40}})
    yield d
    stop_and_check(d)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_three_models(daemon, scenario):
    check(await run_scenario(daemon, scenario))


BUDGET_SCENARIOS = [
    Scenario("budget_alternation", [Wave(alternating([A, B, G], 60))]),
    Scenario("budget_storm", [Wave(burst(A, 20) + burst(B, 20) + burst(G, 20), at=0.3 * i) for i in range(4)]),
    Scenario("budget_endurance", chain([mixed([A, B, G], 25, seed=400 + i) for i in range(5)], "e")),
]


@pytest.mark.parametrize("scenario", BUDGET_SCENARIOS, ids=[s.name for s in BUDGET_SCENARIOS])
async def test_budget_admits_two_never_three(budget_daemon, scenario):
    report = await run_scenario(budget_daemon, scenario, max_awake=2)
    check(report)
    assert report.peak_awake == 2, "the budget was used: two models were awake together"
