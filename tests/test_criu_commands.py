"""CRIU command lines, log reading, GPU probes: the parts that need no CRIU."""

from __future__ import annotations

import json


from llmuxd.checkpoint.criu import (
    Criu,
    ExternalSocket,
    dump_argv,
    log_errors,
    pid_taken_error,
    restore_argv,
)
from llmuxd.checkpoint.gpu_probe import LedgerProbe, NullProbe


def test_dump_declares_journal_sockets_external_and_passes_vllm_flags():
    argv = dump_argv("/usr/local/sbin/criu", 42, "/img", "/img/../dump.log",
                     externals=[ExternalSocket(1234, 1)], freeze_cgroup="/sys/fs/cgroup/llmux.slice/u.service",
                     libdir="/usr/lib/criu")
    assert argv[:4] == ["/usr/local/sbin/criu", "dump", "--tree", "42"]
    for flag in ("--tcp-established", "--ext-unix-sk", "--link-remap", "--file-locks"):
        assert flag in argv
    assert argv[argv.index("--external") + 1] == "unix[1234]"
    assert argv[argv.index("--freeze-cgroup") + 1] == "/sys/fs/cgroup/llmux.slice/u.service"
    assert argv[argv.index("--libdir") + 1] == "/usr/lib/criu"


def test_restore_runs_detached_inherits_the_new_journal_stream_and_ignores_cgroups():
    argv = restore_argv("criu", "/img", "/r.log", "/run/p.pid", externals=[ExternalSocket(1234, 1)])
    assert "--restore-detached" in argv and "--manage-cgroups=ignore" in argv
    assert argv[argv.index("--pidfile") + 1] == "/run/p.pid"
    assert argv[argv.index("--inherit-fd") + 1] == "fd[1]:socket:[1234]"
    assert "--link-remap" not in argv and "--libdir" not in argv


def test_log_errors_gives_the_last_error_lines(tmp_path):
    log = tmp_path / "restore.log"
    log.write_text("(00.1) info\n(00.2) Error (criu/cr-restore.c:1): Can't fork for 4242: File exists\n")
    assert log_errors(log) == "Can't fork for 4242: File exists"
    assert pid_taken_error(log_errors(log))
    assert not pid_taken_error("Error (criu/files.c:1): Can't open file")
    assert log_errors(tmp_path / "none.log").startswith("no log at")


async def test_missing_criu_is_reported_with_the_fix():
    reason = await Criu("/nonexistent/criu").check()
    assert "cannot run '/nonexistent/criu'" in reason and "install CRIU >= 4.2" in reason


async def test_std_sockets_of_this_process_reads_proc(tmp_path):
    import os
    import socket

    a, b = socket.socketpair()
    saved = os.dup(2)
    try:
        os.dup2(a.fileno(), 2)
        found = await Criu("criu").std_sockets([os.getpid()])
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        a.close()
        b.close()
    assert [(s.fd) for s in found] == [2]
    assert found[0].inode > 0


async def test_ledger_probe_sums_the_reservations_of_the_given_pids(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"capacity_mb": 80000, "reservations": {
        "10": {"mb": 3000, "ns": "pid:[other]"}, "11": {"mb": 500, "ns": "pid:[other]"},
        "12": {"mb": 7000, "ns": "pid:[other]"}}}))
    assert await LedgerProbe(str(path)).usage_mb([10, 11]) == 3500


async def test_null_probe_cannot_tell():
    assert await NullProbe().usage_mb([1]) is None
