"""Secrets are never shown (llmuxd/config/secrets.py): `llmuxd check-config`
prints the effective configuration with every secret masked, on success and in
its error messages, while the loaded configuration keeps the real values.

Each case runs the real `llmuxd check-config` and greps all it printed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmuxd.config import load_config
from llmuxd.config.secrets import MASK, is_secret, masked

S3_SECRET = "s3cr3t-Zq8v1Lk0Pp"
HF_SECRET = "hf_Yt6Rr0Ww2Ee"
STORE = {"endpoint": "http://127.0.0.1:9", "bucket": "b", "access_key": "AKIAEXAMPLE", "secret_key": S3_SECRET}


def config(**over) -> dict:
    data = {"models": {"m": {"model_path": "/m", "env": {"HF_TOKEN": HF_SECRET, "PLAIN": "shown"}}},
            "checkpoint": {"object_store": dict(STORE)}}
    data.update(over)
    return data


CASES = {  # name: (config data, exit status)
    "valid": (config(), 0),
    "unknown key beside the secret": (config(checkpoint={"object_store": {**STORE, "colour": "red"}}), 0),
    "a secret of the wrong type": (config(checkpoint={"object_store": {**STORE, "secret_key": [S3_SECRET]}}), 1),
    "a broken file elsewhere": (config(policy={"request_timeout": "soon"}), 1),
    "a token of the wrong type": (config(models={"m": {"model_path": "/m", "env": {"HF_TOKEN": [HF_SECRET]}}}), 1),
}


def check_config(tmp_path: Path, data: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "llmux.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.run([sys.executable, "-m", "llmuxd.daemon.main", "check-config", *args, str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
def test_check_config_never_prints_a_secret(tmp_path, name, strict):
    data, status = CASES[name]
    result = check_config(tmp_path, data, *(["--strict"] if strict else []))
    printed = result.stdout + result.stderr
    assert result.returncode == (1 if strict and "unknown" in name else status), printed
    assert S3_SECRET not in printed and HF_SECRET not in printed, printed
    if result.returncode == 0:
        shown = yaml.safe_load(result.stdout)
        assert shown["checkpoint"]["object_store"]["secret_key"] == MASK
        assert shown["checkpoint"]["object_store"]["access_key"] == "AKIAEXAMPLE"  # an id, not a secret
        assert shown["models"]["m"]["env"] == {"HF_TOKEN": MASK, "PLAIN": "shown"}


def test_the_loaded_configuration_keeps_the_secrets(tmp_path):
    path = tmp_path / "llmux.yaml"
    path.write_text(yaml.safe_dump(config()))
    loaded = load_config(str(path))
    assert loaded.checkpoint.object_store.secret_key == S3_SECRET
    assert loaded.models["m"].env["HF_TOKEN"] == HF_SECRET
    assert S3_SECRET not in repr(loaded.checkpoint)


@pytest.mark.parametrize("key,secret", [
    ("secret_key", True), ("HF_TOKEN", True), ("AWS_SESSION_TOKEN", True), ("DB_PASSWORD", True),
    ("api_keys", True), ("OPENAI_API_KEY", True), ("credentials", True), ("ssh_private_key", True),
    ("access_key", False), ("model_path", False), ("PLAIN", False), ("keep_images", False),
    ("max_tokens", True),  # over-masking a harmless value is the safe mistake
])
def test_secret_key_names(key, secret):
    assert is_secret(key) is secret


def test_masked_keeps_shape():
    assert masked({"a": {"api_keys": ["k1", "k2"], "n": 1, "token": None}}) == {
        "a": {"api_keys": [MASK, MASK], "n": 1, "token": None}}
