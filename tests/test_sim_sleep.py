"""llmux-vllm-sim sleep mode, as vLLM 0.32 does it (reference/vllm-api.md §3.3)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import aiohttp
import pytest

from sim_fixtures import PROMPT, SimProcess, mode_sim_factory, sim_cache, sim_factory  # noqa: F401


# every test here runs against both ways the simulator holds a model (sim_fixtures.SIM_MODES)


@pytest.fixture
def sim(mode_sim_factory) -> SimProcess:  # noqa: F811
    return mode_sim_factory("alpha")


def sleep_state_metric(sim: SimProcess) -> str:
    text = sim.request("GET", "/metrics")[2].decode()
    (line,) = [ln for ln in text.splitlines()
               if ln.startswith("vllm:engine_sleep_state") and ln.endswith(" 1.0")]
    return line.split('sleep_state="')[1].split('"')[0]


@pytest.mark.parametrize("level,metric,weights_loaded", [
    (0, "awake", True),
    (1, "weights_offloaded", True),
    (2, "discard_all", False),
])
def test_sleep_and_wake_each_level(sim, level, metric, weights_loaded):
    assert sim.json("POST", f"/sleep?level={level}") == (200, {"status": "sleeping", "level": level})
    assert sim.json("GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert sleep_state_metric(sim) == metric
    st = sim.state()
    assert st["weights_loaded"] is weights_loaded and st["sleep_level"] == level
    # still answering while asleep
    assert sim.request("GET", "/health")[:3:2] == (200, b"")
    assert sim.json("GET", "/v1/models")[0] == 200
    assert sim.json("POST", "/wake_up") == (200, {"status": "awake", "tags": None})
    assert sim.json("GET", "/is_sleeping") == (200, {"is_sleeping": False})
    assert sleep_state_metric(sim) == "awake"
    sim.wait_for_line(r"sleep level=%d mode=abort" % level)
    sim.wait_for_line(r"wake_up done: awake")


def test_default_sleep_is_level_1(sim):
    assert sim.json("POST", "/sleep") == (200, {"status": "sleeping", "level": 1})


@pytest.mark.parametrize("query,param,msg", [
    ("level=3", "query.level", "Input should be less than or equal to 2"),
    ("level=-1", "query.level", "Input should be greater than or equal to 0"),
    ("level=one", "query.level", "Input should be a valid integer"),
    ("mode=bogus", "query.mode", "Input should be 'abort', 'wait' or 'keep'"),
])
def test_bad_sleep_query_is_400(sim, query, param, msg):
    status, data = sim.json("POST", f"/sleep?{query}")
    assert status == 400
    err = data["error"]
    assert (err["type"], err["param"], err["code"]) == ("Bad Request", param, 400)
    assert msg in err["message"] and err["message"].startswith("1 validation error:")
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": False}


def test_sleeping_twice_is_a_200_noop(sim):
    assert sim.json("POST", "/sleep?level=1")[0] == 200
    assert sim.json("POST", "/sleep?level=2") == (200, {"status": "sleeping", "level": 2})
    st = sim.state()
    assert st["sleep_level"] == 1 and st["weights_loaded"]  # the executor did nothing more
    assert sim.json("POST", "/wake_up")[1]["status"] == "awake"
    assert sim.json("POST", "/wake_up") == (200, {"status": "awake", "tags": None})


def test_partial_wake_follows_vllm(sim):
    sim.json("POST", "/sleep?level=1")
    assert sim.json("POST", "/wake_up?tags=weights") == (
        200, {"status": "sleeping", "tags": ["weights"]})
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}
    # a tag that is not asleep: nothing wakes
    assert sim.json("POST", "/wake_up?tags=bogus") == (200, {"status": "sleeping", "tags": ["bogus"]})
    assert sim.json("POST", "/wake_up?tags=weights&tags=kv_cache")[1]["status"] == "sleeping"
    assert sim.state()["sleeping_tags"] == ["kv_cache"]
    assert sim.json("POST", "/wake_up?tags=kv_cache") == (
        200, {"status": "awake", "tags": ["kv_cache"]})
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": False}


@pytest.mark.parametrize("level,wake_query", [
    (1, "tags=weights&tags=kv_cache"),
    (0, "tags=scheduling"),
    (2, ""),
])
def test_one_call_wakes_fully(sim, level, wake_query):
    sim.json("POST", f"/sleep?level={level}")
    assert sim.json("POST", f"/wake_up?{wake_query}")[1]["status"] == "awake"
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": False}


def test_level_1_wake_gives_the_same_answer(sim):
    before = sim.answer()
    sim.json("POST", "/sleep?level=1")
    sim.json("POST", "/wake_up")
    assert sim.answer() == before


def test_level_2_wake_without_reload_gives_garbage_until_reload(sim):
    before = sim.answer()
    sim.json("POST", "/sleep?level=2")
    sim.json("POST", "/wake_up")
    garbage = sim.answer()
    assert garbage != before and garbage.startswith("\ufffdgarbage")
    assert not sim.state()["weights_valid"]
    assert sim.request("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    assert sim.answer() == before
    st = sim.state()
    assert st["weights_valid"] and st["weights_bytes"] == 8 << 20


def test_level_2_documented_order_weights_reload_kv(sim):
    before = sim.answer()
    sim.json("POST", "/sleep?level=2")
    assert sim.json("POST", "/wake_up?tags=weights")[1]["status"] == "sleeping"
    assert sim.request("POST", "/collective_rpc", {"method": "reload_weights"})[0] == 200
    assert sim.json("POST", "/wake_up?tags=kv_cache")[1]["status"] == "awake"
    assert sim.answer() == before


def test_reload_while_weights_asleep_is_an_error(sim):
    sim.json("POST", "/sleep?level=2")
    status, data = sim.json("POST", "/collective_rpc", {"method": "reload_weights"})
    assert status == 500 and "wake_up?tags=weights" in data["error"]["message"]


# --------------------------------------------------------------------------- concurrency


async def astate(http: aiohttp.ClientSession, sim: SimProcess) -> dict[str, Any]:
    async with http.get(sim.url("/sim/state")) as resp:
        return await resp.json()


async def until(http: aiohttp.ClientSession, sim: SimProcess,
                pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            st = await astate(http, sim)
            if pred(st):
                return st
            await asyncio.sleep(0.02)
    return await asyncio.wait_for(poll(), timeout)


async def post_json(http: aiohttp.ClientSession, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text.strip() else None)


async def running_completion(http: aiohttp.ClientSession, sim: SimProcess, prompt: str,
                             max_tokens: int) -> asyncio.Future:
    """A completion request (status, body), returned once the engine is running it."""
    req = asyncio.ensure_future(post_json(
        http, sim.url("/v1/completions"), {"prompt": prompt, "max_tokens": max_tokens}))
    await until(http, sim, lambda st: st["requests_running"] == 1)
    return req


async def test_requests_are_held_while_asleep_not_rejected(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("held")
    async with aiohttp.ClientSession() as http:
        assert (await post_json(http, sim.url("/sleep?level=1")))[0] == 200
        held = asyncio.ensure_future(post_json(http, sim.url("/v1/completions"), PROMPT))
        embed = asyncio.ensure_future(post_json(http, sim.url("/v1/embeddings"), {"input": "x"}))
        await until(http, sim, lambda st: st["requests_waiting"] == 2)
        assert not held.done() and not embed.done()
        async with http.get(sim.url("/metrics")) as resp:
            assert 'vllm:num_requests_waiting{engine="0",model_name="held"} 2.0' in await resp.text()
        async with http.get(sim.url("/health")) as resp:
            assert resp.status == 200
        assert (await post_json(http, sim.url("/wake_up")))[1]["status"] == "awake"
        status, data = await asyncio.wait_for(held, 60)
        assert status == 200 and data["choices"][0]["finish_reason"] == "length"
        assert (await asyncio.wait_for(embed, 60))[0] == 200


async def test_sleep_abort_ends_in_flight_requests_with_finish_reason_abort(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("abort", env={"LLMUX_SIM_TOKENS_PER_S": "100"})
    async with aiohttp.ClientSession() as http:
        long = await running_completion(http, sim, "long", 2000)
        assert (await post_json(http, sim.url("/sleep?level=1&mode=abort")))[0] == 200
        status, data = await asyncio.wait_for(long, 60)
        assert status == 200
        assert data["choices"][0]["finish_reason"] == "abort"
        assert data["usage"]["completion_tokens"] < 2000


async def test_sleep_abort_ends_a_stream_cleanly(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("abortstream", env={"LLMUX_SIM_TOKENS_PER_S": "100"})
    async with aiohttp.ClientSession() as http:
        async with http.post(sim.url("/v1/completions"),
                             json={"prompt": "long", "max_tokens": 2000, "stream": True}) as resp:
            await resp.content.readuntil(b"\n\n")  # first chunk: in flight
            assert (await post_json(http, sim.url("/sleep?mode=abort")))[0] == 200
            rest = (await asyncio.wait_for(resp.read(), 60)).decode()
        assert '"finish_reason": "abort"' in rest and rest.endswith("data: [DONE]\n\n")


async def test_sleep_keep_freezes_requests_until_wake(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("keep", env={"LLMUX_SIM_TOKENS_PER_S": "50"})
    async with aiohttp.ClientSession() as http:
        req = await running_completion(http, sim, "keep me", 200)
        assert (await post_json(http, sim.url("/sleep?level=1&mode=keep")))[0] == 200
        st = await astate(http, sim)
        assert st["requests_running"] == 1 and st["is_sleeping"]
        assert not req.done()
        assert (await post_json(http, sim.url("/wake_up")))[1]["status"] == "awake"
        status, data = await asyncio.wait_for(req, 60)
        assert status == 200 and data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 200


async def test_sleep_wait_blocks_until_in_flight_requests_finish(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("wait", env={"LLMUX_SIM_TOKENS_PER_S": "50"})
    async with aiohttp.ClientSession() as http:
        req = await running_completion(http, sim, "wait for me", 60)
        assert (await post_json(http, sim.url("/sleep?level=1&mode=wait")))[0] == 200
        st = await astate(http, sim)
        assert st["requests_running"] == 0 and st["requests_served"] == 1 and st["is_sleeping"]
        status, data = await asyncio.wait_for(req, 60)
        assert status == 200 and data["choices"][0]["finish_reason"] == "length"


async def test_max_num_seqs_makes_the_rest_wait(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("narrow", env={"LLMUX_SIM_TOKENS_PER_S": "20"}, args=["--max-num-seqs", "1"])
    async with aiohttp.ClientSession() as http:
        reqs = [asyncio.ensure_future(post_json(http, sim.url("/v1/completions"),
                                                {"prompt": f"p{i}", "max_tokens": 20}))
                for i in range(2)]
        await until(http, sim, lambda st: st["requests_running"] == 1 and st["requests_waiting"] == 1)
        results = await asyncio.wait_for(asyncio.gather(*reqs), 120)
        assert [r[1]["choices"][0]["finish_reason"] for r in results] == ["length", "length"]


async def test_request_held_through_a_level_2_wake_without_reload_is_garbage(mode_sim_factory):  # noqa: F811
    sim = mode_sim_factory("heldl2")
    async with aiohttp.ClientSession() as http:
        await post_json(http, sim.url("/sleep?level=2"))
        held = asyncio.ensure_future(post_json(http, sim.url("/v1/completions"), PROMPT))
        await until(http, sim, lambda st: st["requests_waiting"] == 1)
        await post_json(http, sim.url("/wake_up"))
        status, data = await asyncio.wait_for(held, 60)
        assert data["choices"][0]["text"].startswith("\ufffdgarbage")
