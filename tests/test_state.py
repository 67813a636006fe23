"""state.json: round trip, atomic writes, and the bad cases a restart can meet."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from llmuxd.daemon.state import DaemonState, StateStore


def sample_state() -> DaemonState:
    return DaemonState(
        mode="manual",
        pinned="qwen",
        evictions={"llama": "discard+stop", "qwen": "offload+freeze"},
        switch_costs={"llama→qwen": 4.5, "qwen→llama": 7.25},
        quarantine={"mistral": {"reason": "criu restore failed", "since": 1764439000}},
    )


def test_round_trip(tmp_path):
    store = StateStore(tmp_path)
    assert store.save(sample_state())
    assert StateStore(tmp_path).load() == sample_state()


def test_file_is_readable_json_for_people(tmp_path):
    StateStore(tmp_path).save(sample_state())
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["version"] == 1
    assert data["evictions"] == {"llama": "discard+stop", "qwen": "offload+freeze"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_missing_file_gives_defaults(tmp_path):
    assert StateStore(tmp_path).load() == DaemonState()


def test_missing_directory_is_created(tmp_path):
    store = StateStore(tmp_path / "var" / "lib" / "llmux")
    assert store.ensure_directory()
    assert (tmp_path / "var" / "lib" / "llmux").is_dir()
    assert oct((tmp_path / "var" / "lib" / "llmux").stat().st_mode & 0o777) == "0o750"
    assert store.save(DaemonState(mode="manual"))


def test_save_creates_a_missing_directory_too(tmp_path):
    store = StateStore(tmp_path / "gone")
    assert store.save(sample_state())
    assert store.load() == sample_state()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b'"just a string"'],
    ids=["syntax", "empty", "list", "binary", "string"],
)
def test_corrupt_file_is_ignored_with_a_warning_and_kept_aside(tmp_path, caplog, content):
    (tmp_path / "state.json").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert StateStore(tmp_path).load() == DaemonState()
    assert "ignoring corrupt" in caplog.text and "state.json" in caplog.text
    assert not (tmp_path / "state.json").exists()
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert aside.read_bytes() == content


def test_bad_entries_are_dropped_the_rest_is_kept(tmp_path, caplog):
    (tmp_path / "state.json").write_text(json.dumps({
        "version": 1,
        "mode": "sideways",
        "pinned": 42,
        "evictions": {"a": "offload+keep_running", "b": "shred+everything", "c": 2},
        "switch_costs": {"a→b": 3, "b→a": "slow", "c→a": -1},
        "quarantine": {"x": {"reason": "r"}, "y": "bad"},
    }))
    with caplog.at_level(logging.WARNING):
        state = StateStore(tmp_path).load()
    assert state == DaemonState(
        mode="auto",
        pinned=None,
        evictions={"a": "offload+keep_running", "c": "discard+keep_running"},
        switch_costs={"a→b": 3.0},
        quarantine={"x": {"reason": "r"}},
    )
    for text in ["mode 'sideways'", "evictions.b", "switch_costs.b→a", "switch_costs.c→a",
                 "quarantine.y", "pinned 42"]:
        assert text in caplog.text


def test_disk_full_is_logged_and_keeps_the_old_file(tmp_path, caplog, monkeypatch):
    store = StateStore(tmp_path)
    store.save(DaemonState(mode="auto"))
    real_write = os.write

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with caplog.at_level(logging.ERROR):
        assert store.save(sample_state()) is False
    monkeypatch.setattr(os, "write", real_write)
    assert "cannot save" in caplog.text and "No space left on device" in caplog.text
    assert StateStore(tmp_path).load() == DaemonState(mode="auto")
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # temp file removed
    assert store.save(sample_state())  # and the next save, with space, works


def test_unchanged_state_is_not_rewritten(tmp_path):
    store = StateStore(tmp_path)
    store.save(sample_state())
    os.utime(tmp_path / "state.json", ns=(0, 0))
    assert store.save(sample_state())
    assert (tmp_path / "state.json").stat().st_mtime_ns == 0
