"""Backends that run as another user, under the real test systemd (issue 14,
item 10): llmuxd run as root from a checkout, not from the .deb, so no
tmpfiles rule prepared its state directory.

- The state directory llmuxd creates belongs to the backends' user (as the
  package's tmpfiles rule makes it), and is their working directory.
- One that user cannot enter (left root:root 0750 by an older llmuxd) is not
  handed to them: they start in /, and the journal says how to fix it.
- When systemd cannot start a backend (its exit statuses 200-245), the
  client's 502, the model's LastError and the journal say why and what to do,
  not "exited with status 217".

Backends run as 'nobody' here (every system has it; the test systemd shares
/etc with the host, so a user made for the test would outlive it).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile

import pytest
import yaml

from test_service import BUS_NAME, ServiceBed, base_config, boot_from_tree

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

USER = "nobody"
MODEL = "alpha"


@pytest.fixture(scope="module")
def svc():
    cache = tempfile.mkdtemp(prefix="llmux-sim-nobody.")  # the simulators write their weights here
    os.chmod(cache, 0o777)
    service = boot_from_tree()
    try:
        config = yaml.safe_load(base_config(service))
        config["user"] = USER
        service.host_path(service.config_file).write_text(yaml.safe_dump(config))
        service.write_model(MODEL, env={"LLMUX_SIM_TOKENS_PER_S": "0", "LLMUX_SIM_CACHE": cache})
        service.enable_now()
        yield service
    finally:
        service.systemctl("stop", "llmux-model-*.service")
        service.shut_down()
        shutil.rmtree(cache, ignore_errors=True)


def backend_cwd(svc: ServiceBed, model: str) -> str:
    return svc.bed.run("readlink", f"/proc/{svc.unit_pid(model)}/cwd").stdout.strip()


def answered(svc: ServiceBed, model: str) -> None:
    status, body = svc.request(model)
    assert status == 200, f"{status} {body}\n{svc.journal('-u', 'llmuxd.service')[-3000:]}"


def test_the_state_directory_llmuxd_creates_is_the_backends_home(svc):
    state = svc.host_path(svc.state_dir)
    owner = pwd.getpwnam(USER)
    assert (state.stat().st_uid, state.stat().st_gid) == (owner.pw_uid, owner.pw_gid)
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
    answered(svc, MODEL)
    assert backend_cwd(svc, MODEL) == svc.state_dir
    assert svc.bed.run("ps", "-o", "user=", "-p", str(svc.unit_pid(MODEL))).stdout.strip() == USER


def test_a_state_directory_the_user_cannot_enter_is_not_handed_to_the_backend(svc):
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0
    svc.systemctl("stop", f"llmux-model-{MODEL}.service")  # (not loaded when it never started)
    state = svc.host_path(svc.state_dir)
    os.chown(state, 0, 0)  # what an older llmuxd left: root:root 0750
    state.chmod(0o750)
    assert svc.systemctl("start", "llmuxd.service").returncode == 0
    answered(svc, MODEL)
    assert backend_cwd(svc, MODEL) == "/"
    warning = svc.journal("-u", "llmuxd.service", "--grep", "cannot enter")
    assert f"user '{USER}' cannot enter {svc.state_dir}" in warning, warning
    assert f"chown {USER}: {svc.state_dir}" in warning, warning


def _script_only_root_can_reach(svc: ServiceBed) -> str:
    private = svc.host_path("/run/llmux-test/root-only")
    private.mkdir(mode=0o700, exist_ok=True)
    script = private / "serve"
    script.write_text("#!/bin/sh\nexec sleep 600\n")
    script.chmod(0o755)
    return "/run/llmux-test/root-only/serve"


SETUP_FAILURES = [  # (model, its config beyond the defaults, what the message must say)
    ("ghost", {"user": "llmux-test-no-such-user"},
     ["217/USER", "'llmux-test-no-such-user'", "does not exist", "useradd --system llmux-test-no-such-user",
      "set `user:`"]),
    ("locked", {"command": _script_only_root_can_reach},
     ["203/EXEC", "/run/llmux-test/root-only/serve", f"'{USER}'", "correct the model's command"]),
]


@pytest.mark.parametrize("model,extra,says", SETUP_FAILURES, ids=[m for m, _, _ in SETUP_FAILURES])
def test_a_backend_systemd_cannot_start_is_explained(svc, model, extra, says):
    extra = {k: ([v(svc)] if callable(v) else v) for k, v in extra.items()}
    svc.write_model(model, **extra)
    try:
        assert svc.systemctl("reload", "llmuxd.service").returncode == 0
        status, body = svc.request(model)
        assert status == 502, body
        message = json.loads(body)["error"]["message"]  # (an error's body comes back as text)
        assert all(s in message for s in says), message
        path = f"/io/llmux/LLMux1/model/{model}"
        reply = svc.busctl("--json=short", "get-property", BUS_NAME, path, "io.llmux.LLMux1.Model", "LastError")
        last_error = json.loads(reply.stdout)["data"]
        assert all(s in last_error for s in says), last_error
        journal = svc.journal("-u", "llmuxd.service", "--grep", says[0])
        assert all(s in journal for s in says), journal
    finally:
        svc.remove_model(model)
        svc.systemctl("reload", "llmuxd.service")
