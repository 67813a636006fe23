"""Which deployment a router prefers (`llmuxd.fleet.ranking`) and the background view of
many hosts it reads (`llmuxd.fleet.view`).

The ranking is a pure function, so its rules are a table. The view is tested against
real llmux front ends (`fleet_support.Host`) on loopback ports: it polls them in the
background, never on the request path, and skips hosts that are stale, unreachable,
not llmux, or that a router saw refuse a connection.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Dict, List, Optional

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fleet_support import Host
from llmuxd.fleet.ranking import Option, preferred
from llmuxd.fleet.signal import HostSignal, ModelSignal
from llmuxd.fleet.view import FleetView, host_key

WAIT = 30


def model(state: str = "asleep", *, wait: float = 5.0, fits: bool = True, accepts: bool = True,
          load: int = 0, warm: bool = False) -> ModelSignal:
    return ModelSignal(state=state, switcher_state=state, accepts=accepts, in_flight=load, queue_depth=0,
                       wait_estimate_s=wait, fits_without_eviction=fits, warm=warm)


def host(**models: ModelSignal) -> HostSignal:
    return HostSignal(version="t", mode="auto", pinned=None, policy="fifo", queue_limit=10, models=dict(models))


def opt(name: str, signal: Optional[HostSignal], claimed: tuple = (), served: str = "m", pressure: int = 0) -> Option:
    return Option(key=name, host=f"http://{name}", model=served, signal=signal, claimed=frozenset(claimed),
                  pressure=pressure)


# (case, options, the keys expected)
RANKING = [
    ("awake hosts all, for the router's own balancing",
     [opt("x", host(m=model("awake", wait=0))), opt("y", host(m=model("asleep", wait=1))),
      opt("z", host(m=model("awake", wait=0, load=9)))], ["x", "z"]),
    ("starting beats asleep with a lower estimate",
     [opt("x", host(m=model("asleep", wait=1))), opt("y", host(m=model("starting", wait=3)))], ["y"]),
    ("a claim counts as starting",
     [opt("x", host(m=model("asleep", wait=1))), opt("y", host(m=model("asleep", wait=4)), claimed=("m",))], ["y"]),
    ("a host with room beats one that must evict, whatever the estimates",
     [opt("x", host(m=model(wait=1, fits=False))), opt("y", host(m=model(wait=4)))], ["y"]),
    ("another model claimed there means an eviction",
     [opt("x", host(m=model(wait=1)), claimed=("other",)), opt("y", host(m=model(wait=4)))], ["y"]),
    ("then the least pressure (the demand of the models living there), over warm and estimates",
     [opt("x", host(m=model(wait=1, fits=False, warm=True)), pressure=3), opt("y", host(m=model(wait=4, fits=False)), pressure=1)],
     ["y"]),
    ("room beats pressure",
     [opt("x", host(m=model(wait=1)), pressure=5), opt("y", host(m=model(wait=1, fits=False)), pressure=0)], ["x"]),
    ("then a host where it is warm (a wake, not a cold start), whatever the estimates",
     [opt("x", host(m=model(wait=1, fits=False))), opt("y", host(m=model(wait=4, fits=False, warm=True)))], ["y"]),
    ("room beats warm: no eviction chain",
     [opt("x", host(m=model(wait=9))), opt("y", host(m=model(wait=1, fits=False, warm=True)))], ["x"]),
    ("then the lowest wait estimate",
     [opt("x", host(m=model(wait=4))), opt("y", host(m=model(wait=2))), opt("z", host(m=model(wait=3)))], ["y"]),
    ("then the least loaded host",
     [opt("x", host(m=model(wait=2), o=model("awake", load=3))), opt("y", host(m=model(wait=2), o=model(load=1)))],
     ["y"]),
    ("failed after asleep",
     [opt("x", host(m=model("failed", wait=0))), opt("y", host(m=model(wait=9, fits=False)))], ["y"]),
    ("refusing hosts are skipped (pinned elsewhere, queue full)",
     [opt("x", host(m=model("awake", accepts=False))), opt("y", host(m=model(wait=9)))], ["y"]),
    ("hosts without a signal are skipped", [opt("x", None), opt("y", host(m=model(wait=9)))], ["y"]),
    ("hosts that do not serve the model are skipped",
     [opt("x", host(other=model("awake"))), opt("y", host(m=model(wait=9)))], ["y"]),
    ("nothing usable: empty, the router routes as usual",
     [opt("x", None), opt("y", host(m=model("awake", accepts=False)))], []),
]


@pytest.mark.parametrize("case,options,expected", RANKING, ids=[c[0] for c in RANKING])
def test_ranking(case: str, options: List[Option], expected: List[str]) -> None:
    assert [o.key for o in preferred(options)] == expected


def test_equal_hosts_spread_different_models_and_agree_on_each() -> None:
    hosts = [f"h{i}" for i in range(3)]
    picks: Dict[str, str] = {}
    for i in range(30):
        served = f"model-{i}"
        options = [opt(h, host(**{served: model()}), served=served) for h in hosts]
        first = preferred(options)[0].key
        assert preferred(list(reversed(options)))[0].key == first  # order-free: every router agrees
        picks[served] = first
    assert set(picks.values()) == set(hosts)


# -- the view, against real front ends --------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def until(what: str, predicate, timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_view_polls_in_the_background_and_prefers_the_awake_host() -> None:
    async with Host(("a", "b")) as h1, Host(("a", "b")) as h2:
        await h2.serve("a")
        view = FleetView(refresh_s=0.05)
        try:
            entries = [("one", h1.base + "/v1", "a"), ("two", h2.base + "/v1", "a")]
            assert view.choose(entries) == []  # no signal yet: default routing, nothing awaited
            await until("both hosts polled", lambda: all(view.signal(b) for _, b, _ in entries))
            assert view.choose(entries) == ["two"]
            await h1.serve("b")
            await until("b seen awake on one", lambda: view.signal(h1.base).models["b"].state == "awake")
            assert view.choose([("one", h1.base, "b"), ("two", h2.base, "b")]) == ["one"]
        finally:
            await view.close()


async def test_view_claims_a_host_for_a_model_it_sent_there_to_start() -> None:
    async with Host(("a", "b")) as h1, Host(("a", "b")) as h2:
        view = FleetView(refresh_s=30)  # no refresh during the test: only the claim can change the answer
        try:
            for h in (h1, h2):
                await view.refresh(h.base)
            first = view.choose([(1, h1.base, "a"), (2, h2.base, "a")])
            assert len(first) == 1
            assert view.choose([(1, h1.base, "a"), (2, h2.base, "a")]) == first  # a follows its claim
            other = view.choose([(1, h1.base, "b"), (2, h2.base, "b")])
            assert other != first  # b avoids the host a was just sent to
        finally:
            await view.close()


async def test_view_skips_unreachable_stale_and_marked_down_hosts() -> None:
    now = [0.0]
    async with Host(("a",)) as h:
        await h.serve("a")
        dead = closed_port_url()
        view = FleetView(refresh_s=30, stale_s=5, clock=lambda: now[0])
        try:
            await view.refresh(h.base)
            rec = await view.refresh(dead)
            assert rec.down and rec.error
            entries = [("live", h.base, "a"), ("dead", dead, "a")]
            assert view.choose(entries) == ["live"]
            now[0] = 6.0  # the live host's signal is now stale
            assert view.choose(entries) == []
            await view.refresh(h.base)
            assert view.choose(entries) == ["live"]
            view.mark_down(h.base + "/v1/", "connection refused")  # however the router writes the URL
            assert view.choose(entries) == []
            await view.refresh(h.base)  # it answers again
            assert view.choose(entries) == ["live"]
        finally:
            await view.close()


async def test_view_skips_a_host_that_is_not_llmux() -> None:
    app = web.Application()
    app.router.add_get("/llmux/v1/state", lambda r: web.json_response({"object": "list", "data": []}))
    other = TestServer(app)
    await other.start_server()
    view = FleetView(refresh_s=30)
    try:
        rec = await view.refresh(str(other.make_url("")))
        assert rec.down and "not an llmux host state" in (rec.error or "")
    finally:
        await view.close()
        await other.close()


class SignalsView(FleetView):
    """A FleetView whose hosts' signals are set by the test (no polling), on a test clock."""

    def __init__(self, signals: Dict[str, HostSignal]):
        self.now = 1000.0
        super().__init__(clock=lambda: self.now)
        self.signals = signals

    def watch(self, base: str) -> None:
        pass

    def signal(self, base: str) -> Optional[HostSignal]:
        return {host_key(b): sig for b, sig in self.signals.items()}.get(host_key(base))


def test_view_places_models_that_must_share_hosts_by_their_demand() -> None:
    """Two hosts, each with one model awake; a third model, asleep everywhere (and with the
    lower wait estimate on x), goes to the host whose residents ask less (what an operator's
    static assignment would do), and stays on the host it lives on until another is lighter
    by half an average host's demand."""
    view = SignalsView({"http://x": host(hot=model("awake"), cold=model(fits=False), new=model(wait=1, fits=False)),
                        "http://y": host(hot=model(fits=False), cold=model("awake"), new=model(wait=4, fits=False))})
    entries = lambda m: [("x", "http://x", m), ("y", "http://y", m)]  # noqa: E731
    for _ in range(30):
        view.choose(entries("hot"))   # x serves it: 30 requests a minute
    for _ in range(3):
        view.choose(entries("cold"))  # y serves it: 3 a minute
    assert view.choose(entries("new")) == ["y"]
    view.now += 10  # its claim on y has lapsed; y is still its home
    for _ in range(33):
        view.choose(entries("cold"))  # y's residents now ask a little more than x's, not half a host more
    assert view.choose(entries("new")) == ["y"]
    view.now += 10
    for _ in range(60):
        view.choose(entries("cold"))  # now y is much busier: the new model moves
    assert view.choose(entries("new")) == ["x"]


def test_view_without_demand_history_ranks_as_before() -> None:
    view = SignalsView({"http://x": host(m=model(wait=1, fits=False)), "http://y": host(m=model(wait=4, fits=False, warm=True))})
    assert view.choose([("x", "http://x", "m"), ("y", "http://y", "m")]) == ["y"]


def test_view_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="refresh_s"):
        FleetView(refresh_s=0)


async def test_view_keeps_a_slow_hosts_last_signal_until_it_is_stale() -> None:
    now = [0.0]
    slow = asyncio.Event()

    async def state(request: web.Request) -> web.Response:
        if slow.is_set():
            await asyncio.sleep(WAIT)
        return web.json_response(host(m=model("awake")).to_json())

    app = web.Application()
    app.router.add_get("/llmux/v1/state", state)
    server = TestServer(app)
    await server.start_server()
    base = str(server.make_url(""))
    view = FleetView(refresh_s=30, stale_s=5, timeout_s=0.2, clock=lambda: now[0])
    try:
        await view.refresh(base)
        slow.set()
        rec = await view.refresh(base)  # times out: slow, not gone
        assert not rec.down and "no answer within" in (rec.error or "")
        assert view.choose([("x", base, "m")]) == ["x"]
        now[0] = 6.0
        assert view.choose([("x", base, "m")]) == []
    finally:
        await view.close()
        await server.close()
