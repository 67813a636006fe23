"""`llmuxd validate|checkpoint|restore` on the simulator (subprocess runtime)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import yaml

from llmuxd.checkpoint.errors import CheckpointBusy, CheckpointError
from llmuxd.config import Config
from llmuxd.daemon.tools import format_table, open_orchestrator, parse_policies, ValidationRow
from llmuxd.errors import NotSupported
from llmuxd.eviction import Eviction, EvictionError
from llmuxd.runtime.subprocess import SubprocessRuntime
from sysd.helpers import PYTHON, free_port

SIM_COMMAND = [PYTHON, "-m", "llmuxd.sim.server", "serve"]


def config_dict(tmp_path) -> dict:
    env = {"LLMUX_SIM_GPU_LEDGER": str(tmp_path / "ledger.json"), "LLMUX_SIM_GPU_MB": "4000",
           "LLMUX_SIM_GPU_RESIDUE_MB": "500"}
    return {
        "gpu_probe": "ledger",  # the simulator's ledger stands in for the GPU
        "checkpoint": {"images_dir": str(tmp_path / "images")},
        "models": {"m": {"model_path": "/models/m", "command": SIM_COMMAND, "port": free_port(),
                         "startup_timeout": 120, "env": env}},
    }


def test_validate_prints_its_table_and_fails_on_an_unsupported_eviction(tmp_path):
    cfg = tmp_path / "llmux.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "llmuxd.daemon.tools", "validate", "m", "--config", str(cfg), "--runtime",
         "subprocess", "--policies", "offload+keep_running,discard+keep_running,retain+stop,discard+checkpoint"],
        capture_output=True, text=True, timeout=300,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "validation of model 'm' (memory in MiB)"
    assert lines[1].split()[:3] == ["Eviction", "Sleep", "s"]
    rows = {line.split()[0]: line for line in lines[2:6]}
    for ok in ("offload+keep_running", "discard+keep_running", "retain+stop"):
        assert rows[ok].split()[-2:] == ["same", "PASS"], rows[ok]
    # the simulator's ledger stands in for the GPU: 4000 MiB awake, 500 asleep, 0 stopped
    assert rows["offload+keep_running"].split()[3:6] == ["4000", "500", "4000"]
    assert rows["retain+stop"].split()[3:6] == ["4000", "0", "4000"]
    assert rows["discard+checkpoint"].split()[-1] == "FAIL"
    assert any("needs llmuxd under systemd: a CRIU-restored backend is no child of llmuxd" in line for line in lines), result.stdout
    assert lines[-1] == "3 passed, 1 failed"
    assert result.returncode == 1, result.stderr


@pytest.mark.parametrize("text, error", [("", "at least one eviction"), ("offload+nap", "unknown process")])
def test_validate_rejects_bad_policy_lists(text, error):
    with pytest.raises(EvictionError, match=error):
        parse_policies(text)


def test_table_marks_a_changed_answer():
    table = format_table("m", [ValidationRow("discard+keep_running", 0.1, 0.2, 4000, 500, 4000, 10, 10, False,
                                             "answer 'x' != '4'")])
    assert table.splitlines()[2].split()[-2:] == ["DIFFERENT", "FAIL"] and "discard+keep_running: answer 'x' != '4'" in table


@pytest.fixture
async def opened(tmp_path):
    runtime = SubprocessRuntime()
    orch, manager = await open_orchestrator(Config.from_dict(config_dict(tmp_path)), runtime)
    yield orch, manager
    await orch.close()
    await runtime.close()


async def test_checkpoint_of_a_model_that_is_not_running_is_refused(opened):
    orch, manager = opened
    with pytest.raises(CheckpointError, match="'m' is not running \\(not_started\\); start it first"):
        await manager.checkpoint_now(orch, "m", Eviction.parse("discard+checkpoint"))


async def test_two_concurrent_checkpoints_of_one_model(opened):
    orch, manager = opened
    await orch.ensure_awake("m")
    results = await asyncio.gather(
        manager.checkpoint_now(orch, "m", Eviction.parse("discard+checkpoint")),
        manager.checkpoint_now(orch, "m", Eviction.parse("discard+checkpoint")),
        return_exceptions=True,
    )
    kinds = sorted(type(r).__name__ for r in results)
    assert kinds == ["CheckpointBusy", "NotSupported"], results
    busy = next(r for r in results if isinstance(r, CheckpointBusy))
    assert "being checkpointed already" in str(busy)
    unsupported = next(r for r in results if isinstance(r, NotSupported))
    assert "needs llmuxd under systemd: a CRIU-restored backend is no child of llmuxd" in str(unsupported)


@pytest.mark.parametrize("configured,used,why", [
    ("offload+keep_running", "discard+checkpoint", "m: no --eviction: using 'discard+checkpoint', llmux 0.7's default"),
    ("discard+checkpoint", "discard+checkpoint", "m: no --eviction: using 'discard+checkpoint', llmux 0.7's default"),
    ("offload+checkpoint", "offload+checkpoint",
     "m: no --eviction: using the model's own 'offload+checkpoint' (llmux 0.7 used 'discard+checkpoint'; "
     "the image must match how the model sleeps)"),
])
def test_checkpoint_without_eviction_says_what_it_uses_and_why(configured, used, why):
    from llmuxd.daemon.tools import default_checkpoint_eviction

    eviction, line = default_checkpoint_eviction("m", Eviction.parse(configured))
    assert (str(eviction), line) == (used, why)
