"""Overlapped switches (issue #26) under the stress harness: the old model's
weights leave while the new one's come in, and the group's budget holds at
every sample of the GPU ledger, resident and in transit, through the failures
the issue names: B's weight wake failing midway, A's sleep failing, A's
process dying during the overlap, and a request for A arriving while its
weights leave. The watcher runs in budget mode (harness.Watcher): two models
may hold memory at once, but never more than the budget together.

Sizes: each model needs 20 GiB awake, 8 of them weights; the budget is 24 GiB,
so the two never fit awake together but their weights fit in transit
together (8 + 8). A switch that let B's weights in before A's KV cache left
would hold 19.5 + 8 GiB and be caught. The link is 20 GB/s each way, so a
transfer takes about 0.4 s: several ledger samples fall inside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import pytest

from harness import (
    Daemon, Req, Scenario, SimModel, Wave, _wait_state, burst, check, http, metric_sum, run_scenario,
    start_daemon, stop_and_check,
)
from test_faults import chat, served_by

A, B = "alpha", "beta"
GROUP = {"big": {"budget_gib": 24}}
LINK = {"LLMUX_SIM_GPU_WEIGHTS_MB": "8000", "LLMUX_SIM_H2D_GBPS": "20", "LLMUX_SIM_D2H_GBPS": "20"}
SIZES = {"gpu_group": "big", "gpu_memory_gib": 20, "weights_gib": 8}
POLICY = {"sleep_timeout": 5, "wake_timeout": 10, "failure_backoff": 0.2, "overlap": "auto"}
#: what one model's weights take on the ledger (LLMUX_SIM_GPU_WEIGHTS_MB)
WEIGHTS_MB = 8000


def overlap_models() -> list[SimModel]:
    return [
        SimModel(A, eviction="offload+keep_running", gpu_mb=20000, env=dict(LINK), extra=dict(SIZES)),
        SimModel(B, eviction="discard+keep_running", gpu_mb=20000, env=dict(LINK), extra=dict(SIZES)),
    ]


@pytest.fixture(scope="module")
def daemon(stress_tmp):
    d = start_daemon(stress_tmp, overlap_models(), policy=POLICY, groups=GROUP)
    yield d
    stop_and_check(d)


def a_active_b_asleep(daemon: Daemon) -> None:
    """Both started once, B asleep with vLLM sleep, A serving: the start of every case."""
    served_by(daemon, B)
    served_by(daemon, A)


def fault(daemon: Daemon, model: str, kind: str) -> None:
    status, _, body = http(daemon.backend_url(model) + "/sim/fault", json.dumps({"kind": kind}).encode(),
                           headers={"Content-Type": "application/json"})
    assert status == 200, body


def overlapped_count(daemon: Daemon) -> float:
    return metric_sum(daemon.metrics(), 'llmux_switch_overlap_total{from="alpha",overlap="overlapped",to="beta"}')


def budget_run(daemon: Daemon, scenario: Scenario) -> "object":
    return asyncio.run(run_scenario(daemon, scenario, budget=True))


def test_overlapped_switches_lose_nothing_and_keep_the_budget(daemon):
    a_active_b_asleep(daemon)
    before = overlapped_count(daemon)
    waves = []
    for i in range(8):
        model = (B, A)[i % 2]
        waves.append(Wave(burst(model, 5, max_tokens=4) + [Req(model, stream=True, max_tokens=4)],
                          name=f"w{i}", after=f"w{i - 1}" if i else None))
    report = budget_run(daemon, Scenario("overlapped_alternation", waves))
    check(report)
    # the verdict measured something: the weights of both were on the GPU at one sample
    assert report.peak_awake == 2 and report.peak_group_mb > WEIGHTS_MB, (report.peak_awake, report.peak_group_mb)
    assert overlapped_count(daemon) > before
    assert re.search(r"switch alpha -> beta ok in .*weights_out .*weights_in .*; overlapped", daemon.log())


def test_b_weight_wake_failing_midway_stops_b_and_keeps_the_budget(daemon):
    a_active_b_asleep(daemon)
    fault(daemon, B, "fail_wake_midway")
    first = Wave(burst(B, 3), name="fail")
    again = Wave(burst(B, 2), after="fail", at=0.5)  # after the backoff: a cold start of B
    report = budget_run(daemon, Scenario("b_wake_fails_midway", [first, again], allowed=frozenset({200, 502})))
    check(report, frozenset({200, 502}))
    statuses = [o.status for o in report.outcomes]
    assert 502 in statuses[:3] and statuses[3:] == [200, 200], statuses
    assert "fail_wake_midway" in daemon.log()
    served_by(daemon, A)


def test_a_sleep_failing_stops_a_and_b_still_comes(daemon):
    a_active_b_asleep(daemon)
    fault(daemon, A, "fail_sleep")
    report = budget_run(daemon, Scenario("a_sleep_fails", [Wave(burst(B, 3))]))
    check(report)
    assert re.search(r"model alpha: sleep \(offload\+keep_running\) failed: .*fail_sleep.*escalating to stop", daemon.log())
    served_by(daemon, A)  # a cold start after the stop


def test_a_dying_during_the_overlap(daemon):
    a_active_b_asleep(daemon)
    pid = json.loads(http(daemon.backend_url(A) + "/sim/state")[2])["pid"]

    async def scenario() -> "object":
        async def kill_a_when_b_wakes() -> None:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                await _wait_state(session, daemon, B, "waking")
            os.kill(pid, signal.SIGKILL)

        killer = asyncio.ensure_future(kill_a_when_b_wakes())
        report = await run_scenario(daemon, Scenario("a_dies_during_overlap", [Wave(burst(B, 3))]), budget=True)
        await killer
        return report

    report = asyncio.run(scenario())
    check(report)
    served_by(daemon, A)  # started again
    served_by(daemon, B)


def test_a_request_for_a_while_its_weights_leave(daemon):
    a_active_b_asleep(daemon)
    waves = [Wave(burst(B, 3), name="to_b"), Wave(burst(A, 3), when=(B, "waking"))]
    report = budget_run(daemon, Scenario("a_wanted_while_leaving", waves))
    check(report)
    assert {o.req.model for o in report.outcomes} == {A, B}


def test_a_refused_release_is_learned_once_and_switches_go_sequential(tmp_path):
    """vLLM on the CPU refuses /release_kv_cache_memory (LLMUX_SIM_PLATFORM=cpu
    reproduces it): the first switch that tries says why in one journal line,
    and from then on that model's switches are sequential, nothing lost."""
    models = overlap_models()
    for m in models:
        m.env["LLMUX_SIM_PLATFORM"] = "cpu"
        m.extra["sleep_mode"] = False  # vLLM's CPU build rejects --enable-sleep-mode
    d = start_daemon(tmp_path, models, policy=POLICY, groups=GROUP)
    try:
        a_active_b_asleep(d)
        waves = [Wave(burst((B, A)[i % 2], 3), name=f"w{i}", after=f"w{i - 1}" if i else None) for i in range(6)]
        check(budget_run(d, Scenario("cpu_refusal_fallback", waves)))
        log = d.log()
        said = re.findall(r"model '(\w+)' refused a partial sleep step \(.*Selective discard is not "
                          r"supported on CPU.*\); it switches sequentially from now on", log)
        assert said == [A], said  # one line; alpha takes part in every switch after it
        assert "; overlapped" not in log
        assert re.search(r"switch alpha -> beta ok in .*; sequential: engine: alpha refused a step before", log)
        status = json.loads(http(d.base + "/v1/models")[2])
        assert {m["id"] for m in status["data"]} == {A, B}
    finally:
        stop_and_check(d)


@pytest.mark.parametrize("probe", ["ledger", "none"])
def test_weights_measured_at_the_first_wake_let_later_switches_overlap(tmp_path, probe):
    """No `weights_gib` anywhere: the first switches are sequential and say the size
    is unknown; each model's first wake from sleep comes in parts and the GPU probe
    measures its weights (one journal line), after which its switches overlap under
    the same budget. Negative control: with no probe nothing is measured and no
    switch overlaps."""
    models = overlap_models()
    for m in models:
        del m.extra["weights_gib"]
    d = start_daemon(tmp_path, models, policy=POLICY, groups=GROUP, gpu_probe=probe)
    try:
        a_active_b_asleep(d)
        waves = [Wave(burst((B, A)[i % 2], 3), name=f"w{i}", after=f"w{i - 1}" if i else None) for i in range(6)]
        check(budget_run(d, Scenario(f"learn_weights_{probe}", waves)))
        log = d.log()
        measured = re.findall(r"model (\w+): weights measured at its first wake: ([\d.]+) GiB", log)
        assert re.search(r"sequential: budget: the weights size of .* is unknown", log), log[-3000:]
        if probe == "none":
            assert measured == [] and "; overlapped" not in log
            return
        assert sorted(measured) == [(A, f"{WEIGHTS_MB / 1024:.2f}"), (B, f"{WEIGHTS_MB / 1024:.2f}")], measured
        assert re.search(r"switch (alpha -> beta|beta -> alpha) ok in .*; overlapped", log), log[-3000:]
    finally:
        stop_and_check(d)
