"""checkpoint eviction for real: CRIU dumps a simulator unit of the test systemd
and restores it as a new unit (root, tests/sysd, CRIU >= 4.2 passing `criu check`).

The orchestrator runs on the host; CRIU and /proc reads run inside the test
systemd's namespaces through tests/sysd/exec.sh (on a real host the prefix is
empty), and the restore runs as a transient unit there.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import os
import time
import uuid
from pathlib import Path

import pytest

from llmuxd.checkpoint.manager import CheckpointManager
from llmuxd.config import Config
from llmuxd.daemon.tools import checkpoint_model, restore_model
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import BackendState
from llmuxd.names import unit_name
from llmuxd.orchestrator import Orchestrator
from llmuxd.runtime.systemd import SystemdRuntime
from llmuxd.sim.settings import VLLM_VERSION
from llmuxd.switching.state import ModelState, process_state
from sysd.helpers import PYTHON, completion, free_port, http
from sysd.testbed import EXEC

pytestmark = [pytest.mark.systemd, pytest.mark.criu, pytest.mark.slow]

CRIU = os.environ.get("LLMUX_TEST_CRIU", "/usr/local/sbin/criu")
SIM_COMMAND = [PYTHON, "-m", "llmuxd.sim.server", "serve"]
PROMPT = "What is the capital of France?"
WEIGHTS_MB = 48


@pytest.fixture(scope="module")
def criu_bed(real_systemd):  # noqa: F811
    if not os.path.exists(CRIU):
        pytest.skip(f"{CRIU} is not installed (scripts/install-test-deps builds CRIU 4.2; or set LLMUX_TEST_CRIU)")
    result = real_systemd.run(CRIU, "check", check=False)
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        pytest.skip(f"'{CRIU} check' fails here: {why[-1] if why else result.returncode}")
    return real_systemd


def prefix(bed) -> list[str]:
    return ["env", f"SYSD_TEST_DIR={bed.state_dir}", str(EXEC)]


@pytest.fixture
async def make(tmp_path):
    made: list[Orchestrator] = []

    async def factory(bed, eviction: str, *, name: str | None = None, criu: str = CRIU, port: int | None = None,
                      images: Path | None = None, object_store: dict | None = None, manager_kw: dict | None = None,
                      **model: object) -> tuple[Orchestrator, CheckpointManager, str]:
        name = name or f"ck-{uuid.uuid4().hex[:6]}"
        runtime = SystemdRuntime(bus_address=bed.bus_address)
        await runtime.connect()
        env = {"LLMUX_SIM_WEIGHTS_MB": str(WEIGHTS_MB), "LLMUX_SIM_CACHE": str(tmp_path / "sim-cache")}
        config = Config.from_dict({
            "user": "root",
            "gpu_probe": "ledger",  # the simulators' GPU ledger, where a model's env names one
            "checkpoint": {"criu_path": criu, "images_dir": str(images or tmp_path / "images"),
                           **({"object_store": object_store} if object_store else {})},
            "models": {name: {"model_path": f"/models/{name}", "command": SIM_COMMAND, "port": port or free_port(),
                              "startup_timeout": 120, "eviction": eviction, **{"env": env, **model}}},
        })
        orch = Orchestrator(config, runtime, stop_timeout=10)
        manager = CheckpointManager(config, command_prefix=prefix(bed), **(manager_kw or {})).install(orch)
        made.append(orch)
        return orch, manager, name

    yield factory
    for orch in made:
        await orch.close()
        await orch.runtime.close()


async def answer(orch: Orchestrator, model: str) -> str:
    return await asyncio.to_thread(completion, orch.endpoint(model), model, PROMPT, 60)


def journal_count(bed, model: str, needle: str) -> int:
    return bed.journal(f"_SYSTEMD_UNIT={unit_name(model)}").count(needle)


async def wait_journal_count(bed, model: str, needle: str, more_than: int, deadline: float = 60.0) -> None:
    """Wait until the unit's journal has more than `more_than` lines with `needle`.

    (Not by invocation ID: journald caches a client's context by PID for a few
    seconds, and a restored process has its old PID, so its first lines still
    carry the old invocation's ID.)"""
    end = time.monotonic() + deadline
    count = 0
    while time.monotonic() < end:
        count = await asyncio.to_thread(journal_count, bed, model, needle)
        if count > more_than:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no new '{needle}' line in the journal of {unit_name(model)} ({count} seen)")


@pytest.mark.parametrize("eviction", ["discard+checkpoint", "offload+checkpoint"])
async def test_sleep_restore_cycles_keep_the_answer_and_the_journal(criu_bed, make, eviction):
    orch, manager, name = await make(criu_bed, eviction)
    await orch.ensure_awake(name)
    good = await answer(orch, name)
    first_pid = orch.status(name).main_pid
    for _cycle in range(2):
        wakes = await asyncio.to_thread(journal_count, criu_bed, name, "POST /wake_up")
        await orch.sleep(name, Eviction.parse(eviction))
        assert orch.state(name) is BackendState.CHECKPOINTED, orch.status(name).reason
        assert process_state(ModelState.ASLEEP, orch.detail(name)) == "checkpointed"  # what status pages say
        manifest = manager.catalogue.load(name)
        assert (manifest.eviction, manifest.backend_version, manifest.pid) == (eviction, VLLM_VERSION, first_pid)
        await orch.ensure_awake(name)
        assert manager.restore_outcome[name] == "restored"
        assert orch.state(name) is BackendState.READY
        assert await answer(orch, name) == good
        unit = unit_name(name)
        assert criu_bed.unit_property(unit, "Type") == "forking"
        assert int(criu_bed.unit_property(unit, "MainPID")) == first_pid  # CRIU keeps PIDs
        # the restored process (woken after the restore) writes into the unit's journal
        await wait_journal_count(criu_bed, name, "POST /wake_up", wakes)


async def test_image_size_follows_the_weight_strategy(criu_bed, make):
    sizes = {}
    for eviction in ("offload+checkpoint", "discard+checkpoint"):
        orch, manager, name = await make(criu_bed, eviction)
        await orch.ensure_awake(name)
        await orch.sleep(name, Eviction.parse(eviction))
        assert orch.state(name) is BackendState.CHECKPOINTED, orch.status(name).reason
        sizes[eviction] = manager.catalogue.load(name).size_bytes
    # offload keeps the weights in host RAM, so they are in the image; discard dropped them
    assert sizes["offload+checkpoint"] - sizes["discard+checkpoint"] > (WEIGHTS_MB // 2) << 20, sizes


async def test_corrupted_image_is_refused_and_the_model_cold_starts(criu_bed, make):
    orch, manager, name = await make(criu_bed, "discard+checkpoint")
    await orch.ensure_awake(name)
    good = await answer(orch, name)
    await orch.sleep(name, Eviction.parse("discard+checkpoint"))
    images = manager.catalogue.images_path(name)
    biggest = max((p for p in images.iterdir() if p.name.startswith("pages-")), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    await orch.ensure_awake(name)
    assert orch.state(name) is BackendState.READY
    outcome = manager.restore_outcome[name]
    assert outcome.startswith("cold-started instead") and "does not match its checksum" in outcome, outcome
    assert criu_bed.unit_property(unit_name(name), "Type") == "exec"
    assert await answer(orch, name) == good


async def test_lazy_restore_after_a_daemon_restart(criu_bed, make, tmp_path):
    port = free_port()
    orch, _, name = await make(criu_bed, "offload+checkpoint", port=port)
    await orch.ensure_awake(name)
    good = await answer(orch, name)
    await orch.sleep(name, Eviction.parse("offload+checkpoint"))
    await orch.close()
    await orch.runtime.close()
    # a second orchestrator (the restarted daemon) finds the image and starts checkpointed
    orch2, manager2, _ = await make(criu_bed, "offload+checkpoint", name=name, port=port)
    await orch2.adopt()
    assert manager2.mark_lazy(orch2) == [name]
    assert orch2.state(name) is BackendState.CHECKPOINTED
    await orch2.ensure_awake(name)
    assert manager2.restore_outcome[name] == "restored"
    assert await answer(orch2, name) == good


async def test_failed_dump_escalates_to_stop(real_systemd, make):  # noqa: F811
    orch, _, name = await make(real_systemd, "discard+checkpoint", criu="/bin/false")
    await orch.ensure_awake(name)
    await orch.sleep(name, Eviction.parse("discard+checkpoint"))
    assert orch.state(name) is BackendState.STOPPED
    assert "criu dump exited 1" in orch.status(name).reason


async def test_checkpoint_tool_then_restore_tool_from_a_checkpoint_path(criu_bed, make, tmp_path):
    port = free_port()
    orch, manager, name = await make(criu_bed, "offload+keep_running", port=port)
    out = io.StringIO()
    assert await checkpoint_model(orch, manager, name, out=out) == 0
    assert f"{name}: checkpointed with discard+checkpoint to " in out.getvalue()
    good = manager.canary.baselines[name]
    shipped = tmp_path / "shipped-images"
    shutil.copytree(manager.catalogue.images_path(name), shipped)
    await orch.close()
    await orch.runtime.close()
    # another host (empty catalogue) restores from the configured checkpoint_path
    orch2, manager2, _ = await make(criu_bed, "discard+checkpoint", name=name, port=port,
                                    images=tmp_path / "other-catalogue", checkpoint_path=str(shipped))
    out = io.StringIO()
    assert await restore_model(orch2, manager2, name, out=out) == 0
    assert f"{name}: restored; running as {unit_name(name)}" in out.getvalue()
    from llmuxd.checkpoint.canary import CANARY_MAX_TOKENS, CANARY_PROMPT

    assert await orch2._get(name).engine.probe(name, CANARY_PROMPT, CANARY_MAX_TOKENS) == good


async def test_sleep_that_keeps_gpu_memory_escalates_to_checkpoint(criu_bed, make, tmp_path):
    ledger = {"LLMUX_SIM_GPU_LEDGER": str(tmp_path / "ledger.json"), "LLMUX_SIM_GPU_MB": "4000",
              "LLMUX_SIM_GPU_RESIDUE_MB": "500", "LLMUX_SIM_WEIGHTS_MB": "8",
              "LLMUX_SIM_CACHE": str(tmp_path / "sim-cache")}
    orch, manager, name = await make(criu_bed, "offload+keep_running", env=ledger)
    await orch.ensure_awake(name)
    good = await answer(orch, name)
    status, body = await asyncio.to_thread(
        http, "POST", f"{orch.endpoint(name)}/sim/fault", {"kind": "sleep_keeps_memory"})
    assert status == 200, body
    await orch.sleep(name, Eviction.parse("offload+keep_running"))
    # CUDA suspend is not available here, so verified eviction went on to CRIU
    assert orch.state(name) is BackendState.CHECKPOINTED, orch.status(name).reason
    assert str(orch.status(name).eviction) == "offload+checkpoint"
    assert manager.effectiveness[name] == 1.0
    await orch.ensure_awake(name)
    assert manager.restore_outcome[name] == "restored"
    assert await answer(orch, name) == good


async def test_restore_with_its_pid_taken_says_so_and_cold_starts(criu_bed, make):
    orch, manager, name = await make(criu_bed, "discard+checkpoint")
    await orch.ensure_awake(name)
    pid = orch.status(name).main_pid
    await orch.sleep(name, Eviction.parse("discard+checkpoint"))
    # a squatter takes the PID (the next PID handed out in the namespace is ns_last_pid + 1);
    # another fork in the namespace may come first, so try again (a skip here fails as root)
    for _attempt in range(20):
        placed = criu_bed.run("sh", "-c", f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid; "
                                          "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout.strip()
        if placed == str(pid):
            break
        criu_bed.run("kill", placed, check=False)
    try:
        if criu_bed.run("sh", "-c", f"grep -q '^sleep' /proc/{pid}/comm", check=False).returncode != 0:
            pytest.skip(f"could not place a process on PID {pid} in 20 tries (the namespace was busy)")
        await orch.ensure_awake(name)
        outcome = manager.restore_outcome[name]
        assert outcome.startswith("cold-started instead") and f"PID {pid}" in outcome, outcome
        assert "used by another process" in outcome
        assert orch.state(name) is BackendState.READY
    finally:
        criu_bed.run("kill", str(pid), check=False)


async def test_restore_that_answers_differently_is_stopped_and_marked_unsafe(criu_bed, make):
    orch, manager, name = await make(criu_bed, "offload+checkpoint")
    await orch.ensure_awake(name)
    good = await answer(orch, name)
    await orch.sleep(name, Eviction.parse("offload+checkpoint"))  # the canary's baseline is taken here
    await orch.ensure_awake(name)
    status, body = await asyncio.to_thread(
        http, "POST", f"{orch.endpoint(name)}/sim/fault", {"kind": "garbage", "count": -1})
    assert status == 200, body
    await orch.sleep(name, Eviction.parse("offload+checkpoint"))  # the image now answers garbage
    await orch.ensure_awake(name)
    assert orch.state(name) is BackendState.READY
    assert criu_bed.unit_property(unit_name(name), "Type") == "exec"  # cold-started, not restored
    assert await answer(orch, name) == good
    assert manager.canary.unsafe == {name: {"offload+checkpoint"}}
    await orch.sleep(name, Eviction.parse("offload+checkpoint"))  # now a stop: a cold start is always right
    assert orch.state(name) is BackendState.STOPPED
