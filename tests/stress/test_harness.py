"""The pass rule and the watcher can fail: each kind of bad answer and each
invariant breach is caught, a watcher that dies or stalls fails the run, and a
request deliberately sent to the wrong backend (through a real daemon) is
counted as misrouted. All but the last need no daemon and run in moments."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from harness import (
    Daemon, Outcome, Report, Req, Scenario, SimModel, Wave, Watcher, assert_watched, run_scenario, start_daemon,
    stop_and_check, write_config,
)

ALLOWED = frozenset({200})
NOT_FOUND = {"error": {"message": "The model `alpha` does not exist.", "type": "NotFoundError"}}


def ok(model: str = "alpha", **kw) -> Outcome:
    base = dict(status=200, stamps={model}, finish_reason="length", done=kw.get("done", False))
    base.update(kw)
    return Outcome(Req(model, stream=base["done"]), **base)


@pytest.mark.parametrize("outcome,kind", [
    (ok(), None),
    (ok(done=True), None),
    (ok(stamps={"beta"}), "misrouted"),
    (ok(stamps={"alpha", "beta"}), "misrouted"),
    (ok(stamps=set()), "misrouted"),
    (ok(finish_reason="abort"), "cut"),
    (ok(garbage=True), "garbage"),
    (Outcome(Req("alpha", stream=True), status=200, stamps={"alpha"}, finish_reason="length"), "cut"),
    (ok(done=True, stream_error="backend closed the connection"), "cut"),
    (Outcome(Req("alpha"), lost=True, elapsed=105.0), "lost"),
    (Outcome(Req("alpha"), status=502, error_body={"error": {"message": "x", "type": "y"}}), "unexpected"),
    (Outcome(Req("alpha"), status=500, error_body=b"Internal Server Error"), "unexpected"),
    (Outcome(Req("alpha", stream=True, abandon_after=1), status=200, stamps={"alpha"}, abandoned=True), None),
    (Outcome(Req("alpha", stream=True, abandon_after=1), status=200, stamps={"beta"}, abandoned=True), "misrouted"),
    # the wrong backend answering with an error is a misrouting, not just a bad status
    (Outcome(Req("alpha"), status=404, stamps={"beta"}, error_body=NOT_FOUND), "misrouted"),
    (Outcome(Req("alpha"), status=400, stamps={"beta"}, error_body=NOT_FOUND), "misrouted"),
    (Outcome(Req("alpha", stream=True), status=500, stamps={"beta"}, error_body=NOT_FOUND), "misrouted"),
])
def test_pass_rule_names_what_is_wrong(outcome, kind):
    problems = outcome.problems(ALLOWED)
    if kind is None:
        assert problems == []
    else:
        assert problems and all(p.startswith(kind) for p in problems), problems


def test_non_openai_error_is_flagged_even_when_its_status_is_allowed():
    bad = Outcome(Req("alpha"), status=504, error_body={"detail": "gateway"})
    assert bad.problems(frozenset({200, 504}))[0].startswith("unexpected")
    good = Outcome(Req("alpha"), status=504, error_body={"error": {"message": "slow", "type": "timeout"}})
    assert good.problems(frozenset({200, 504})) == []


async def test_watcher_sees_two_models_holding_the_gpu(tmp_path):
    config = write_config(tmp_path, [SimModel("alpha"), SimModel("beta")])
    daemon = Daemon(config, tmp_path / "log")
    # two live processes (this one and a child) each hold a full reservation
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ledger = {"capacity_mb": 30000, "reservations": {
            str(os.getpid()): {"mb": 20000, "model": "alpha"},
            str(child.pid): {"mb": 20000, "model": "beta"}}}
        daemon.ledger_path.write_text(json.dumps(ledger))
        watcher = Watcher(daemon, session=None)  # type: ignore[arg-type]
        await watcher.check_ledger()
        assert any("over capacity" in v for v in watcher.violations), watcher.violations
        assert any("2 models hold full GPU memory" in v for v in watcher.violations), watcher.violations
        relaxed = Watcher(daemon, session=None, max_awake=2)  # type: ignore[arg-type]
        await relaxed.check_ledger()
        assert not any("hold full GPU memory" in v for v in relaxed.violations)
        assert relaxed.peak_awake == 2
    finally:
        child.kill()
        child.wait()


def test_an_allowed_status_from_the_wrong_backend_is_still_misrouted():
    allowed = frozenset({200, 404})  # e.g. a scenario that asks for unknown models on purpose
    wrong = Outcome(Req("alpha"), status=404, stamps={"beta"}, error_body=NOT_FOUND)
    assert [p.split(":")[0] for p in wrong.problems(allowed)] == ["misrouted"]
    right = Outcome(Req("alpha"), status=404, stamps={"alpha"}, error_body=NOT_FOUND)
    assert right.problems(allowed) == []  # its own backend said no: not a misrouting
    llmux = Outcome(Req("nobody"), status=404, error_body=NOT_FOUND)
    assert llmux.problems(allowed) == []  # llmux's own 404 carries no stamp


def test_a_deliberately_misrouted_request_is_counted(tmp_path):
    """A real daemon whose `alpha` backend is (by a config mistake) the
    simulator of `beta`: every request for alpha reaches a backend that
    answers 404 "does not exist" in beta's name. The harness must count each
    one as misrouted, even though the scenario allows 404."""
    misconfigured = SimModel("alpha", extra={"extra_args": ["--served-model-name", "beta"]})
    d = start_daemon(tmp_path, [misconfigured, SimModel("beta")])
    try:
        scenario = Scenario("misrouted_on_purpose", [
            Wave([Req("beta"), Req("beta", stream=True)], name="beta"),
            Wave([Req("alpha"), Req("alpha", stream=True), Req("alpha", kind="completion")], after="beta"),
        ])
        allowed = frozenset({200, 404})
        report = asyncio.run(run_scenario(d, scenario))
        assert report.statuses() == {200: 2, 404: 3}, report.statuses()
        misrouted = [p for p in report.problems(allowed) if p.startswith("misrouted")]
        assert len(misrouted) == 3 and all("for alpha answered 404 by ['beta']" in p for p in misrouted), misrouted
        assert report.count("misrouted", allowed) == 3 and report.violations == []
    finally:
        stop_and_check(d)


class BrokenLedger:
    """A daemon stand-in whose GPU ledger read fails in a way no check expects."""

    config = {"models": {"alpha": {"port": 1}}}

    def ledger(self):
        raise RuntimeError("the ledger check has a bug")


async def test_a_watcher_that_dies_fails_the_run():
    watcher = Watcher(BrokenLedger(), session=None)  # type: ignore[arg-type]
    watcher.start()
    await asyncio.sleep(0.3)
    with pytest.raises(RuntimeError, match="the ledger check has a bug"):
        await watcher.stop()


async def test_a_watcher_whose_http_check_dies_fails_the_run(tmp_path):
    daemon = Daemon(write_config(tmp_path, [SimModel("alpha")]), tmp_path / "log")
    watcher = Watcher(daemon, session=None)  # type: ignore[arg-type]  (None.get: AttributeError)
    watcher.start()
    await asyncio.sleep(0.3)
    with pytest.raises(AttributeError):
        await watcher.stop()


class SlowLedger:
    """A daemon stand-in whose ledger read takes 0.5 s: the watcher stalls."""

    config = {"models": {"alpha": {"port": 1}}}
    base = "http://127.0.0.1:1"  # refused: the HTTP checks have nothing to judge

    def ledger(self):
        time.sleep(0.5)
        return {"capacity_mb": 1, "used_mb": 0, "by_pid": {}, "models": {}}


async def test_a_stalled_watcher_fails_the_check(tmp_path):
    daemon = Daemon(write_config(tmp_path, [SimModel("alpha")]), tmp_path / "log")  # not started
    async with aiohttp.ClientSession() as session:
        healthy = Watcher(daemon, session)
        stalled = Watcher(SlowLedger(), session)  # type: ignore[arg-type]
        for watcher in (healthy, stalled):
            watcher.start()
        await asyncio.sleep(2.0)
        for watcher in (healthy, stalled):
            await watcher.stop()

    def report(w: Watcher) -> Report:
        return Report("watched", [], [], w.samples, 0, watched_s=w.watched_s, interval=w.interval)
    assert_watched(report(healthy))
    with pytest.raises(AssertionError, match="it stalled"):
        assert_watched(report(stalled))
