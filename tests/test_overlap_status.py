"""What a person sees of an overlapped switch (issue #26): `llmuxctl status`
shows each model's last switch with its phases and "overlapped" or why not,
through GetStatus on a private bus with the in-process service."""

from __future__ import annotations

from llmuxd.daemon.embedded import describe_switch
from llmuxd.events import SwitchFinished
from test_bus_service import client, ok  # noqa: F401  (fixture)
from test_bus_support import system_bus  # noqa: F401  (fixture)
from test_ctl import env, llmuxctl, running  # noqa: F401  (fixtures)

OVERLAPPED = "overlapped in 0.80s: drain 0.00s, pause 0.01s, kv_release 0.01s, weights_out 0.70s, weights_in 0.71s"
SEQUENTIAL = "sequential (budget: weights a 16 + b 16 GiB exceed budget_gib 30) in 1.40s: sleep 0.70s, wake 0.70s"


async def test_llmuxctl_status_shows_the_last_switch_of_each_model(running, env):
    running.switcher.models["llama"].last_switch = OVERLAPPED
    running.switcher.models["qwen-7b"].last_switch = SEQUENTIAL
    r = await llmuxctl("status", env=env)
    assert r.rc == 0, r
    assert f"last switch to llama: {OVERLAPPED}" in r.out.splitlines()
    assert f"last switch to qwen-7b: {SEQUENTIAL}" in r.out.splitlines()


async def test_get_status_carries_the_last_switch(client, running):
    running.switcher.models["llama"].last_switch = OVERLAPPED
    (status,) = await ok(client, "GetStatus")
    models = status["models"].value
    assert models["llama"]["last_switch"].value == OVERLAPPED
    assert models["qwen-7b"]["last_switch"].value == ""


def test_the_journal_line_says_overlapped_or_why_not():
    phases = {"drain": 0.0, "pause": 0.01, "weights_out": 0.7, "weights_in": 0.71}
    line = describe_switch(SwitchFinished("g", "a", "b", True, 0.8, phases, overlap="overlapped"))
    assert line == "switch a -> b ok in 0.80s (pause 0.01s, weights_out 0.70s, weights_in 0.71s); overlapped"
    line = describe_switch(SwitchFinished("g", "a", "b", True, 1.4, {"sleep": 0.7, "wake": 0.7},
                                          overlap="engine: a refused it (HTTP 500)"))
    assert line == "switch a -> b ok in 1.40s (sleep 0.70s, wake 0.70s); sequential: engine: a refused it (HTTP 500)"
    assert describe_switch(SwitchFinished("g", None, "b", True, 1.0, {"wake": 1.0})) == "switch (nothing) -> b ok in 1.00s (wake 1.00s)"


def test_the_overlap_counter_counts_each_kind_of_answer():
    from prometheus_client import generate_latest

    from llmuxd.metrics import Metrics

    m = Metrics()
    for overlap in ("overlapped", "overlapped", "budget: too big", None):
        m.on_switch_event(SwitchFinished("g", "a", "b", True, 1.0, {}, overlap=overlap))
    m.on_switch_event(SwitchFinished("g", "a", "b", False, 1.0, {}, overlap="overlapped"))  # failed: not counted
    lines = [ln for ln in generate_latest(m.registry).decode().splitlines()
             if ln.startswith("llmux_switch_overlap_total{")]
    assert sorted(lines) == ['llmux_switch_overlap_total{from="a",overlap="budget",to="b"} 1.0',
                             'llmux_switch_overlap_total{from="a",overlap="overlapped",to="b"} 2.0']
