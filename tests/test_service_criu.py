"""Lazy restore through the daemon: llmuxd.service under the real test
systemd checkpoints a model with CRIU, is restarted, and the first HTTP
request for that model restores it from the images and is answered.

tests/test_criu_systemd.py shows the same at orchestrator level; this is
what an operator sees: the units from systemd/, the daemon from this
checkout, CRIU run by the daemon itself inside its unit, requests on
llmux.socket's port.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from test_service import ServiceBed, base_config, boot_from_tree, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.criu, pytest.mark.slow]

CRIU = os.environ.get("LLMUX_TEST_CRIU", "/usr/local/sbin/criu")
PROMPT = "What is the capital of France?"
CK, OTHER = "ck", "other"


def boot_with_criu(**checkpoint) -> ServiceBed:
    """The service bed with a working CRIU (skips with the reason where there is
    none) and a config whose checkpoint section is CRIU's plus `checkpoint`;
    nothing started yet."""
    if not os.path.exists(CRIU):
        pytest.skip(f"{CRIU} is not installed (scripts/install-test-deps builds CRIU 4.2; or set LLMUX_TEST_CRIU)")
    service = boot_from_tree()
    try:
        check = service.bed.run(CRIU, "check", check=False)
        if check.returncode != 0:
            why = (check.stderr or check.stdout).strip().splitlines()
            pytest.skip(f"'{CRIU} check' fails here: {why[-1] if why else check.returncode}")
        config = yaml.safe_load(base_config(service))
        config["checkpoint"] = {"criu_path": CRIU, "images_dir": f"{service.state_dir}/checkpoints", **checkpoint}
        service.host_path(service.config_file).write_text(yaml.safe_dump(config))
        return service
    except BaseException:
        service.shut_down()
        raise


def sim_env(cache: Path, weights_mb: int = 16) -> dict[str, str]:
    return {"LLMUX_SIM_TOKENS_PER_S": "0", "LLMUX_SIM_WEIGHTS_MB": str(weights_mb), "LLMUX_SIM_CACHE": str(cache)}


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    service = boot_with_criu()
    try:
        env = sim_env(tmp_path_factory.mktemp("sim-cache"))
        service.write_model(CK, eviction="offload+checkpoint", env=env)
        service.write_model(OTHER, eviction="offload+keep_running", env=env)
        service.enable_now()
        yield service
    finally:
        service.systemctl("stop", "llmux-model-*.service")
        service.shut_down()


def answer(svc: ServiceBed, model: str) -> str:
    status, body = svc.request(model, PROMPT)
    assert status == 200, f"{model}: {status} {body}\n{svc.journal('-u', 'llmuxd.service')[-4000:]}"
    assert body["model"] == model
    return body["choices"][0]["text"]


def test_checkpointed_model_is_restored_by_its_first_request_after_a_restart(svc):
    unit = f"llmux-model-{CK}.service"
    good = answer(svc, CK)
    pid = svc.unit_pid(CK)
    assert pid
    answer(svc, OTHER)  # the switch puts ck away: offload, then a CRIU dump
    manifest_file = svc.host_path(f"{svc.state_dir}/checkpoints/{CK}/images/manifest.json")
    try:
        wait_for(manifest_file.exists, "ck's checkpoint images written")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{svc.journal('-u', 'llmuxd.service')[-5000:]}") from None
    assert json.loads(manifest_file.read_text())["eviction"] == "offload+checkpoint"
    assert svc.llmux_units().get(unit) in (None, "inactive"), "ck's process outlived its checkpoint"

    daemon_pid = svc.prop("llmuxd.service", "MainPID")
    assert svc.systemctl("restart", "llmuxd.service").returncode == 0
    assert svc.prop("llmuxd.service", "MainPID") != daemon_pid
    assert "its first request restores it" in svc.journal("-u", "llmuxd.service", "--since", "-60s")

    assert answer(svc, CK) == good  # the first request after the restart
    log = svc.journal("-u", "llmuxd.service")
    # `criu restore -d` (Type=forking), not a cold start (Type=exec)
    assert svc.prop(unit, "Type") == "forking", log[-3000:]
    assert svc.unit_pid(CK) == pid  # CRIU gives the process back its pid
    assert f"model {CK}: restored from" in log
