"""`llmuxctl keys add | list | revoke` on key files (no daemon: the files are the interface).

The secret is the only thing on stdout and is in no file; files are written
whole with mode 0640; a key in a shared file is revoked without touching the others.
"""

from __future__ import annotations

import grp
import json
import os
import stat

import pytest

from llmuxd import ctl
from llmuxd.keys import KeyStore, hash_secret, read_keys
from llmuxd.keys.admin import KEYS_GROUP


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_add_prints_the_secret_alone_and_stores_only_its_hash(tmp_path, capsys):
    keys_dir = tmp_path / "keys.d"
    status, out, err = run(capsys, "keys", "--dir", str(keys_dir), "add", "chat", "--models", "llama-*", "qwen",
                           "--rate", "120/m", "--burst", "4", "--max-in-flight", "3", "--priority", "batch",
                           "--expires", "2031-02-03", "--control")
    assert status == 0, err
    secret = out.rstrip("\n")
    assert out == secret + "\n" and secret.startswith("sk-llmux-") and secret not in err
    path = keys_dir / "chat.yaml"
    text = path.read_text()
    assert secret not in text and hash_secret(secret) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and stat.S_IMODE(keys_dir.stat().st_mode) == 0o750
    try:
        group = grp.getgrnam(KEYS_GROUP)
    except KeyError:
        assert f"group '{KEYS_GROUP}' does not exist here" in err
    else:
        assert path.stat().st_gid == group.gr_gid or os.geteuid() != 0
    (key,), _ = read_keys(str(keys_dir), explicit=True, environ={})
    assert KeyStore([key]).lookup(secret) == key
    assert (key.models, key.rate, key.burst, key.max_in_flight, key.priority.value, key.control) == \
        (("llama-*", "qwen"), 2.0, 4, 3, "batch", True)
    assert [p.name for p in keys_dir.iterdir()] == ["chat.yaml"], "no temporary file left behind"


@pytest.mark.parametrize("argv,words", [
    (["add", "chat"], "key 'chat' exists already"),
    (["add", "bad name"], "is not a valid key name"),
    (["add", "x", "--rate", "fast"], "'fast' is not a rate"),
    (["add", "x", "--burst", "3"], "burst needs a rate"),
    (["add", "x", "--expires", "soon"], "'soon' is not a date"),
    (["revoke", "nobody"], "no key 'nobody'"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, argv, words):
    keys_dir = tmp_path / "keys.d"
    assert run(capsys, "keys", "--dir", str(keys_dir), "add", "chat")[0] == 0
    before = sorted(p.name for p in keys_dir.iterdir())
    status, out, err = run(capsys, "keys", "--dir", str(keys_dir), *argv)
    assert status != 0 and out == ""
    assert err.count("\n") == 1 and words in err, err
    assert sorted(p.name for p in keys_dir.iterdir()) == before


def test_revoke_from_a_shared_file_keeps_the_other_keys(tmp_path, capsys):
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    shared = keys_dir / "team.yaml"
    shared.write_text(f"keys:\n  - id: a\n    sha256: {hash_secret('sa')}\n  - id: b\n    sha256: {hash_secret('sb')}\n"
                      "    models: [x]\n")
    status, _, err = run(capsys, "keys", "--dir", str(keys_dir), "revoke", "a")
    assert status == 0 and "reload" in err
    (left,), _ = read_keys(str(keys_dir), explicit=True, environ={})
    assert (left.id, left.models) == ("b", ("x",))
    assert run(capsys, "keys", "--dir", str(keys_dir), "revoke", "b")[0] == 0
    assert not shared.exists()


def test_list_shows_keys_without_secrets(tmp_path, capsys):
    keys_dir = tmp_path / "keys.d"
    _, secret, _ = run(capsys, "keys", "--dir", str(keys_dir), "add", "chat", "--rate", "5")
    status, out, err = run(capsys, "--user", "--json", "keys", "--dir", str(keys_dir), "list")
    assert status == 0, err
    (row,) = json.loads(out)
    assert (row["id"], row["limits"], row["models"]) == ("chat", "5/s burst 5", ["*"])
    text = run(capsys, "--user", "keys", "--dir", str(keys_dir), "list")[1]
    assert text.splitlines()[0].split()[:3] == ["KEY", "MODELS", "LIMITS"] and "chat" in text
    assert secret.strip() not in out + text and hash_secret(secret.strip()) not in out + text
