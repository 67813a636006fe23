"""llmuxd.engine.vllm.VllmClient against llmux-vllm-sim (a real subprocess)."""

from __future__ import annotations

import time

import aiohttp
import pytest

from llmuxd.engine.errors import (
    BackendExited,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    EngineError,
)
from llmuxd.engine.vllm import EngineTimeouts, VllmClient, metric_value, parse_prometheus
from sim_fixtures import SimProcess, free_port, sim_cache, sim_factory  # noqa: F401

PROMPT = "The capital of France is"


@pytest.fixture
def sim(sim_factory) -> SimProcess:  # noqa: F811
    return sim_factory("engine")


async def test_wait_healthy_then_basic_info(sim):
    async with VllmClient(sim.base_url) as client:
        await client.wait_healthy(time.monotonic() + 60, process_alive=lambda: True)
        assert await client.version() == "0.32.0"
        assert await client.models() == ["engine"]


async def test_wait_healthy_fails_fast_when_the_process_exits(sim_factory):  # noqa: F811
    port = free_port()
    sim = sim_factory("dies", env={"LLMUX_SIM_LOAD_TIME": "600"}, port=port, wait=False)
    sim.wait_for_line("loading model")
    sim.kill()
    async with VllmClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(BackendExited, match="exited before it was healthy"):
            await client.wait_healthy(time.monotonic() + 600,
                                      process_alive=lambda: sim.proc.poll() is None)


async def test_wait_healthy_times_out_at_the_deadline(sim_factory):  # noqa: F811
    port = free_port()
    sim_factory("slow", env={"LLMUX_SIM_LOAD_TIME": "600"}, port=port, wait=False)
    timeouts = EngineTimeouts(health_poll=0.05)
    async with VllmClient(f"http://127.0.0.1:{port}", timeouts=timeouts) as client:
        with pytest.raises(BackendTimeout, match="not healthy within"):
            await client.wait_healthy(time.monotonic() + 0.5)


async def test_nothing_listening_is_unreachable():
    async with VllmClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(BackendUnreachable, match="is the model process running"):
            await client.health()


async def test_sleep_wake_cycle(sim):
    async with VllmClient(sim.base_url) as client:
        assert await client.is_sleeping() is False
        assert await client.sleep(1) == {"status": "sleeping", "level": 1}
        assert await client.is_sleeping() is True
        assert (await client.wake_up(["weights"]))["status"] == "sleeping"
        assert (await client.wake_up(["kv_cache"]))["status"] == "awake"
        assert await client.is_sleeping() is False
        await client.sleep(0, mode="wait")
        assert (await client.wake_up())["status"] == "awake"


async def test_sleep_arguments_are_checked_before_any_call(sim):
    async with VllmClient(sim.base_url) as client:
        with pytest.raises(ValueError, match="level"):
            await client.sleep(3)
        with pytest.raises(ValueError, match="mode"):
            await client.sleep(1, mode="later")


async def test_dev_routes_missing_is_an_http_404_error(sim_factory):  # noqa: F811
    sim = sim_factory("nodev", dev_mode=False)
    async with VllmClient(sim.base_url) as client:
        with pytest.raises(BackendHTTPError) as info:
            await client.sleep(1)
    assert info.value.status == 404 and info.value.detail == "Not Found"
    assert "HTTP 404" in str(info.value)


async def test_backend_500_carries_vllms_message(sim):
    sim.fault("fail_wake")
    async with VllmClient(sim.base_url) as client:
        await client.sleep(1)
        with pytest.raises(BackendHTTPError) as info:
            await client.wake_up()
    assert info.value.status == 500
    assert "simulated wake failure" in str(info.value)
    assert '"error"' in info.value.body


async def test_each_call_has_its_own_timeout(sim):
    sim.fault("hang_sleep")
    async with VllmClient(sim.base_url, timeouts=EngineTimeouts(sleep=0.5)) as client:
        with pytest.raises(BackendTimeout, match="sleep level 1 .* no answer within 0.5s"):
            await client.sleep(1)
        assert await client.is_sleeping() is False  # other calls still work


async def test_requests_held_while_asleep_time_out_instead_of_503(sim):
    async with VllmClient(sim.base_url, timeouts=EngineTimeouts(probe=0.5)) as client:
        await client.sleep(1)
        with pytest.raises(BackendTimeout):
            await client.probe("engine", PROMPT)
        await client.wake_up()
        assert await client.probe("engine", PROMPT)


async def test_probe_catches_garbage_after_level_2_without_reload(sim):
    async with VllmClient(sim.base_url) as client:
        await client.warmup("engine")
        before = await client.probe("engine", PROMPT)
        assert before == await client.probe("engine", PROMPT)
        await client.sleep(2)
        await client.wake_up()
        assert await client.probe("engine", PROMPT) != before
        assert await client.collective_rpc("reload_weights") is None
        assert await client.reset_prefix_cache() is True
        assert await client.probe("engine", PROMPT) == before
    assert [c["method"] for c in sim.state()["collective_rpc"]] == ["reload_weights"]


async def test_collective_rpc_results_and_errors(sim):
    async with VllmClient(sim.base_url) as client:
        assert await client.collective_rpc("suspend_nccl") is None
        assert await client.collective_rpc("get_rank") == [None]
        sim.fault("fail_reload")
        with pytest.raises(BackendHTTPError, match="fail_reload"):
            await client.reload_weights()


async def test_warmup_unknown_model_is_a_404(sim):
    async with VllmClient(sim.base_url) as client:
        with pytest.raises(BackendHTTPError, match="does not exist") as info:
            await client.warmup("other")
    assert info.value.status == 404


async def test_metrics(sim):
    async with VllmClient(sim.base_url) as client:
        await client.sleep(1)
        m = await client.metrics()
    assert metric_value(m, "vllm:engine_sleep_state", sleep_state="weights_offloaded") == 1.0
    assert metric_value(m, "vllm:engine_sleep_state", sleep_state="awake") == 0.0
    assert metric_value(m, "vllm:num_requests_running") == 0.0
    assert metric_value(m, "vllm:no_such_metric") is None


async def test_a_shared_session_is_left_open(sim):
    async with aiohttp.ClientSession() as session:
        client = VllmClient(sim.base_url, session=session)
        await client.health()
        await client.close()
        assert not session.closed
        await client.health()


def test_parse_prometheus():
    text = (
        "# HELP x y\n# TYPE x gauge\n"
        'vllm:a{engine="0",model_name="m x"} 1.5\n'
        "plain 2\n"
        'with_ts{l="v"} 3 1700000000\n'
        "bad{} NaN\n"
    )
    m = parse_prometheus(text)
    assert m['vllm:a{engine="0",model_name="m x"}'] == 1.5
    assert m["plain"] == 2.0 and m['with_ts{l="v"}'] == 3.0
    assert m["bad{}"] != m["bad{}"]  # NaN
    assert metric_value(m, "vllm:a", model_name="m x") == 1.5


def test_errors_are_engine_errors_with_one_line_messages():
    err = BackendHTTPError(500, '{"error": {"message": "boom\\nmore", "type": "x", "code": 500}}',
                           url="http://h/sleep", operation="sleep level 1")
    assert isinstance(err, EngineError) and err.http_status == 502
    assert str(err) == "sleep level 1 to http://h/sleep answered HTTP 500: boom"
    assert BackendHTTPError(502, "", url="u").detail == "(empty body)"
