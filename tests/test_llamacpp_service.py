"""CRIU of a real non-vLLM server: llama-cpp-python (`engine: openai`, `retain+checkpoint`)
under llmuxd.service in the real test systemd.

A request for the simulated model puts llama.cpp away with a CRIU dump (its weights stay in
the process: there is no sleep endpoint to call first); the next request for it restores the
process from the images, and its temperature-0 answer is the one it gave before.
tests/real_vllm/test_llamacpp.py drives the same server embedded (freeze, stop, real vLLM).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from sysd.helpers import free_port
from test_service import ServiceBed, base_config, boot_from_tree, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "real_vllm"))
import llamacpp  # noqa: E402  (scripts/real_vllm/llamacpp.py)

pytestmark = [pytest.mark.llamacpp, pytest.mark.systemd, pytest.mark.criu, pytest.mark.slow]

CRIU = os.environ.get("LLMUX_TEST_CRIU", "/usr/local/sbin/criu")
PROMPT = "The capital of France is"
LLAMA, OTHER = "llama", "other"


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    cache, why = llamacpp.find_cache()
    if cache is None:
        pytest.skip(why)
    if not os.path.exists(CRIU):
        pytest.skip(f"{CRIU} is not installed (scripts/install-test-deps builds CRIU 4.2; or set LLMUX_TEST_CRIU)")
    service = boot_from_tree()
    try:
        config = yaml.safe_load(base_config(service))
        config["checkpoint"] = {"criu_path": CRIU, "images_dir": f"{service.state_dir}/checkpoints"}
        service.host_path(service.config_file).write_text(yaml.safe_dump(config))
        port = service.model_ports.setdefault(LLAMA, free_port())
        (service.models_dir / f"{LLAMA}.yaml").write_text(yaml.safe_dump({"models": {LLAMA: {
            "engine": "openai", "model_path": str(cache.gguf), "command": cache.command, "port": port,
            "eviction": "retain+checkpoint", "startup_timeout": 120}}}))
        env = {"LLMUX_SIM_TOKENS_PER_S": "0", "LLMUX_SIM_CACHE": str(tmp_path_factory.mktemp("sim-cache"))}
        service.write_model(OTHER, eviction="retain+stop", env=env)
        service.enable_now()
        yield service
    finally:
        service.systemctl("stop", "llmux-model-*.service")
        service.shut_down()


def answer(svc: ServiceBed, model: str) -> str:
    status, body = svc.request(model, PROMPT, timeout=300)
    assert status == 200, f"{model}: {status} {body}\n{svc.journal('-u', 'llmuxd.service')[-4000:]}"
    return body["choices"][0]["text"]


def test_llama_cpp_is_checkpointed_by_a_switch_and_restored_with_the_same_answer(svc):
    unit = f"llmux-model-{LLAMA}.service"
    good = answer(svc, LLAMA)
    assert good.strip()
    pid = svc.unit_pid(LLAMA)
    assert pid and svc.prop(unit, "Type") == "exec"

    answer(svc, OTHER)  # the switch dumps llama.cpp with CRIU
    manifest_file = svc.host_path(f"{svc.state_dir}/checkpoints/{LLAMA}/images/manifest.json")
    try:
        wait_for(manifest_file.exists, "llama's checkpoint images written")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{svc.journal('-u', 'llmuxd.service')[-5000:]}") from None
    manifest = json.loads(manifest_file.read_text())
    assert manifest["eviction"] == "retain+checkpoint"
    assert manifest["canary"], "no canary baseline: the probe through the openai engine failed"
    assert svc.llmux_units().get(unit) in (None, "inactive"), "llama.cpp's process outlived its checkpoint"

    assert answer(svc, LLAMA) == good, "the restored llama.cpp answered differently at temperature 0"
    log = svc.journal("-u", "llmuxd.service")
    assert svc.prop(unit, "Type") == "forking", log[-3000:]  # `criu restore -d`, not a cold start
    assert svc.unit_pid(LLAMA) == pid  # CRIU gives the process back its pid
    assert f"model {LLAMA}: restored from" in log


def test_a_daemon_restart_adopts_the_running_llama_cpp(svc):
    """llama.cpp has no /is_sleeping: an adopted backend that answers is awake, and the same
    process keeps serving after llmuxd restarts."""
    answer(svc, LLAMA)
    pid = svc.unit_pid(LLAMA)
    daemon_pid = svc.prop("llmuxd.service", "MainPID")
    assert svc.systemctl("restart", "llmuxd.service").returncode == 0
    assert svc.prop("llmuxd.service", "MainPID") != daemon_pid
    assert answer(svc, LLAMA).strip()
    assert svc.unit_pid(LLAMA) == pid, "the adopted llama.cpp was started again"
