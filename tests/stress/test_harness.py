"""The pass rule and the watcher can fail: each kind of bad answer and each
invariant breach is caught (no daemon needed, so these run in milliseconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import Daemon, Outcome, Req, SimModel, Watcher, write_config

ALLOWED = frozenset({200})


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
