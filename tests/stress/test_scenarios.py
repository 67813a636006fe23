"""Ports of llmux 0.7's stress scripts (fuzz/*.sh; reference/llmux-0.7.md §B.4)
against one `llmuxd run` with two simulated models, as llmux ran them:
`alpha` sleeps at level 1 (offload, like gpt-oss-20b) and `beta` at level 2
(discard, like gemma-12b, so every wake of beta reloads its weights).

Each scenario is a row of the table below and goes through the shared runner
(`harness.run_scenario`); the pass rule is `harness.check`: every request
answered 200 by the model it asked for, nothing cut or lost, no invariant
violated while it ran, leases back to zero after it. Counts follow the
scripts; token counts, delays and sleep/wake times are scaled down so the
module runs in about a minute on a shared 2-core machine.
"""

from __future__ import annotations

import random
import re

import pytest

from harness import (
    Req, Scenario, SimModel, Wave, alternating, burst, check, metric_sum, mixed, run_scenario,
    start_daemon, stop_and_check,
)

A, B = "alpha", "beta"
MODELS = [SimModel(A, eviction="offload+keep_running"), SimModel(B, eviction="discard+keep_running")]
HAIKU = "Write a haiku. " * 500  # 1,500 words of context (the simulator's window is 2,048)


def prime(model: str = A) -> Wave:
    """Make `model` the active one before the scenario proper."""
    return Wave([Req(model)], name="prime")


def chain(groups: list[list[Req]], prefix: str, *, gap: float = 0.0) -> list[Wave]:
    """Waves that run one after the other."""
    waves = []
    for i, reqs in enumerate(groups):
        waves.append(Wave(reqs, name=f"{prefix}{i}", after=f"{prefix}{i - 1}" if i else None,
                          at=gap if i else 0.0))
    return waves


def _double_race() -> list[Wave]:
    waves = []
    for i in range(5):
        after = f"r{i - 1}b" if i else None
        waves.append(Wave(burst(A, 10, max_tokens=10), after=after, name=f"r{i}a"))
        waves.append(Wave(burst(B, 10, max_tokens=10), after=after, at=0.2, name=f"r{i}b"))
    return waves


def _endurance() -> list[list[Req]]:
    rng = random.Random(19)
    return [mixed([A, B], rng.randint(10, 30), seed=100 + i, max_tokens=(1, 20)) for i in range(10)]


def _final_validation() -> list[Wave]:
    phases = [
        [Req(A), Req(B)],  # warm-up
        burst(A, 50), burst(B, 50),  # 100 each (halved)
        burst(A, 25) + burst(B, 25),  # 50 each concurrent (halved)
        burst(A, 15, stream=True, max_tokens=20) + burst(B, 15, stream=True, max_tokens=20),
        alternating([A, B], 40),
        *[burst(m, 20) for _ in range(3) for m in (A, B)],  # 3 x 40 L2 cycles (halved)
        mixed([A, B], 100, seed=21),  # 200 mixed (halved)
    ]
    return chain(phases, "f")


SCENARIOS = [
    Scenario("01_warmup", [Wave([Req(A)], name="a"), Wave([Req(B)], after="a")],
             note="cold start of alpha, then a switch and cold start of beta"),
    Scenario("02_single_model_load", [prime(), Wave(burst(A, 20), after="prime")]),
    Scenario("03_switch_under_load", [prime(), Wave(burst(A, 5, max_tokens=40), after="prime"),
                                      Wave(burst(B, 5), after="prime", at=0.2)],
             note="the drain lets alpha's long requests finish"),
    Scenario("04_rapid_alternation", [Wave(alternating([A, B], 10, client="openai"))]),
    Scenario("05_burst_during_switch", [prime(), Wave([Req(B)], after="prime"),
                                        Wave(alternating([A, B], 10), after="prime", at=0.1)]),
    Scenario("06_streaming_during_switch",
             [prime(), Wave([Req(A, stream=True, max_tokens=100, client="openai")], after="prime"),
              Wave([Req(B, client="openai")], after="prime", at=0.3)],
             note="the stream is not cut by the switch it outlives"),
    Scenario("07_high_intensity", [Wave(burst(A, 100) + burst(B, 100))]),
    Scenario("08_rapid_switch_storm",
             [Wave(burst(A, 10) + burst(B, 10), at=0.3 * i) for i in range(10)]),
    Scenario("11_extreme_load",
             [Wave(burst(A, 30, stream=True, max_tokens=30)),
              Wave(burst(B, 20, stream=True, max_tokens=30), at=0.2),
              Wave(burst(A, 20, stream=True, max_tokens=30), at=0.4),
              Wave(burst(B, 10, stream=True, max_tokens=30), at=0.6)]),
    Scenario("12_back_to_back_switches", chain([[Req(A), Req(B)] for _ in range(20)], "r")),
    Scenario("13_abandoned_streams",
             [prime(), Wave(burst(A, 10, stream=True, max_tokens=2000, abandon_after=0.5),
                            after="prime", name="gone"),
              Wave([Req(B)], after="gone", name="switch"),
              Wave(burst(A, 10) + burst(B, 10), after="switch")],
             note="abandoned streams release their leases, so the drain does not hang"),
    Scenario("14_mega_storm",
             [Wave(burst(A, 100)), Wave(burst(B, 100), at=0.1),
              Wave(alternating([A, B], 20, stream=True, max_tokens=20), at=0.2),
              Wave(alternating([A, B], 150), at=0.3),
              Wave(alternating([B, A], 50, stream=True, max_tokens=10), at=0.4),
              Wave(alternating([A, B], 100, max_tokens=1), at=0.5)]),
    Scenario("15_double_switch_race", _double_race()),
    Scenario("16_flood_during_sleep",
             [prime(), Wave(burst(A, 3, stream=True, max_tokens=40), after="prime"),
              Wave([Req(B)], after="prime", at=0.1),
              Wave(burst(A, 20), after="prime", when=(A, "evicting|waking"))],
             note="the flood for alpha arrives after its drain: it waits, then is served"),
    Scenario("17_vllm_overload",
             [Wave(burst(A, 200, max_tokens=20), name="over"),
              Wave(burst(A, 100) + burst(B, 100), after="over")]),
    Scenario("18_context_pressure",
             [Wave(burst(A, 50, prompt=HAIKU)), Wave(burst(B, 30, prompt=HAIKU), at=0.1),
              Wave(burst(A, 20, prompt=HAIKU), at=0.3)]),
    Scenario("19_endurance", chain(_endurance(), "e")),
    Scenario("20_l2_wake_stress",
             chain([burst(m, 5) for _ in range(5) for m in (A, B)], "c"),
             note="beta (level 2) must come back with reloaded weights, never garbage"),
    Scenario("20c_l2_multi_cycle", chain([[Req(m, client="openai")] for _ in range(5) for m in (A, B)], "s")),
    Scenario("15b_completions_and_embeddings",
             [Wave(alternating([A, B], 20, kind="completion") + alternating([B, A], 10, kind="embedding")
                   + alternating([A, B], 10, kind="completion", stream=True))]),
    Scenario("21_final_validation", _final_validation()),
]


@pytest.fixture(scope="module")
def daemon(stress_tmp):
    d = start_daemon(stress_tmp, MODELS)
    yield d
    stop_and_check(d)


def test_00_restart_frees_the_gpu_and_serves_again(daemon):
    """00_restart: after a restart the GPU is free (nothing leaked by the old
    process) and /v1/models answers again."""
    stop_and_check(daemon)
    assert daemon.ledger()["used_mb"] == 0
    daemon.start()
    assert set(daemon.models()) == {A, B}
    assert all(m["state"] == "asleep" for m in daemon.models().values())


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario(daemon, scenario):
    check(await run_scenario(daemon, scenario))


def test_09_metrics_report(daemon, capsys):
    """09_metrics_report: the numbers llmux 0.7's report printed, read from
    /metrics after everything above; on a clean run no switch failed and
    every request llmux counted was a 200."""
    text = daemon.metrics()
    switches = {result: sum(float(v) for v in re.findall(
        r'llmux_switch_total\{[^}]*result="%s"[^}]*\} (\S+)' % result, text)) for result in ("ok", "failed")}
    by_status: dict[str, float] = {}
    for status, value in re.findall(r'llmux_requests_total\{[^}]*status="(\d+)"[^}]*\} (\S+)', text):
        by_status[status] = by_status.get(status, 0.0) + float(value)
    wait_count = metric_sum(text, "llmux_request_queue_wait_seconds_count")
    with capsys.disabled():
        print(f"\n09_metrics_report: switches {switches['ok']:.0f} (failed {switches['failed']:.0f}), requests by status "
              f"{ {k: int(v) for k, v in sorted(by_status.items())} }, queue waits observed {wait_count:.0f}")
    assert switches["failed"] == 0, text
    # 499: a client that hung up (13_abandoned_streams), as aiohttp 3.8 reports it
    assert set(by_status) <= {"200", "499"} and by_status.get("499", 0) <= 10, by_status
    assert switches["ok"] > 20, "the scenarios switched models many times"
