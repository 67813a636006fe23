"""llmuxd as a system service under the real test systemd (tests/sysd), with real vLLM backends.

The service bed is tests/test_service.py's (`boot_from_tree`: units from systemd/, the daemon
from this checkout's venv); here the models are SmolLM2 (offload+keep_running) and MiniLM
(retain+freeze) from the scripts/real-vllm-setup cache, each in its transient unit
llmux-model-<name>.service. One chain of scenarios on one booted daemon, in file order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

import realvllm

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from sysd.testbed import unavailable_reason  # noqa: E402
from ports import free_port  # noqa: E402  (one source of ports per test run)

pytestmark = [pytest.mark.real_vllm, pytest.mark.systemd, pytest.mark.slow]

PROMPT = "The capital of France is"
REQUEST_TIMEOUT = 400.0


@pytest.fixture(scope="module")
def svc(real_vllm_cache):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from test_service import boot_from_tree  # the service room's bed: one way to boot it

    service = boot_from_tree()
    try:
        # run the daemon from the tree these tests come from (a copy, a worktree...)
        dropin = service.unit_dir / "llmuxd.service.d" / "60-real-vllm.conf"
        dropin.write_text(f"[Service]\nEnvironment=PYTHONPATH={TESTS.parent}\n")
        service.bed.run("systemctl", "daemon-reload")
        cache = real_vllm_cache
        models = {}
        for name, model_dir, args, eviction in (
            ("chat", cache.smollm2, realvllm.SMOLLM2_ARGS, "offload+keep_running"),
            ("embed", cache.minilm, realvllm.MINILM_ARGS, "retain+freeze"),
        ):
            port = service.model_ports.setdefault(name, free_port())
            models[name] = {"model_path": str(model_dir), "command": cache.command, "port": port,
                            "sleep_mode": False, "eviction": eviction, "extra_args": list(args),
                            "env": dict(realvllm.VLLM_ENV), "startup_timeout": REQUEST_TIMEOUT}
        (service.models_dir / "real-vllm.yaml").write_text(yaml.safe_dump({"models": models}))
        config = yaml.safe_load(service.host_path(service.config_file).read_text())
        config["policy"]["request_timeout"] = REQUEST_TIMEOUT
        service.host_path(service.config_file).write_text(yaml.safe_dump(config))
        service.enable_now()
        yield service
    finally:
        service.shut_down()


@pytest.fixture(scope="module")
def seen() -> dict:
    return {}


def complete(svc) -> str:
    status, body = realvllm.http("POST", f"http://127.0.0.1:{svc.port}/v1/completions",
                                 {"model": "chat", "prompt": PROMPT, "max_tokens": 16, "temperature": 0},
                                 timeout=REQUEST_TIMEOUT)
    assert status == 200, body
    return json.loads(body)["choices"][0]["text"]


def embed(svc, text: str) -> list[float]:
    status, body = realvllm.http("POST", f"http://127.0.0.1:{svc.port}/v1/embeddings",
                                 {"model": "embed", "input": text}, timeout=REQUEST_TIMEOUT)
    assert status == 200, body
    return json.loads(body)["data"][0]["embedding"]


def test_cold_start_runs_real_vllm_in_its_transient_unit(svc, seen):
    seen["text"] = complete(svc)
    assert svc.llmux_units().get("llmux-model-chat.service") == "active"
    # vLLM's own output is in the journal under the model's field
    assert svc.journal("LLMUX_MODEL=chat", "_SYSTEMD_UNIT=llmux-model-chat.service")


def test_switch_sleeps_chat_for_real_and_starts_embed(svc):
    assert len(embed(svc, "hello")) == 384
    assert svc.backend_sleeping("chat") is True
    assert svc.llmux_units().get("llmux-model-embed.service") == "active"


def test_switch_back_wakes_chat_and_freezes_the_embed_unit(svc, seen):
    assert complete(svc) == seen["text"]
    assert svc.backend_sleeping("chat") is False
    assert svc.prop("llmux-model-embed.service", "FreezerState") == "frozen"
    assert len(embed(svc, "thawed")) == 384
    assert svc.prop("llmux-model-embed.service", "FreezerState") == "running"
