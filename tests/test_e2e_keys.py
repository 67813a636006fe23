"""End to end: API keys on a real `llmuxd run` with `llmux-vllm-sim` backends.

Keys are made with `llmuxctl keys add` (the secret alone on stdout), used by
the official `openai` client, revoked with `llmuxctl keys revoke` + SIGHUP
while a stream under that key is running (it finishes), and a bad key file
on reload leaves the previous keys in force. No secret may appear in the
daemon's log or in /metrics: each test greps for every secret it used.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import openai
import pytest
import yaml

from daemon_process import SIM, WAIT, DaemonProcess, daemon_env, http_json, sim_model, wait_until, write_config
from llmuxd.keys import hash_secret
from sim_fixtures import free_port

pytestmark = pytest.mark.skipif(not os.path.exists(SIM), reason="llmux-vllm-sim not installed in this venv")

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmuxd.ctl", *args], capture_output=True, text=True,
                          env=daemon_env(), timeout=WAIT)


def add_key(keys_dir: Path, name: str, *options: str) -> str:
    """`llmuxctl keys add`: the secret is stdout, all of it; the rest went to stderr."""
    done = ctl("keys", "--dir", str(keys_dir), "add", name, *options)
    assert done.returncode == 0, done.stderr
    secret = done.stdout
    assert secret.endswith("\n") and secret.count("\n") == 1 and secret.startswith("sk-llmux-"), secret
    assert "written to" in done.stderr and secret.strip() not in done.stderr
    return secret.strip()


class Keyed(DaemonProcess):
    """The daemon, its keys dir and every secret handed out (to grep for)."""

    keys_dir: Path
    secrets: dict

    def client(self, secret: str, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=secret, max_retries=0, timeout=WAIT, **kw)

    def post(self, secret: str | None, model: str, **extra):
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        return http_json(self.base + "/v1/chat/completions", json.dumps({"model": model, **CHAT, **extra}).encode(),
                         headers)

    def reload(self, expect: str) -> None:
        """SIGHUP, then wait for the log line `expect` (the reload's outcome)."""
        before = self.log().count(expect)
        self.proc.send_signal(signal.SIGHUP)
        wait_until(f"log line {expect!r}", lambda: self.log().count(expect) > before)

    def assert_no_secret_leaked(self, extra: list[str] = ()) -> None:
        text, log = self.metrics_text(), self.log()
        for secret in list(self.secrets.values()) + list(extra):
            assert secret not in log and secret not in text, "a secret leaked into the log or /metrics"
            assert hash_secret(secret) not in log and hash_secret(secret) not in text

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=WAIT) as resp:
            return resp.read().decode()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-keys")
    keys_dir = tmp / "keys.d"
    made = {
        "chat": add_key(keys_dir, "chat", "--models", "alpha"),
        "all": add_key(keys_dir, "all"),
        "limited": add_key(keys_dir, "limited", "--rate", "0.2/s", "--burst", "3", "--priority", "batch"),
        "streams": add_key(keys_dir, "streams", "--max-in-flight", "2"),
        "old": add_key(keys_dir, "old", "--expires", "2020-01-01"),
        "leaving": add_key(keys_dir, "leaving"),
    }
    ledger = tmp / "gpu.json"
    models = {
        "alpha": sim_model("org/alpha-7b", ledger, 1000, LLMUX_SIM_TOKENS_PER_S="50"),
        "beta": sim_model("org/beta-7b", ledger, 1000, LLMUX_SIM_TOKENS_PER_S="50"),
    }
    # a key kept out of keys_dir: systemd's LoadCredential=llmux-keys:FILE, as the daemon sees it
    credentials = tmp / "credentials"
    credentials.mkdir()
    made["from-credential"] = "sk-llmux-credential-secret-for-test"
    (credentials / "llmux-keys").write_text(f"id: from-credential\nsha256: {hash_secret(made['from-credential'])}\n"
                                            "models: [beta]\n")
    config = write_config(tmp, models, keys_dir=str(keys_dir))
    env = {**daemon_env(), "CREDENTIALS_DIRECTORY": str(credentials)}
    daemon = Keyed(config, tmp / "llmuxd.log", env=env).wait_ready()
    daemon.keys_dir, daemon.secrets = keys_dir, made
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def test_openai_client_with_a_key_and_models_filtered(keyed):
    client = keyed.client(keyed.secrets["chat"])
    reply = client.chat.completions.create(model="alpha", **CHAT)
    assert reply.model == "alpha" and reply.choices[0].message.content
    assert [m.id for m in client.models.list()] == ["alpha"]
    assert sorted(m.id for m in keyed.client(keyed.secrets["all"]).models.list()) == ["alpha", "beta"]
    from_credential = keyed.client(keyed.secrets["from-credential"])
    assert [m.id for m in from_credential.models.list()] == ["beta"]
    assert from_credential.chat.completions.create(model="beta", **CHAT).model == "beta"


@pytest.mark.parametrize("secret,words", [
    ("sk-llmux-not-a-key", "Incorrect API key provided"),
    ("old", "has expired"),
])
def test_wrong_and_expired_keys_are_401_for_the_openai_client(keyed, secret, words):
    secret = keyed.secrets.get(secret, secret)
    with pytest.raises(openai.AuthenticationError) as err:
        keyed.client(secret).chat.completions.create(model="alpha", **CHAT)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key" and words in err.value.message


def test_missing_key_is_401(keyed):
    status, headers, body = keyed.post(None, "alpha")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in body["error"]["message"]
    status, _, body = http_json(keyed.base + "/v1/models")
    assert status == 401


def test_a_model_out_of_scope_is_the_same_404_as_one_that_does_not_exist(keyed):
    client = keyed.client(keyed.secrets["chat"])
    answers = {}
    for model in ("beta", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=model, **CHAT)
        answers[model] = err.value.body
    assert answers["beta"] == {**answers["no-such-model"],
                               "message": answers["no-such-model"]["message"].replace("no-such-model", "beta")}
    assert answers["beta"]["code"] == "model_not_found"
    assert "does not exist or you do not have access to it" in answers["beta"]["message"]


def test_rate_limit_exactly_burst_pass_then_retry_after_is_honoured(keyed):
    secret = keyed.secrets["limited"]
    # beta awake first: requests waiting for a switch would meet the small queue_limit instead
    assert keyed.post(keyed.secrets["all"], "beta")[0] == 200

    async def burst():
        async with aiohttp.ClientSession() as session:
            async def one():
                async with session.post(keyed.base + "/v1/chat/completions", json={"model": "beta", **CHAT},
                                        headers={"Authorization": f"Bearer {secret}"}) as resp:
                    return resp.status, dict(resp.headers), await resp.json()
            return await asyncio.gather(*(one() for _ in range(4)))

    answers = asyncio.run(burst())
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 200, 200, 429], statuses
    _, headers, body = next(a for a in answers if a[0] == 429)
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1
    time.sleep(retry_after)  # honoured: the next request passes
    status, _, body = keyed.post(secret, "beta")
    assert status == 200, body


def test_in_flight_limit_with_streams(keyed):
    secret = keyed.secrets["streams"]
    client = keyed.client(secret)
    streams = [client.chat.completions.create(model="alpha", messages=CHAT["messages"], max_tokens=400, stream=True)
               for _ in range(2)]
    for stream in streams:
        next(iter(stream))  # both are running
    status, headers, body = keyed.post(secret, "alpha")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "in flight" in body["error"]["message"]
    assert headers["x-ratelimit-limit-in-flight"] == "2" and headers["Retry-After"] == "1"
    with pytest.raises(openai.RateLimitError):  # the client sees it as such when it does not retry
        client.chat.completions.create(model="alpha", **CHAT)
    streams[0].close()  # one ends: its place is free
    wait_until("a place under the in-flight limit", lambda: keyed.post(secret, "alpha")[0] == 200)
    streams[1].close()


def test_revoked_after_reload_while_a_stream_under_it_finishes(keyed):
    secret = keyed.secrets["leaving"]
    stream = keyed.client(secret).chat.completions.create(model="alpha", messages=CHAT["messages"], max_tokens=60,
                                                          stream=True)
    chunks = [next(iter(stream))]
    done = ctl("keys", "--dir", str(keyed.keys_dir), "revoke", "leaving")
    assert done.returncode == 0, done.stderr
    keyed.reload("reloaded ")
    chunks += list(stream)  # admitted before the reload: it runs to its end
    assert len(chunks) > 10 and chunks[-1].choices[0].finish_reason == "length"
    status, _, body = keyed.post(secret, "alpha")
    assert status == 401 and "Incorrect API key" in body["error"]["message"]


def test_bad_key_file_on_reload_keeps_the_previous_keys(keyed):
    bad = keyed.keys_dir / "zz-bad.yaml"
    bad.write_text("id: broken\nsha256: not-a-hash\n")
    bad.chmod(0o640)
    try:
        keyed.reload("reload refused")
        line = next(line for line in keyed.log().splitlines() if str(bad) in line)
        assert "key 'broken': sha256: 'not-a-hash' is not 64 hex digits" in line
        status, _, _ = keyed.post(keyed.secrets["chat"], "alpha")
        assert status == 200, "the keys in force stay"
    finally:
        bad.unlink()
    keyed.reload("reloaded ")


def test_a_thousand_wrong_keys_are_refused_while_a_good_key_is_served(keyed):
    wrong = [f"sk-llmux-{secrets.token_urlsafe(24)}" for _ in range(1000)]
    good = keyed.secrets["all"]

    async def run():
        limit = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as session:
            async def one(secret, model, header):
                async with limit:
                    headers = {"Authorization": f"Bearer {secret}"} if header == "bearer" else {"x-api-key": secret}
                    async with session.post(keyed.base + "/v1/chat/completions", json={"model": model, **CHAT},
                                            headers=headers) as resp:
                        await resp.read()
                        return resp.status
            bad = [one(s, "alpha", "bearer" if i % 2 else "x-api-key") for i, s in enumerate(wrong)]
            fine = [one(good, "alpha", "bearer") for _ in range(40)]
            results = await asyncio.gather(*bad, *fine)
            return results[:len(bad)], results[len(bad):]

    refused, served = asyncio.run(run())
    assert set(refused) == {401} and len(refused) == 1000
    assert set(served) == {200} and len(served) == 40
    keyed.assert_no_secret_leaked(wrong)
    summed = [line for line in keyed.log().splitlines() if "refused with a invalid API key" in line]
    assert summed and len(summed) < 10, "refusals are summed in the log, not one line each"


def test_no_keys_on_an_address_others_reach_is_refused_unless_auth_none(tmp_path):
    ledger = tmp_path / "gpu.json"
    models = {"alpha": sim_model("org/alpha-7b", ledger, 1000)}
    config = write_config(tmp_path, models, keys_dir=str(tmp_path / "empty.d"))
    data = yaml.safe_load(config.read_text())
    (tmp_path / "empty.d").mkdir()
    data["listen"] = f"0.0.0.0:{free_port()}"  # refused before anything binds
    config.write_text(yaml.safe_dump(data))
    check = subprocess.run([sys.executable, "-m", "llmuxd.daemon.main", "check-config", str(config)],
                           capture_output=True, text=True, env=daemon_env(), timeout=WAIT)
    assert check.returncode == 1 and "no API keys" in check.stderr and "auth: none" in check.stderr
    daemon = DaemonProcess(config, tmp_path / "refused.log", listen=data["listen"].replace("0.0.0.0", "127.0.0.1"))
    assert daemon.wait_exit() == 1
    assert "which other hosts can reach, with no API keys" in daemon.log()
    data["auth"] = "none"
    config.write_text(yaml.safe_dump(data))
    check = subprocess.run([sys.executable, "-m", "llmuxd.daemon.main", "check-config", str(config)],
                           capture_output=True, text=True, env=daemon_env(), timeout=WAIT)
    assert check.returncode == 0, check.stderr


def test_no_secret_in_the_log_or_metrics(keyed):
    keyed.assert_no_secret_leaked()
    text = keyed.metrics_text()
    assert 'key="chat"' in text and 'key="limited",model="beta",status="429"' in text
