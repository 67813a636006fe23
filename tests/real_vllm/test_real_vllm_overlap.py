"""Overlapped switches (issue #26) against real vLLM 0.32 on the CPU.

vLLM's CPU worker refuses `/release_kv_cache_memory` with 500 "Selective
discard is not supported on CPU" (docs/real-vllm.md), so what runs here is
the fallback: the first switch that tries says why in one journal line, every
switch after it is sequential, and the model answers exactly as before
(greedy, temperature 0). The group's budget admits both models' weights but
not both models awake, so every switch is one the plan would overlap.
"""

from __future__ import annotations

import re

import pytest

import realvllm
from ports import free_port  # noqa: E402  (one source of ports per test run)
from test_real_vllm import Daemon, complete, embed, model_entry, wait_until

pytestmark = pytest.mark.real_vllm

REFUSED = re.compile(r"model '(\w+)' refused a partial sleep step \(.*Selective discard is not supported on CPU")


@pytest.fixture(scope="module")
def daemon(real_vllm_cache, tmp_path_factory):
    cache = real_vllm_cache
    ports = [free_port() for _ in range(2)]
    sizes = {"gpu_group": "cpu", "gpu_memory_gib": 4, "weights_gib": 1}
    config = {
        "policy": {"min_active": 0, "request_timeout": 400.0, "drain_timeout": 120, "overlap": "auto"},
        "groups": {"cpu": {"budget_gib": 6}},  # 4 + 4 awake do not fit; 1 + 1 of weights do
        "models": {
            "chat": model_entry(cache, "chat", ports[0], "offload+keep_running", **sizes),
            "embed": model_entry(cache, "embed", ports[1], "offload+keep_running", **sizes),
        },
    }
    d = Daemon(tmp_path_factory.mktemp("llmuxd-overlap"), config)
    d.start()
    yield d
    d.stop()
    wait_until(lambda: not any(realvllm.server_pid(d.backend_port(m)) for m in config["models"]),
               f"the backends to be gone after llmuxd exited\n{d.log()}")


def test_refused_release_falls_back_once_and_answers_stay_the_same(daemon):
    first = complete(daemon)
    vectors = embed(daemon, "embed", ["hello"])  # chat -> embed: embed starts cold, nothing to overlap
    assert complete(daemon) == first  # embed -> chat: the plan overlaps; embed's release is refused
    log = daemon.log(2_000_000)
    assert REFUSED.findall(log) == ["embed"], log[-3000:]
    assert re.search(r"switch embed -> chat ok in .*; sequential: engine: embed refused it \(.*Selective discard", log)
    assert embed(daemon, "embed", ["hello"]) == vectors  # chat -> embed: sequential without trying
    assert complete(daemon) == first
    log = daemon.log(2_000_000)
    assert REFUSED.findall(log) == ["embed"], "the refusal is said once"
    assert re.search(r"switch chat -> embed ok in .*; sequential: engine: embed refused a step before", log)
    assert "; overlapped" not in log
    # the refusal left the engine healthy: its sleep after it worked, nothing was stopped or restarted
    # (seen failing before the release went on a connection of its own: "connection reset", stop)
    assert "escalating to stop" not in log
    assert len(re.findall(r"model embed: started", log)) == 1
    assert len(re.findall(r"model chat: started", log)) == 1
