"""Priority under the stress harness (issue #23): 0 lost, 0 misrouted, interactive served first.

One `llmuxd run` per policy on three simulated models: `chat` is awake and
streams interactive answers, a batch flood arrives for `bulk`, and a little
later interactive requests for `chat2`. The requests carry their priority in a
header that a test hook (tests/stress/priority_hook.py: why a hook, there)
hands to the real switcher, since API keys live on another branch.

Each policy runs the same load twice on the same daemon: first with every
request interactive — the negative control, where `bulk`'s older, deeper queue
is served before `chat2` (so the ordering check below can fail) — then with
`bulk` marked batch, where `chat2` is served first and `bulk` never takes the
GPU from `chat` while it streams. Orders of completion are compared, never
durations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness import Outcome, Req, Scenario, SimModel, Wave, check, run_scenario, start_daemon, stop_and_check
from priority_hook import HEADER

CHAT, CHAT2, BULK = "chat", "chat2", "bulk"
MODELS = [SimModel(CHAT), SimModel(CHAT2, eviction="discard+keep_running"), SimModel(BULK)]
HOOK = [sys.executable, str(Path(__file__).with_name("priority_hook.py"))]
BATCH = {HEADER: "batch"}
POLICIES = ["fifo", "cost_aware", "time_slice"]


def load(name: str, bulk_headers: dict[str, str]) -> Scenario:
    streams = [Req(CHAT, stream=True, max_tokens=300) for _ in range(3)]  # about 3 s each
    bulk = [Req(BULK, max_tokens=8, headers=dict(bulk_headers)) for _ in range(12)]
    chat2 = [Req(CHAT2, max_tokens=4) for _ in range(3)]
    return Scenario(name, [
        Wave([Req(CHAT)], name="prime"),
        Wave(streams, after="prime", name="streams"),
        Wave(bulk, after="prime", at=0.3, name="bulk"),
        Wave(chat2, after="prime", at=1.5, name="chat2"),  # well after bulk, still while chat streams
    ])


def ends(report, model: str) -> list[float]:
    outs: list[Outcome] = [o for o in report.outcomes if o.req.model == model]
    return sorted(o.started + o.elapsed for o in outs)


@pytest.fixture(scope="module", params=POLICIES)
def daemon(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"priority-{request.param}")
    d = start_daemon(tmp, MODELS, launcher=HOOK, policy={"type": request.param, "max_wait": 30})
    yield d
    stop_and_check(d)


async def test_interactive_served_first_nothing_lost_or_misrouted(daemon):
    plain = await run_scenario(daemon, load("priority_plain", {}))
    check(plain)  # 0 lost, 0 misrouted, nothing cut, invariants held
    assert ends(plain, BULK)[0] < ends(plain, CHAT2)[-1], "negative control: bulk (older, deeper) went first"

    prio = await run_scenario(daemon, load("priority_batch", BATCH))
    check(prio)
    assert ends(prio, CHAT2)[-1] < ends(prio, BULK)[0], "interactive chat2 was served after batch bulk"
    assert ends(prio, CHAT)[-1] < ends(prio, BULK)[0], "batch bulk took the GPU while chat streamed"
    assert len(ends(prio, BULK)) == 12
