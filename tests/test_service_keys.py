"""API keys of the system service: `llmuxd.service` under the real test systemd
(tests/sysd) with the package's unit files, keys from keys_dir, `systemctl
reload llmuxd` revoking a key while a stream under it finishes, a bad key file
failing the reload, key ids in the journal, per-key use in `llmuxctl status`,
and no secret in any journal line or metric.

A fourth key comes from `LoadCredential=llmux-keys:FILE` (a credentials file in the
key format, for deployments that keep secrets out of /etc).

The scenarios run in file order on one daemon (module fixture `keys_svc`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import yaml

from daemon_process import daemon_env
from llmuxd.keys import hash_secret
from test_service import boot_from_tree, wait_for
from test_service_bus import llmuxctl
from test_service_s3 import credentials_dropin

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

KEYS_DIR = "/run/llmux-test/keys.d"


def add_key(svc, name: str, *options: str) -> str:
    done = subprocess.run([sys.executable, "-m", "llmuxd.ctl", "keys", "--dir", str(svc.host_path(KEYS_DIR)),
                           "add", name, *options], capture_output=True, text=True, env=daemon_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def post(svc, secret: str | None, model: str, *, stream: bool = False, max_tokens: int = 2, timeout: float = 120):
    """(status, body); a stream is read to its end."""
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": max_tokens, "stream": stream}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{svc.port}/v1/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def keys_svc():
    svc = boot_from_tree()
    try:
        svc.secrets = {"chat": add_key(svc, "chat", "--models", "alpha"),
                       "leaving": add_key(svc, "leaving", "--rate", "100/s", "--burst", "50"),
                       "tight": add_key(svc, "tight", "--rate", "1/h", "--burst", "1")}
        credential = svc.host_path("/run/llmux-test/llmux-keys.yaml")
        svc.secrets["from-credential"] = "sk-llmux-credential-" + "7" * 32
        credential.write_text(f"id: from-credential\nsha256: {hash_secret(svc.secrets['from-credential'])}\n"
                              "models: [beta]\n")
        credential.chmod(0o600)
        credentials_dropin(svc, {"llmux-keys": credential})
        config = svc.host_path(svc.config_file)
        data = yaml.safe_load(config.read_text())
        data["keys_dir"] = KEYS_DIR
        config.write_text(yaml.safe_dump(data))
        svc.write_model("alpha", env={"LLMUX_SIM_TOKENS_PER_S": "40"})
        svc.write_model("beta")
        svc.enable_now()
        yield svc
    finally:
        svc.shut_down()


def test_a_key_from_load_credential(keys_svc):
    secret = keys_svc.secrets["from-credential"]
    assert post(keys_svc, secret, "beta")[0] == 200
    status, body = post(keys_svc, secret, "alpha")  # outside its models: the unknown model's answer
    assert status == 404 and "model_not_found" in body, body


def test_keys_from_keys_dir(keys_svc):
    assert post(keys_svc, keys_svc.secrets["chat"], "alpha")[0] == 200
    loaded = keys_svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=keys_loaded")
    assert "4 in force (chat,leaving,tight,from-credential)" in loaded, keys_svc.journal("-u", "llmuxd.service")[-3000:]
    status, body = post(keys_svc, None, "alpha")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, body = post(keys_svc, keys_svc.secrets["chat"], "beta")  # out of its scope
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


def test_systemctl_reload_revokes_while_a_stream_under_the_key_finishes(keys_svc):
    secret = keys_svc.secrets["leaving"]
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(r=post(keys_svc, secret, "alpha", stream=True,
                                                                     max_tokens=200)))
    thread.start()
    wait_for(lambda: json.loads(llmuxctl(keys_svc, "--json", "status").stdout).get("keys", {})
             .get("leaving", {}).get("in_flight") == 1, "the stream under 'leaving' is in flight")
    (keys_svc.host_path(KEYS_DIR) / "leaving.yaml").unlink()
    reload = keys_svc.systemctl("reload", "llmuxd.service")
    assert reload.returncode == 0, reload.stderr
    assert post(keys_svc, secret, "alpha")[0] == 401, "revoked once reloaded"
    thread.join(timeout=300)
    status, body = answer["r"]
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), body[-300:]


def test_a_bad_key_file_fails_the_reload_and_keeps_the_keys(keys_svc):
    bad = keys_svc.host_path(KEYS_DIR) / "bad.yaml"
    bad.write_text("id: broken\nsha256: abc123\n")
    try:
        reload = keys_svc.systemctl("reload", "llmuxd.service")
        assert reload.returncode != 0
        failed = keys_svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=reload_failed")
        assert f"{KEYS_DIR}/bad.yaml: key 'broken': sha256: 'abc123' is not 64 hex digits" in failed, failed
        assert post(keys_svc, keys_svc.secrets["chat"], "alpha")[0] == 200
    finally:
        bad.unlink()


def test_status_journal_and_metrics_name_keys_never_secrets(keys_svc):
    assert post(keys_svc, keys_svc.secrets["chat"], "alpha")[0] == 200
    shown = llmuxctl(keys_svc, "status")
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("chat "))
    assert row.split()[1:3] == ["3", "0"], shown.stdout  # requests, in flight
    for _ in range(3):
        post(keys_svc, "sk-llmux-wrong", "alpha")
    refused = keys_svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=key_refused", "-o", "verbose")
    assert "LLMUX_REASON=invalid" in refused
    assert [post(keys_svc, keys_svc.secrets["tight"], "alpha")[0] for _ in range(2)] == [200, 429]
    limited = wait_for(lambda: keys_svc.journal("-u", "llmuxd.service", "LLMUX_EVENT=key_limited", "LLMUX_KEY=tight"),
                       "key_limited for 'tight' in the journal")
    assert "key tight: 1 request(s) refused by its requests limit" in limited
    with urllib.request.urlopen(f"http://127.0.0.1:{keys_svc.port}/metrics", timeout=60) as resp:
        metrics = resp.read().decode()
    assert 'key="chat",model="alpha",status="200"' in metrics
    journal = keys_svc.journal("-o", "verbose")
    for secret in list(keys_svc.secrets.values()) + ["sk-llmux-wrong"]:
        for text in (journal, metrics, shown.stdout):
            assert secret not in text and hash_secret(secret) not in text
