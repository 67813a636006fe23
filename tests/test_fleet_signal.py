"""The per-host fleet signal: `GET /llmux/v1/state`, its `/v1/models` block and its gauges.

A real `Switcher` on `FakeBackends` behind the real `FrontEnd`, driven into each state a
router must tell apart (awake, starting, asleep, failed; pinned elsewhere; queue full;
budget room), read over HTTP exactly as a router reads it, and parsed back with
`HostSignal.from_json` (the reader LiteLLM's hook and `llmuxctl fleet` use).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, List, Optional

import pytest

from fleet_support import Host
from llmuxd.fleet.signal import STATE_PATH, HostSignal, SignalError, fleet_state, state_url

# -- scenarios: (name, models, host settings, how to get there, expected per model) ---------


async def fresh(h: Host) -> None:
    pass


async def a_served(h: Host) -> None:
    await h.serve("a")


async def a_then_b(h: Host) -> None:
    await h.serve("a")
    await h.serve("b")


async def b_starting(h: Host) -> None:
    await h.serve("a")
    await h.hold_start("b")


async def b_failed(h: Host) -> None:
    h.backends.fail("start", "b")
    with pytest.raises(Exception):
        await h.serve("b")


async def pinned_to_a(h: Host) -> None:
    await h.switcher.pin("a")


async def queue_full(h: Host) -> None:
    await h.hold_start("b")  # b's one queue slot is taken by the held request


async def budget_a_awake(h: Host) -> None:
    await h.serve("a")


def expect(state: str, *, accepts: bool = True, fits: bool = True, warm: Optional[bool] = None,
           switcher: Optional[str] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {"state": state, "accepts": accepts, "fits_without_eviction": fits}
    if warm is not None:
        out["warm"] = warm
    if switcher:
        out["switcher_state"] = switcher
    return out


BUDGET = {"a": {"gpu_memory_gib": 10}, "b": {"gpu_memory_gib": 10}, "c": {"gpu_memory_gib": 25}}

SCENARIOS: List[tuple] = [
    ("fresh: nothing awake, each fits", ("a", "b"), {}, fresh,
     {"a": expect("asleep"), "b": expect("asleep")}, {"awake": (), "used_ratio": 0.0}),
    ("a awake: b would evict it", ("a", "b"), {}, a_served,
     {"a": expect("awake", warm=True, switcher="active"), "b": expect("asleep", fits=False, warm=False)},
     {"awake": ("a",), "used_ratio": 1.0}),
    ("a put to sleep for b: a stays warm", ("a", "b"), {}, a_then_b,
     {"a": expect("asleep", fits=False, warm=True), "b": expect("awake", warm=True)}, {"awake": ("b",)}),
    ("a stopped for b: a is cold", {"a": {"eviction": "retain+stop"}, "b": {}}, {}, a_then_b,
     {"a": expect("asleep", fits=False, warm=False), "b": expect("awake")}, {"awake": ("b",)}),
    ("b starting while a is put away", ("a", "b"), {}, b_starting,
     {"a": expect("asleep", fits=False), "b": expect("starting", switcher="waking")}, {}),
    ("b's start failed", ("a", "b"), {"policy": {"failure_backoff": 60}}, b_failed,
     {"a": expect("asleep"), "b": expect("failed", warm=False, switcher="failed")}, {}),
    ("pinned to a: b refused", ("a", "b"), {}, pinned_to_a,
     {"a": expect("awake"), "b": expect("asleep", accepts=False, fits=False)}, {}),
    ("b's queue is full", ("a", "b"), {"policy": {"queue_limit": 1}}, queue_full,
     {"a": expect("asleep", fits=False), "b": expect("starting", accepts=False)}, {}),
    ("budget 30 GiB, a (10) awake: b (10) fits, c (25) does not", BUDGET,
     {"groups": {"default": {"budget_gib": 30}}}, budget_a_awake,
     {"a": expect("awake"), "b": expect("asleep"), "c": expect("asleep", fits=False)},
     {"awake": ("a",), "used_ratio": round(10 / 30, 4), "used_gib": 10.0, "budget_gib": 30.0}),
]


@pytest.mark.parametrize("name,models,settings,setup,models_expected,group_expected", SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
async def test_state_endpoint_tells_each_state_apart(name: str, models: Any, settings: dict,
                                                      setup: Callable, models_expected: dict,
                                                      group_expected: dict) -> None:
    async with Host(models, **settings) as h:
        await setup(h)
        signal = await h.signal()
        status = h.switcher.status()
        assert set(signal.models) == set(status.models)
        for model, want in models_expected.items():
            got = signal.models[model]
            assert {k: getattr(got, k) for k in want} == want, f"{model}: {got}"
            # the estimate is the switcher's own (the one behind Retry-After)
            assert got.wait_estimate_s == pytest.approx(h.switcher.wait_estimate(model), abs=0.01)
            assert got.in_flight == status.models[model].in_flight
            assert got.queue_depth == status.models[model].queue_depth
        group = signal.groups["default"]
        assert {k: getattr(group, k) for k in group_expected} == group_expected
        assert signal.version == "9.9" and signal.mode == status.mode and signal.pinned == status.pinned


async def test_signal_counts_in_flight_and_queued_requests() -> None:
    two_gpus = {"a": {"gpu_group": "one"}, "b": {"gpu_group": "two"}}
    async with Host(two_gpus, groups={"one": {}, "two": {}}) as h:
        lease = await h.switcher.acquire("a")
        await h.hold_start("b")
        h.request("b")
        await asyncio.sleep(0)
        signal = await h.signal()
        assert (signal.models["a"].in_flight, signal.models["b"].queue_depth) == (1, 2)
        assert signal.load == 3
        lease.release()


async def test_models_list_carries_the_per_model_fleet_block() -> None:
    async with Host(("a", "b")) as h:
        await h.serve("a")
        resp = await h.get("/v1/models")
        data = {m["id"]: m["llmux"] for m in (await resp.json())["data"]}
        signal = await h.signal()
        for name in ("a", "b"):
            m = signal.models[name]
            assert data[name]["fleet"] == {"state": m.state, "accepts": m.accepts,
                                           "wait_estimate_s": m.wait_estimate_s,
                                           "fits_without_eviction": m.fits_without_eviction, "warm": m.warm}
        assert data["a"]["state"] == "active"  # the switcher's own state is unchanged


async def test_metrics_carry_the_same_signal_as_gauges() -> None:
    async with Host(BUDGET, groups={"default": {"budget_gib": 30}}) as h:
        await h.serve("a")
        text = await (await h.get("/metrics")).text()
        signal = await h.signal()
        lines = set(text.splitlines())
        assert 'llmux_model_state{model="a",state="awake"} 1.0' in lines
        assert 'llmux_model_state{model="a",state="asleep"} 0.0' in lines
        assert 'llmux_model_state{model="c",state="asleep"} 1.0' in lines
        assert f'llmux_model_wait_estimate_seconds{{model="c"}} {signal.models["c"].wait_estimate_s}' in lines
        assert 'llmux_gpu_group_budget_gib{group="default"} 30.0' in lines
        assert 'llmux_gpu_group_used_gib{group="default"} 10.0' in lines
        # a second scrape and a second app on the same front end do not register twice
        h.frontend.make_app()
        assert (await h.get("/metrics")).status == 200


async def test_state_is_read_only() -> None:
    async with Host(("a",)) as h:
        resp = await h.session.post(h.base + STATE_PATH, json={"model": "a"})
        assert resp.status in (404, 405)
        assert h.backends.calls == []


@pytest.mark.parametrize("switcher_state,fleet", [
    ("active", "awake"), ("waking", "starting"), ("asleep", "asleep"), ("draining", "asleep"),
    ("evicting", "asleep"), ("failed", "failed"), ("something-new", "asleep"),
])
def test_switcher_states_map_to_fleet_states(switcher_state: str, fleet: str) -> None:
    assert fleet_state(switcher_state) == fleet


@pytest.mark.parametrize("base,url", [
    ("http://h:3000", "http://h:3000/llmux/v1/state"),
    ("http://h:3000/", "http://h:3000/llmux/v1/state"),
    ("http://h:3000/v1", "http://h:3000/llmux/v1/state"),
    ("http://h:3000/v1/", "http://h:3000/llmux/v1/state"),
])
def test_state_url_from_a_host_or_openai_base(base: str, url: str) -> None:
    assert state_url(base) == url


@pytest.mark.parametrize("body,message", [
    ({"object": "list", "data": []}, "not an llmux host state"),
    ([], "not an llmux host state"),
    ({"object": "llmux.host_state", "format": 2}, "format 2"),
    ({"object": "llmux.host_state", "format": 1, "models": {"a": {"in_flight": 1}}}, "malformed"),
])
def test_reader_refuses_what_is_not_a_signal(body: Any, message: str) -> None:
    with pytest.raises(SignalError, match=message):
        HostSignal.from_json(body)
