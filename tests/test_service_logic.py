"""System mode's own logic, without root or systemd: what a restart puts back
(state.json -> switcher -> state.json), the STATUS= line, and which config
changes make a backend start afresh on reload."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from fakes import FakeBackends, make_config
from llmuxd.daemon.state import DaemonState
from llmuxd.daemon.system import SystemDaemon, launch_settings_changed, status_line
from llmuxd.lifecycle import BackendState
from llmuxd.switcher import Switcher


def daemon_on_fakes(models=("a", "b", "c")) -> tuple[SystemDaemon, Switcher, FakeBackends]:
    config = make_config(models)
    backends = FakeBackends(config)
    switcher = Switcher(config, backends)
    daemon = SystemDaemon("/nonexistent/llmux.yaml")
    daemon.config = config
    daemon.core = SimpleNamespace(switcher=switcher)
    daemon.orchestrator = backends
    return daemon, switcher, backends


async def test_saved_state_is_put_back_and_saved_again_unchanged():
    daemon, switcher, _ = daemon_on_fakes()
    await switcher.start()
    saved = DaemonState(mode="manual", pinned="b", evictions={"a": "retain+stop"},
                        switch_costs={"a→b": 4.5}, quarantine={"c": {"reason": "criu restore failed"}})
    daemon._quarantine = dict(saved.quarantine)
    await daemon._apply_saved_state(saved)
    try:
        assert (switcher.mode, switcher.pinned) == ("manual", "b")
        assert str(switcher.eviction_for("a")) == "retain+stop"
        assert switcher.switch_costs["a→b"] == pytest.approx(4.5)
        again = daemon.snapshot()
        assert again.switch_costs["a→b"] == pytest.approx(4.5)  # plus what pinning b just taught it
        again.switch_costs = saved.switch_costs
        assert again == saved
    finally:
        await switcher.close()


async def test_entries_for_models_no_longer_configured_are_dropped(caplog):
    daemon, switcher, _ = daemon_on_fakes(("a", "b"))
    await switcher.start()
    saved = DaemonState(mode="manual", pinned="gone", evictions={"gone": "offload+freeze", "a": "offload+freeze"})
    with caplog.at_level(logging.INFO):
        await daemon._apply_saved_state(saved)
    try:
        assert switcher.pinned is None
        assert daemon.snapshot().evictions == {"a": "offload+freeze"}
        assert "pinned model 'gone' is no longer configured" in caplog.text
        assert "eviction override of 'gone'" in caplog.text
    finally:
        await switcher.close()


async def test_an_override_equal_to_the_config_is_not_stored():
    daemon, switcher, _ = daemon_on_fakes(("a",))
    switcher.set_eviction("a", "offload+keep_running")  # the default
    assert daemon.snapshot().evictions == {}


async def test_status_line_counts_sleeping_backends_and_queue():
    daemon, switcher, backends = daemon_on_fakes(("qwen", "llama", "mistral"))
    await switcher.start()
    try:
        for model in ("llama", "mistral", "qwen"):
            await switcher.switch(model, wait=True)
        assert backends.state("llama") is BackendState.SLEEPING
        assert status_line(switcher.status(), backends.state) == "active: qwen · 2 sleeping · 0 queued"
    finally:
        await switcher.close()


def test_status_line_before_anything_ran():
    daemon, switcher, backends = daemon_on_fakes(("a", "b"))
    assert status_line(switcher.status(), backends.state) == "active: none · 0 sleeping · 0 queued"


@pytest.mark.parametrize(
    "change, restarts",
    [
        ({}, []),
        ({"eviction": "discard+keep_running"}, []),
        ({"startup_timeout": 30}, []),
        ({"warmup_prompt": "Hi"}, []),
        ({"extra_args": ["--max-model-len", "4096"]}, ["extra_args"]),
        ({"command": ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]}, ["command"]),
        ({"env": {"HF_HOME": "/var/lib/llmux/hf"}}, ["env"]),
        ({"gpus": [1]}, ["gpus"]),
        ({"user": "vllm"}, ["user"]),
        ({"port": 20500}, ["port"]),
    ],
)
def test_which_changes_restart_a_backend(change, restarts):
    old = make_config({"m": {"port": 20400}}).models["m"]
    new = make_config({"m": {"port": 20400, **change}}).models["m"]
    assert launch_settings_changed(old, new) == restarts
