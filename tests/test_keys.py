"""The pure key store: key files, lookup by secret, scopes, expiry and per-key limits.

No daemon here (tests/test_http_keys.py and tests/test_e2e_keys.py have it):
every bad key file is one line naming the file and the key, and the limits
are checked against a fake clock so that "exactly burst pass" is exact.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from llmuxd.config import ConfigError
from llmuxd.keys import (EXPIRED, INVALID, MISSING, ApiKey, InvalidApiKey, KeyLimited, KeyLimits, KeyStore,
                         generate_secret, hash_secret, read_keys)
from llmuxd.priority import Priority

S1, S2 = "sk-llmux-first-secret", "sk-llmux-second-secret"
H1, H2 = hash_secret(S1), hash_secret(S2)


def write(directory, name: str, text: str, mode: int = 0o640) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_one_key_per_file_and_several_per_file(tmp_path):
    write(tmp_path, "chat.yaml", f"id: chat\nsha256: {H1}\nmodels: [llama-*, qwen]\nrate: 120/m\n"
                                 "max_in_flight: 4\npriority: batch\nexpires: 2031-01-02\ncontrol: true\n")
    write(tmp_path, "team.yml", f"keys:\n  - id: team-a\n    sha256: {H2.upper()}\n")
    write(tmp_path, "notes.txt", "not a key file")
    write(tmp_path, ".chat.yaml.tmp", "id: [broken")  # an atomic write's temporary: never read
    keys, warnings = read_keys(str(tmp_path), explicit=True, environ={})
    assert warnings == []
    chat, team = keys
    assert (chat.id, chat.models, chat.rate, chat.burst, chat.max_in_flight) == ("chat", ("llama-*", "qwen"), 2.0, 2, 4)
    assert chat.priority is Priority.BATCH and chat.control
    assert chat.expires == datetime(2031, 1, 2, tzinfo=timezone.utc)
    assert (team.id, team.models, team.rate, team.priority, team.control) == ("team-a", ("*",), None,
                                                                            Priority.INTERACTIVE, False)
    assert team.sha256 == H2  # hex case does not matter
    assert S1 not in repr(chat) and H1 not in repr(chat), "neither secret nor hash in a repr"


BAD_FILES = [
    # (file text, words of the one line besides the file name)
    ("id: a\nsha256: [unclosed\n", "key 'a': line 3, column 1: invalid YAML"),
    (f"id: a\nsha256: {H1}\nsha256: {H1}\n", "key 'a': line 3, column 1: invalid YAML: key 'sha256' is given twice"),
    ("id: a\nsha256: abc123\n", "key 'a': sha256: 'abc123' is not 64 hex digits"),
    (f"id: a\nsha256: {H1[:-1]}g\n", "is not 64 hex digits"),
    ("id: a\n", "key 'a': sha256: missing"),
    (f"sha256: {H1}\n", "key #1: id: missing"),
    (f"id: 'a b'\nsha256: {H1}\n", "key #1: id: 'a b' is not a valid id"),
    (f"id: a\nsha256: {H1}\nmodles: [x]\n", "key 'a': unknown field 'modles'"),
    (f"id: a\nsha256: {H1}\nrate: fast\n", "key 'a': 'fast' is not a rate"),
    (f"id: a\nsha256: {H1}\nburst: 3\n", "burst needs a rate"),
    (f"id: a\nsha256: {H1}\nmax_in_flight: 0\n", "max_in_flight: 0 must be a whole number of at least 1"),
    (f"id: a\nsha256: {H1}\npriority: urgent\n", "priority: 'urgent' is not one of interactive, batch"),
    (f"id: a\nsha256: {H1}\nexpires: someday\n", "'someday' is not a date"),
    (f"id: a\nsha256: {H1}\ncontrol: yes please\n", "control: 'yes please' must be true or false"),
    (f"id: a\nsha256: {H1}\nmodels: []\n", "models: a list must be a list"),
]


@pytest.mark.parametrize("text,words", BAD_FILES, ids=[w for _, w in BAD_FILES])
def test_each_bad_key_file_is_one_line_with_file_and_key(tmp_path, text, words):
    path = write(tmp_path, "bad.yaml", text)
    write(tmp_path, "good.yaml", f"id: good\nsha256: {H2}\n")
    with pytest.raises(ConfigError) as err:
        read_keys(str(tmp_path), explicit=True, environ={})
    (line,) = str(err.value).splitlines()
    assert line.startswith(path + ": ") and words in line, line


def test_duplicate_id_and_duplicate_secret_across_files(tmp_path):
    write(tmp_path, "a.yaml", f"id: chat\nsha256: {H1}\n")
    b = write(tmp_path, "b.yaml", f"- id: chat\n  sha256: {H2}\n- id: other\n  sha256: {H1}\n")
    with pytest.raises(ConfigError) as err:
        read_keys(str(tmp_path), explicit=True, environ={})
    lines = str(err.value).splitlines()
    assert lines == [f"{b}: key 'chat': id also defined in {tmp_path}/a.yaml; ids are unique: rename or remove one",
                     f"{b}: key 'other': same secret as key 'chat' in {tmp_path}/a.yaml; give each key its own secret"]


def test_a_file_others_can_read_is_a_warning(tmp_path):
    path = write(tmp_path, "open.yaml", f"id: chat\nsha256: {H1}\n", mode=0o644)
    keys, warnings = read_keys(str(tmp_path), explicit=True, environ={})
    assert [k.id for k in keys] == ["chat"]
    (warning,) = [str(w) for w in warnings]
    assert warning.startswith(f"{path}: key 'chat': the file is readable by every user (mode 0644)")


def test_missing_directory_is_an_error_only_when_named(tmp_path):
    assert read_keys(str(tmp_path / "nowhere"), explicit=False, environ={}) == ([], [])
    with pytest.raises(ConfigError, match="keys_dir is not a directory"):
        read_keys(str(tmp_path / "nowhere"), explicit=True, environ={})


def test_keys_from_systemd_credentials(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds, "llmux-keys", f"id: from-cred\nsha256: {H1}\n")
    write(creds, "llmux-keys.extra", f"id: extra\nsha256: {H2}\n")
    write(creds, "s3-secret-key", "not a key file")
    keys, _ = read_keys(str(tmp_path / "nowhere"), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert [k.id for k in keys] == ["from-cred", "extra"]


# -- lookup ---------------------------------------------------------------------

def test_lookup_says_missing_invalid_or_expired_and_nothing_else():
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    store = KeyStore([ApiKey("live", H1), ApiKey("old", H2, expires=past)])
    assert store.configured and store.lookup(S1).id == "live"
    reasons = {}
    for secret in (None, "", S1 + "x", "live", H1, S2):
        with pytest.raises(InvalidApiKey) as err:
            store.lookup(secret)
        reasons[secret] = err.value.reason
    assert reasons == {None: MISSING, "": MISSING, S1 + "x": INVALID, "live": INVALID, H1: INVALID, S2: EXPIRED}
    messages = {InvalidApiKey(r).message for r in (MISSING, INVALID, EXPIRED)}
    assert len(messages) == 3 and not any("live" in m or "old" in m for m in messages)


def test_replace_revokes_at_once_and_an_empty_store_is_not_configured():
    store = KeyStore([ApiKey("a", H1)])
    store.replace([ApiKey("b", H2)])
    with pytest.raises(InvalidApiKey):
        store.lookup(S1)
    assert store.lookup(S2).id == "b"
    store.replace([])
    assert not store.configured


def test_generated_secrets_are_distinct_and_hash_to_64_hex():
    secrets = {generate_secret() for _ in range(100)}
    assert len(secrets) == 100 and all(s.startswith("sk-llmux-") and len(s) > 40 for s in secrets)
    assert all(len(hash_secret(s)) == 64 for s in secrets)


@pytest.mark.parametrize("models,allowed", [
    (("*",), {"llama-8b", "qwen-7b", "x", "llama-70b"}),
    (("llama-*",), {"llama-8b", "llama-70b"}),
    (("qwen-7b", "x"), {"qwen-7b", "x"}),
    (("llama-?b",), {"llama-8b"}),
])
def test_model_globs(models, allowed):
    key = ApiKey("k", H1, models=models)
    assert set(key.allowed(["llama-8b", "qwen-7b", "x", "llama-70b"])) == allowed


# -- limits -----------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_exactly_burst_pass_then_retry_after_is_when_the_next_one_passes():
    clock = Clock()
    limits = KeyLimits(clock=clock)
    key = ApiKey("k", H1, rate=0.5, burst=3)
    tickets = [limits.admit(key) for _ in range(3)]
    with pytest.raises(KeyLimited) as err:
        limits.admit(key)
    limited = err.value
    assert (limited.http_status, limited.dimension, limited.limit, limited.remaining) == (429, "requests", 3, 0)
    assert limited.retry_after == pytest.approx(2.0)
    clock.now += limited.retry_after * 0.99
    with pytest.raises(KeyLimited):
        limits.admit(key)
    clock.now += limited.retry_after * 0.02
    tickets.append(limits.admit(key))
    for t in tickets:
        t.release()
    assert limits.usage("k").in_flight == 0 and limits.usage("k").requests == 4 and limits.usage("k").limited == 2


def test_in_flight_limit_frees_a_place_when_a_request_ends_even_after_revocation():
    limits = KeyLimits(clock=Clock())
    key = ApiKey("k", H1, max_in_flight=2)
    first, second = limits.admit(key), limits.admit(key)
    with pytest.raises(KeyLimited) as err:
        limits.admit(key)
    assert err.value.dimension == "in-flight" and err.value.retry_after == 1.0
    assert set(limits.snapshot([])) == {"k"}, "a revoked key in flight is still shown"
    first.release()
    first.release()  # twice is once
    assert limits.usage("k").in_flight == 1
    third = limits.admit(key)
    second.release()
    third.release()
    assert limits.snapshot([]) == {}, "a revoked key is forgotten once idle"
