"""systemd's own exit statuses said for people, and the working-directory
check made as the backend's user (llmuxd/runtime/unit_setup.py). The real
thing, under the test systemd: tests/test_service_backend_user.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from llmuxd.runtime.unit_setup import SETUP_STEPS, explain_setup_failure, user_can_enter

UNIT = "llmux-model-alpha.service"


def explain(code, user="llmux", directory="/var/lib/llmux", command="/opt/venv/bin/vllm"):
    return explain_setup_failure(code, unit=UNIT, user=user, group=None, directory=directory, command=command)


EXPLAINED = [  # (code, what the sentence must contain)
    (200, ["200/CHDIR", "/var/lib/llmux", "'llmux'", "chown llmux: /var/lib/llmux"]),
    (203, ["203/EXEC", "/opt/venv/bin/vllm", "'llmux'", "model's command"]),
    (209, ["209/STDOUT", "systemd-journald"]),
    (217, ["217/USER", "'llmux'", "does not exist", "useradd --system llmux", "set `user:`"]),
    (219, ["219/CGROUP", "llmux.slice"]),
    (228, ["228/SECCOMP", f"journalctl -u {UNIT}"]),
]


@pytest.mark.parametrize("code,says", EXPLAINED, ids=[str(c) for c, _ in EXPLAINED])
def test_systemd_exit_status_names_cause_and_fix(code, says):
    text = explain(code)
    assert text is not None and all(s in text for s in says), text


@pytest.mark.parametrize("code", [None, 0, 1, 2, 127, 199, 234, 246, 255])
def test_a_backend_s_own_exit_status_is_not_explained(code):
    assert explain(code) is None


def test_every_step_reads_whole():
    for code, step in SETUP_STEPS.items():
        text = explain(code)
        assert text.startswith(f"systemd exit status {code}/{step.name}: ")
        assert "{" not in text and "}" not in text, text


def test_root_and_no_directory_read_plainly():
    assert "'root'" in explain(203, user=None)
    assert "directory / as" in explain(200, directory=None)


@pytest.fixture
def tree():
    """/tmp/X/inner: every parent searchable by all (pytest's tmp_path is not)."""
    top = Path(tempfile.mkdtemp(prefix="llmux-access."))
    inner = top / "inner"
    inner.mkdir()
    yield top, inner
    shutil.rmtree(top)


ACCESS = [  # (mode of top, mode of inner, can nobody enter inner)
    (0o755, 0o755, True),
    (0o711, 0o701, True),
    (0o700, 0o755, False),  # a parent it cannot search
    (0o755, 0o750, False),  # owner and group only: nobody is neither
    (0o755, 0o754, False),  # read but not search
]


@pytest.mark.parametrize("top_mode,inner_mode,allowed", ACCESS, ids=[f"{a:o}/{b:o}" for a, b, _ in ACCESS])
def test_user_can_enter_follows_the_mode_bits_of_every_directory(tree, top_mode, inner_mode, allowed):
    top, inner = tree
    top.chmod(top_mode)
    inner.chmod(inner_mode)
    assert user_can_enter(str(inner), "nobody") is allowed
    assert user_can_enter(str(inner), "65534") is allowed  # by uid, as User= also takes it


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's owner needs root")
def test_user_can_enter_as_owner_or_group(tree):
    top, inner = tree
    top.chmod(0o755)
    inner.chmod(0o750)
    os.chown(inner, 65534, 0)
    assert user_can_enter(str(inner), "nobody") is True  # its owner
    os.chown(inner, 0, 65534)
    assert user_can_enter(str(inner), "nobody") is True  # its group (nogroup)


def test_user_can_enter_unknowns(tree):
    _, inner = tree
    inner.chmod(0o700)
    assert user_can_enter(str(inner), None) is True  # root
    assert user_can_enter(str(inner), "llmux-test-no-such-user") is None
    assert user_can_enter(str(inner / "missing"), "nobody") is False
