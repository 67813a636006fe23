"""The stress scenarios under the real test systemd (issue 10): llmuxd in
system mode as `llmuxd.service`, its backends as transient units, HTTP on
llmux.socket's port (tests/test_service.py's test bed, tests/sysd).

A representative subset of the embedded suite's scenario specs runs
unchanged through the same runner and pass rule (`harness.run_scenario`,
`harness.check`): single-model load, switch under load, streaming during a
switch, rapid alternation, switch storm, abandoned streams, and a
three-model variant. One daemon serves the module with three models; the
two-model scenarios never ask for the third.

One scenario exists only here, "daemon restarted mid-load": `systemctl
restart llmuxd.service` while clients keep sending. Its rule:

- a request *at the restart* (sent before the new daemon was ready, still
  unanswered when the restart began) may end in 200, in 503 (OpenAI
  envelope), or in a broken connection (the old daemon went away under it);
- every other request must pass the ordinary rule (200, not cut);
- no request may hang (lost by timeout), and every response that arrives
  must come from the model asked for (no misrouting, ever);
- the backends keep running through it (same MainPID of every model unit),
  the daemon does not (a new MainPID), no invariant is violated meanwhile,
  and leases settle after it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from harness import (
    LOST_GRACE, REQUEST_TIMEOUT, Outcome, Req, Scenario, SimModel, SystemdDaemon, Watcher, Wave,
    alternating, check, run_scenario, send,
)
from test_scenarios import SCENARIOS as TWO_MODEL_SCENARIOS
from test_three_models import SCENARIOS as THREE_MODEL_SCENARIOS

pytestmark = [pytest.mark.systemd]

A, B, G = "alpha", "beta", "gamma"
MODELS = [SimModel(A, eviction="offload+keep_running"), SimModel(B, eviction="discard+keep_running"),
          SimModel(G, eviction="offload+freeze")]

_PICK = {"02_single_model_load", "03_switch_under_load", "06_streaming_during_switch",
         "04_rapid_alternation", "08_rapid_switch_storm", "13_abandoned_streams",
         "04_rapid_alternation_3"}
SCENARIOS = [s for s in [*TWO_MODEL_SCENARIOS, *THREE_MODEL_SCENARIOS] if s.name in _PICK]
#: clients that keep sending through the restart; requests each sends after it
RESTART_CLIENTS = 6
AFTER_RESTART = 3


@pytest.fixture(scope="module")
def systemd_daemon(stress_tmp: Path):
    from sysd.testbed import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from test_service import boot_from_tree

    svc = boot_from_tree()
    try:
        daemon = SystemdDaemon(svc, stress_tmp, MODELS).start()
        yield daemon
        backends = {m: pid for m, pid in daemon.backend_pids().items() if pid}
        rc = daemon.stop()
        assert rc == 0, f"llmuxd.service exited {rc}:\n{daemon.log()[-3000:]}"
        # system mode: stopping llmuxd leaves the backends for the next start
        assert {m: svc.unit_pid(m) for m in backends} == backends
        daemon.stop_backends()
    finally:
        svc.shut_down()


def test_scenarios_cover_the_subset():
    assert {s.name for s in SCENARIOS} == _PICK  # a renamed spec must not silently drop out


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_under_systemd(systemd_daemon, scenario):
    check(await run_scenario(systemd_daemon, scenario))


def restart_problems(o: Outcome, begin: float, end: float) -> list[str]:
    """The restart rule (module docstring) for one request; empty: fine.
    `begin`/`end`: when `systemctl restart` was called and returned."""
    at_restart = o.started <= end and o.started + o.elapsed >= begin
    if not at_restart:
        return o.problems(frozenset({200}))
    broken = o.stream_error is not None  # a connection error, not a timeout (that leaves it None)
    if broken and (o.lost or (o.status == 200 and not o.done)):
        stray = o.stamps - {o.req.model, None}
        return [f"misrouted: {o.req.model} answered by {sorted(stray)}"] if stray else []
    return o.problems(frozenset({200, 503}))


def _answer(status, *, stamps=(A,), start=0.0, took=1.0, stream=False, done=True, error=None, lost=False):
    return Outcome(Req(A, stream=stream), status=status, stamps=set(stamps), finish_reason="length", done=done,
                   stream_error=error, lost=lost, started=start, elapsed=took,
                   error_body={"error": {"message": "m", "type": "t"}})


RESTART_RULE = [  # (what, outcome, restart window begin..end = 10..20, problem kind or None)
    ("200 before the restart", _answer(200, start=1), None),
    ("503 at the restart", _answer(503, stamps=(), start=9, took=5), None),
    ("connection broken at the restart", _answer(None, stamps=(), start=15, lost=True,
                                                 error="ServerDisconnectedError"), None),
    ("stream broken at the restart", _answer(200, start=9, took=3, stream=True, done=False,
                                             error="ClientPayloadError"), None),
    ("503 after the restart", _answer(503, stamps=(), start=21), "unexpected"),
    ("connection broken after the restart", _answer(None, stamps=(), start=21, lost=True,
                                                    error="ServerDisconnectedError"), "lost"),
    ("hang at the restart", _answer(None, stamps=(), start=15, took=200, lost=True), "lost"),
    ("misrouted at the restart", _answer(200, stamps=(B,), start=15), "misrouted"),
    ("broken stream from another model", _answer(200, stamps=(B,), start=15, stream=True, done=False,
                                                 error="ClientPayloadError"), "misrouted"),
    ("500 at the restart", _answer(500, stamps=(), start=15), "unexpected"),
]


@pytest.mark.parametrize("outcome,kind", [r[1:] for r in RESTART_RULE], ids=[r[0] for r in RESTART_RULE])
def test_restart_rule(outcome, kind):
    problems = restart_problems(outcome, 10.0, 20.0)
    assert [p.split(":")[0] for p in problems][:1] == ([kind] if kind else []), problems


async def test_daemon_restarted_mid_load(systemd_daemon):
    d = systemd_daemon
    check(await run_scenario(d, Scenario("restart_prime", [Wave([Req(A)], name="a"), Wave([Req(B)], after="a")])))
    backends = {m: pid for m, pid in d.backend_pids().items() if pid}
    assert set(backends) >= {A, B}, backends
    old_pid = d.pid

    outcomes: list[Outcome] = []
    window: dict[str, float] = {}
    stop = asyncio.Event()
    deadline = REQUEST_TIMEOUT + LOST_GRACE
    # a new connection per request: a pooled one to the old daemon would fail after the restart
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        watcher = Watcher(d, session)
        watcher.start()

        async def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                req = Req((A, B)[(i + n) % 2], stream=(i + n) % 3 == 0, max_tokens=8)
                outcomes.append(await send(session, d.base, req, deadline))
                n += 1

        async def wait_count(n: int) -> None:
            while len(outcomes) < n:
                await asyncio.sleep(0.05)

        async def restart() -> None:
            try:
                await asyncio.wait_for(wait_count(2 * RESTART_CLIENTS), deadline)
                window["begin"] = time.monotonic()
                await asyncio.to_thread(d.restart)
                window["end"] = time.monotonic()
                after = len(outcomes)
                await asyncio.wait_for(wait_count(after + AFTER_RESTART * RESTART_CLIENTS), deadline)
            finally:
                stop.set()

        try:
            await asyncio.gather(restart(), *(client(i) for i in range(RESTART_CLIENTS)))
        finally:
            await watcher.stop()

    begin, end = window["begin"], window["end"]
    before = sum(1 for o in outcomes if o.started + o.elapsed < begin)
    after = sum(1 for o in outcomes if o.started > end)
    at_restart = [o for o in outcomes if o.started <= end and o.started + o.elapsed >= begin]
    problems = [p for o in outcomes for p in restart_problems(o, begin, end)]
    refused = sum(1 for o in at_restart if not (o.status == 200 and (o.done or not o.req.stream)))
    head = (f"daemon_restarted_mid_load: {len(outcomes)} requests ({before} before, {len(at_restart)} at the "
            f"restart of which {refused} refused, {after} after)")
    print(head)
    report_failed = bool(problems or watcher.violations)
    record_summary(len(outcomes), problems, watcher.violations, report_failed)
    assert not problems and not watcher.violations, "\n".join(
        [head, *problems[:30], *(f"violation: {v}" for v in watcher.violations)])
    assert before > 0 and after > 0, head  # the load really ran across the restart

    assert d.pid != old_pid, "llmuxd.service was not restarted"
    assert {m: d.svc.unit_pid(m) for m in backends} == backends, "a backend was restarted with llmuxd"
    d.wait_for("leases back to zero after the restart",
               lambda ms: all(not s.get("in_flight") and not s.get("queue_depth") for s in ms.values()))
    # and the new daemon serves both models, each by its own backend, under the ordinary rule
    check(await run_scenario(d, Scenario("after_restart", [Wave(alternating([A, B], 10))])))
    assert {m: d.svc.unit_pid(m) for m in backends} == backends


def record_summary(sent: int, problems: list[str], violations: list[str], failed: bool) -> None:
    """Add the restart scenario to the suite's summary (its rule is not `check`'s)."""
    from harness import TOTALS

    TOTALS["scenarios"] += 1
    TOTALS["sent"] += sent
    for kind in ("lost", "misrouted", "cut", "unexpected"):
        TOTALS[kind] += sum(1 for p in problems if p.startswith(kind))
    TOTALS["violations"] += len(violations)
    if failed:
        TOTALS["failed"].append("daemon_restarted_mid_load")
