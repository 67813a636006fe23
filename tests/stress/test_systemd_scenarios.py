"""The stress scenarios under the real test systemd (issue 10): llmuxd in
system mode as `llmuxd.service`, its backends as transient units, HTTP on
llmux.socket's port (tests/test_service.py's test bed, tests/sysd).

A representative subset of the embedded suite's scenario specs runs
unchanged through the same runner and pass rule (`harness.run_scenario`,
`harness.check`): single-model load, switch under load, streaming during a
switch, rapid alternation, switch storm, abandoned streams, and a
three-model variant. One daemon serves the module with three models; the
two-model scenarios never ask for the third.

Two scenarios exist only here: `systemctl restart llmuxd.service` and
`systemctl reload llmuxd.service` while clients keep sending (a new
connection per request, both models, a third of them streamed). The promise
(DESIGN §1, issue 14): llmux.socket keeps the listening socket, so

- no connection is refused and no request is lost or dropped unanswered:
  new connections wait in the socket's backlog for the new daemon, and the
  old one finishes what it accepted, including connections whose request is
  still on its way when it begins to stop ("late senders");
- every non-streamed request is answered 200 by the model it asked for;
- every stream whose length fits within the old daemon's drain time
  (SHUTDOWN_DRAIN, 60 s) is complete, those in flight when the restart
  begins included (the old daemon drains before it exits); only a longer one
  may end early, and then right after a whole SSE event (the README's promise);
- requests and streams really are in flight when `systemctl restart` (or
  `reload`) begins: counted from what the clients saw, printed, and > 0;
- the backends keep running through it (same MainPID of every model unit),
  the daemon does not (a new MainPID; a reload keeps it), no invariant is
  violated meanwhile (the watcher is judged: it kept sampling through it),
  and leases settle after it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import aiohttp
import pytest

from harness import (
    LOST_GRACE, REQUEST_TIMEOUT, Outcome, Report, Req, Scenario, SimModel, SystemdDaemon, Watcher, Wave,
    alternating, assert_watched, check, run_scenario, send,
)
from llmuxd.daemon.system import SHUTDOWN_DRAIN
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
#: clients that keep sending through a restart or reload; requests each sends after it
LOAD_CLIENTS = 12
AFTER_ACTION = 3
#: streams in flight when the restart begins (1.5 s at the simulators' 100 tokens/s)
LONG_STREAMS = 4
LONG_TOKENS = 150
#: connections opened before the restart that send their request once llmuxd is stopping
LATE_SENDERS = 4
#: the simulators' token rate: a stream of max_tokens lasts max_tokens / STREAM_RATE seconds
STREAM_RATE = SimModel(A).tokens_per_s


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


def classify(o: Outcome) -> str:
    """What a user saw, in one word ("ok" when the restart rule is met)."""
    r = o.req
    if o.lost and o.status is None:
        if o.stream_error and "ClientConnectorError" in o.stream_error:
            return "refused"  # no connection at all: the socket was not there
        return "dropped" if o.stream_error else "lost"  # accepted, then no answer / no answer in time
    if o.stamps - {r.model, None}:
        return "misrouted"
    if o.status != 200:
        return "non-200"
    problems = o.problems(frozenset({200}))
    if not problems:
        return "ok"
    if r.stream and o.ended_at_event_boundary and all(p.startswith("cut") for p in problems):
        if not fits_in_drain(r):
            return "ok"  # longer than the drain: it may end after a whole event, saying so
        return "cut short"  # it would have finished within the drain: it had to
    return "cut mid-event" if r.stream else "broken"


def fits_in_drain(r: Req) -> bool:
    """Whether the whole stream (so whatever remained of it when the restart
    began) fits within the old daemon's drain time."""
    return r.max_tokens / STREAM_RATE <= SHUTDOWN_DRAIN


def restart_problems(o: Outcome) -> list[str]:
    """The rule for every request sent while llmuxd restarts or reloads (module
    docstring); empty: fine."""
    kind = classify(o)
    if kind == "ok":
        return []
    r = o.req
    what = f"{r.kind}{' stream' if r.stream else ''} for {r.model} sent at {o.started:.2f}"
    detail = "; ".join(o.problems(frozenset({200}))) or o.stream_error or ""
    return [f"{kind}: {what}: {detail}"[:400]]


#: a stream longer than the drain time (it may end early, after a whole event)
OVERLONG = int(SHUTDOWN_DRAIN * STREAM_RATE) + 1


def _answer(status, *, stamps=(A,), stream=False, done=True, error=None, lost=False, finish="length",
            tail=b"\n", unread=0, max_tokens=4):
    o = Outcome(Req(A, stream=stream, max_tokens=max_tokens), status=status, stamps=set(stamps), finish_reason=finish, done=done,
                stream_error=error, lost=lost, error_body={"error": {"message": "m", "type": "t"}},
                last_line=tail, lines_read=10)
    o.body_reader = type("Reader", (), {"total_bytes": 10 + unread})()
    return o


RESTART_RULE = [  # (what, outcome, kind)
    ("200", _answer(200), "ok"),
    ("stream complete", _answer(200, stream=True), "ok"),
    # a stream that fits within the drain must finish whole, however cleanly it ended
    ("short stream closed after a whole event", _answer(200, stream=True, done=False, finish=None,
                                                        error="ClientPayloadError"), "cut short"),
    ("short stream closed after an error event", _answer(200, stream=True, done=False, finish=None,
                                                         error="{'message': 'llmuxd is restarting'}"), "cut short"),
    ("long stream closed after a whole event", _answer(200, stream=True, done=False, finish=None, max_tokens=OVERLONG,
                                                       error="ClientPayloadError"), "ok"),
    ("long stream closed after an error event", _answer(200, stream=True, done=False, finish=None, max_tokens=OVERLONG,
                                                        error="{'message': 'llmuxd is restarting'}"), "ok"),
    ("long stream cut inside an event line", _answer(200, stream=True, done=False, finish=None, max_tokens=OVERLONG,
                                                     tail=b'data: {"id"', error="ClientPayloadError"), "cut mid-event"),
    ("stream cut inside an event line", _answer(200, stream=True, done=False, finish=None, tail=b'data: {"id"',
                                                error="ClientPayloadError"), "cut mid-event"),
    ("stream cut with bytes unread", _answer(200, stream=True, done=False, finish=None, unread=7,
                                             error="ClientPayloadError"), "cut mid-event"),
    ("503", _answer(503, stamps=()), "non-200"),
    ("connection refused", _answer(None, stamps=(), lost=True, error="ClientConnectorError: refused"), "refused"),
    ("connection dropped unanswered", _answer(None, stamps=(), lost=True,
                                              error="ServerDisconnectedError: gone"), "dropped"),
    ("no answer in time", _answer(None, stamps=(), lost=True), "lost"),
    ("answered by another model", _answer(200, stamps=(B,)), "misrouted"),
    ("stream from another model", _answer(200, stamps=(B,), stream=True, done=False, finish=None), "misrouted"),
    ("non-stream answer cut", _answer(200, finish="abort"), "broken"),
]


@pytest.mark.parametrize("outcome,kind", [r[1:] for r in RESTART_RULE], ids=[r[0] for r in RESTART_RULE])
def test_restart_rule(outcome, kind):
    assert classify(outcome) == kind
    assert bool(restart_problems(outcome)) == (kind != "ok")


def _timed(start: float, elapsed: float, *, stream: bool = False, first_event: float | None = None) -> Outcome:
    o = _answer(200, stream=stream)
    o.started, o.elapsed, o.first_event_at = start, elapsed, first_event
    return o


IN_FLIGHT = [  # (what, outcomes, (requests, streams) in flight at t=10)
    ("all answered before", [_timed(1, 2), _timed(5, 4.9, stream=True, first_event=6)], (0, 0)),
    ("all sent after", [_timed(10.5, 1), _timed(11, 2, stream=True, first_event=11.1)], (0, 0)),
    ("a request across it", [_timed(9, 2)], (1, 0)),
    ("a stream under way across it", [_timed(9, 2, stream=True, first_event=9.5)], (1, 1)),
    ("a stream still waiting for its first event", [_timed(9, 2, stream=True, first_event=10.5)], (1, 0)),
]


@pytest.mark.parametrize("outcomes,expected", [r[1:] for r in IN_FLIGHT], ids=[r[0] for r in IN_FLIGHT])
def test_in_flight_when_it_began(outcomes, expected):
    """The judge's proof that the restart happened under load counts only what spans its start."""
    run = LoadRun(outcomes, 10.0, 12.0, [], [], Report("x", [], [], 0, 0))
    assert run.in_flight_at_begin() == expected


async def send_when(base: str, req: Req, gate: asyncio.Event, deadline: float,
                    connected: asyncio.Event) -> Outcome:
    """Connect now (then set `connected`), send `req` only once `gate` is set (a
    client whose request is still on its way when llmuxd begins to stop), read
    the whole answer. Raw HTTP/1.1: aiohttp cannot connect without sending."""
    out = Outcome(req)
    out.started = time.monotonic()
    path = "/v1/completions"
    body = json.dumps({"model": req.model, "prompt": req.prompt, "max_tokens": req.max_tokens}).encode()
    host, port = base.rsplit("/", 1)[1].split(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), deadline)
    except OSError as exc:
        out.lost, out.stream_error = True, f"ClientConnectorError: {exc}"
        return out
    finally:
        connected.set()  # (also when it failed: the judge sees that outcome)
    try:
        await gate.wait()
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (path.encode(), host.encode(), len(body), body))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), deadline)
    except asyncio.TimeoutError:
        out.lost = True
        return out
    except OSError as exc:
        out.lost, out.stream_error = True, f"ServerDisconnectedError: {exc}"
        return out
    finally:
        writer.close()
        out.elapsed = time.monotonic() - out.started
    head, _, payload = raw.partition(b"\r\n\r\n")
    if not head:
        out.lost, out.stream_error = True, "ServerDisconnectedError: closed without an answer"
        return out
    out.status = int(head.split()[1])
    try:
        data = json.loads(payload)
    except ValueError:
        out.error_body = payload[:200]
        return out
    if out.status != 200:
        out.error_body = data
        return out
    out.stamps.add(data.get("model"))
    out.finish_reason = (data.get("choices") or [{}])[0].get("finish_reason")
    return out


@dataclass
class LoadRun:
    """Requests sent through one restart or reload, and when it happened."""

    outcomes: list[Outcome]
    begin: float
    end: float
    long_streams: list[Outcome]
    late_senders: list[Outcome]
    watched: Report  # the watcher's samples and violations (its outcomes are not its to judge)

    @property
    def violations(self) -> list[str]:
        return self.watched.violations

    def in_flight_at_begin(self) -> tuple[int, int]:
        """(requests, streams) in flight when the action began, as the clients
        saw them: sent before and answered after; a stream counts once its
        first event had arrived before."""
        def spans(o: Outcome) -> bool:
            return o.started < self.begin < o.started + o.elapsed
        requests = sum(1 for o in self.outcomes if spans(o))
        streams = sum(1 for o in self.outcomes if o.req.stream and spans(o)
                      and o.first_event_at is not None and o.first_event_at < self.begin)
        return requests, streams

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for o in self.outcomes:
            kind = classify(o)
            found[kind] = found.get(kind, 0) + 1
        return found

    def summary(self, what: str) -> str:
        before = sum(1 for o in self.outcomes if o.started + o.elapsed < self.begin)
        after = sum(1 for o in self.outcomes if o.started > self.end)
        during = len(self.outcomes) - before - after
        requests, streams = self.in_flight_at_begin()
        return (f"{what}: {len(self.outcomes)} requests ({before} before, {during} during, {after} after; "
                f"{requests} in flight when it began, {streams} of them streams under way), "
                f"outcomes {self.counts()}")


async def under_load(d: SystemdDaemon, action: Callable[[], None], *, stopping: Callable[[], bool]) -> LoadRun:
    """Keep LOAD_CLIENTS clients sending (both models, a third streaming, a new
    connection per request) and run `action` (blocking: in a thread) once they
    are going. Also in flight when it begins: LONG_STREAMS long streams (each
    has had its first event), and LATE_SENDERS connections (each connected)
    that send their request only once `stopping()` says the old daemon has
    begun to stop (or the action returned)."""
    outcomes: list[Outcome] = []
    window: dict[str, float] = {}
    stop = asyncio.Event()
    gate = asyncio.Event()
    deadline = REQUEST_TIMEOUT + LOST_GRACE
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        watcher = Watcher(d, session)
        watcher.start()

        async def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                req = Req((A, B)[(i + n) % 2], stream=(i + n) % 3 == 0, max_tokens=1 + (i + n) % 8)
                outcomes.append(await send(session, d.base, req, deadline))
                n += 1

        async def wait_count(n: int) -> None:
            while len(outcomes) < n:
                await asyncio.sleep(0.05)

        async def open_gate() -> None:
            while not gate.is_set():
                if await asyncio.to_thread(stopping):
                    gate.set()
                await asyncio.sleep(0.05)

        async def act() -> list[list[Outcome]]:
            try:
                await asyncio.wait_for(wait_count(2 * LOAD_CLIENTS), deadline)
                model = next((m["id"] for m in await _models(session, d) if m["llmux"]["state"] == "active"), A)
                under_way = [asyncio.Event() for _ in range(LONG_STREAMS + LATE_SENDERS)]
                longs = [asyncio.ensure_future(send(session, d.base, Req(model, stream=True, max_tokens=LONG_TOKENS),
                                                    deadline, streaming=event))
                         for event in under_way[:LONG_STREAMS]]
                late = [asyncio.ensure_future(send_when(d.base, Req(m, kind="completion"), gate, deadline, event))
                        for m, event in zip((A, B) * (LATE_SENDERS // 2), under_way[LONG_STREAMS:])]
                # the long streams have their first event, the late senders are connected
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in under_way)), deadline)
                gating = asyncio.ensure_future(open_gate())
                window["begin"] = time.monotonic()
                try:
                    await asyncio.to_thread(action)
                finally:
                    window["end"] = time.monotonic()
                    gate.set()
                    await gating
                after = len(outcomes)
                await asyncio.wait_for(wait_count(after + AFTER_ACTION * LOAD_CLIENTS), deadline)
                return [await asyncio.gather(*longs), await asyncio.gather(*late)]
            finally:
                stop.set()

        try:
            (longs, late), *_ = await asyncio.gather(act(), *(client(i) for i in range(LOAD_CLIENTS)))
        finally:
            await watcher.stop()
    watched = Report("under_load", [], watcher.violations, watcher.samples, watcher.max_in_flight,
                     watcher.peak_awake, watcher.watched_s, watcher.interval)
    return LoadRun(outcomes + longs + late, window["begin"], window["end"], longs, late, watched)


async def _models(session: aiohttp.ClientSession, d: SystemdDaemon) -> list[dict]:
    async with session.get(d.base + "/v1/models") as resp:
        return (await resp.json())["data"]


def judge(run: LoadRun, what: str) -> None:
    """Nothing refused, dropped, lost, answered other than 200 or cut mid-event;
    the long streams in flight at the start finished; no invariant broken."""
    problems = [p for o in run.outcomes for p in restart_problems(o)]
    unfinished = [o for o in run.long_streams if not o.done]
    head = run.summary(what)
    print(head)
    requests, streams = run.in_flight_at_begin()
    record_summary(what, len(run.outcomes), problems, run.violations, bool(problems or run.violations or unfinished))
    assert not problems and not run.violations, "\n".join(
        [head, *problems[:30], *(f"violation: {v}" for v in run.violations)])
    assert not unfinished, (f"{head}\n{len(unfinished)} of {len(run.long_streams)} streams in flight when it "
                            f"began did not finish: {[classify(o) for o in unfinished]}")
    # it proves something only if it happened under load: requests and streams in flight
    assert requests > 0 and streams > 0, f"{head}\nnothing was in flight when it began"
    assert_watched(replace(run.watched, scenario=what))  # it kept sampling through it
    before = sum(1 for o in run.outcomes if o.started + o.elapsed < run.begin)
    after = sum(1 for o in run.outcomes if o.started > run.end)
    assert before > 0 and after > 0, head  # the load really ran across it


async def test_daemon_restarted_mid_load(systemd_daemon):
    """`systemctl restart llmuxd` under load: llmux.socket keeps the listening
    socket, so no connection is refused and no request is lost; the old
    daemon finishes what it accepted (requests, streams, and connections
    whose request is still on its way), the new one serves the backlog."""
    d = systemd_daemon
    check(await run_scenario(d, Scenario("restart_prime", [Wave([Req(A)], name="a"), Wave([Req(B)], after="a")])))
    backends = {m: pid for m, pid in d.backend_pids().items() if pid}
    assert set(backends) >= {A, B}, backends
    old_pid = d.pid

    run = await under_load(d, d.restart, stopping=lambda: d.svc.prop("llmuxd.service", "ActiveState") != "active")
    judge(run, "daemon_restarted_mid_load")

    assert d.pid != old_pid, "llmuxd.service was not restarted"
    assert {m: d.svc.unit_pid(m) for m in backends} == backends, "a backend was restarted with llmuxd"
    d.wait_for("leases back to zero after the restart",
               lambda ms: all(not s.get("in_flight") and not s.get("queue_depth") for s in ms.values()))
    # and the new daemon serves both models, each by its own backend, under the ordinary rule
    check(await run_scenario(d, Scenario("after_restart", [Wave(alternating([A, B], 10))])))
    assert {m: d.svc.unit_pid(m) for m in backends} == backends


def reload_daemon(d: SystemdDaemon) -> None:
    """`systemctl reload llmuxd.service` (ExecReload: the bus's Reload(), synchronous)."""
    result = d.svc.systemctl("reload", "llmuxd.service")
    assert result.returncode == 0, f"systemctl reload failed: {result.stderr}\n{d.log()[-4000:]}"


async def test_daemon_reloaded_mid_load(systemd_daemon):
    """`systemctl reload llmuxd` under load, adding a model and removing it
    again: every request is answered 200 and complete, the daemon is the same
    process, and the new model is listed in between."""
    d = systemd_daemon
    pid = d.pid
    listed: list[list[str]] = []

    def reload_twice() -> None:
        d.svc.write_model("delta")
        try:
            reload_daemon(d)
            listed.append(sorted(d.models()))
        finally:
            d.svc.remove_model("delta")
        reload_daemon(d)
        listed.append(sorted(d.models()))

    run = await under_load(d, reload_twice, stopping=lambda: bool(listed))
    judge(run, "daemon_reloaded_mid_load")
    assert run.counts() == {"ok": len(run.outcomes)}
    assert listed == [sorted([A, B, G, "delta"]), sorted([A, B, G])], listed
    assert d.pid == pid, "llmuxd.service was restarted by a reload"


def record_summary(name: str, sent: int, problems: list[str], violations: list[str], failed: bool) -> None:
    """Add a restart/reload scenario to the suite's summary (its rule is not `check`'s)."""
    from harness import TOTALS

    TOTALS["scenarios"] += 1
    TOTALS["sent"] += sent
    for kind in ("lost", "misrouted", "cut", "unexpected"):
        TOTALS[kind] += sum(1 for p in problems if p.startswith(kind))
    TOTALS["lost"] += sum(1 for p in problems if p.startswith(("refused", "dropped")))
    TOTALS["unexpected"] += sum(1 for p in problems if p.startswith(("non-200", "broken")))
    TOTALS["violations"] += len(violations)
    if failed:
        TOTALS["failed"].append(name)
