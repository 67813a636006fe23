"""CRIU: dump a backend unit's process tree to disk, restore it as a new unit.

What works on these machines (CRIU 4.2; shared testbed, sysd-test-checks.sh):
- dump: the unit's stdout/stderr is a journald stream socket CRIU cannot dump,
  so it is declared external (`--external unix[<inode>]`); the cgroup is frozen
  for a consistent tree (`--freeze-cgroup`); vLLM needs `--tcp-established`
  (its listener and torch-distributed store), `--ext-unix-sk`, `--link-remap`
  (deleted-but-open files) and `--file-locks`; the CUDA plugin is loaded from
  `--libdir` when configured. The dumped tree is killed, the unit ends.
- restore: `criu restore -d` runs as the ExecStart of a *new* transient unit
  (Type=forking, PIDFile=), so the restored tree is again a unit with journald
  output and llmux's marker; `--manage-cgroups=ignore` leaves it in the new
  unit's cgroup; `--inherit-fd 'fd[1]:socket:[<inode>]'` plugs the new unit's
  journal stream in where the old one was. CRIU restores original PIDs, so the
  old main PID must be free.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llmuxd.checkpoint.command import run_tool

log = logging.getLogger("llmuxd.checkpoint.criu")

#: flags vLLM needs on dump (and those of them restore understands)
DUMP_FLAGS = ("--tcp-established", "--ext-unix-sk", "--link-remap", "--file-locks")
RESTORE_FLAGS = ("--tcp-established", "--ext-unix-sk", "--file-locks")
#: environment a backend that may be checkpointed gets: CRIU cannot dump io_uring
CRIU_SAFE_ENV = {"UV_USE_IO_URING": "0", "USE_LIBUV": "0"}
CHECK_TIMEOUT = 60.0
DUMP_TIMEOUT = 1800.0
_SOCKET_RE = re.compile(r"socket:\[(\d+)\]")


@dataclass(frozen=True)
class ExternalSocket:
    """A journald stream socket of the dumped tree: its inode and the std fd it was on."""

    inode: int
    fd: int


def network_lock() -> str | None:
    """CRIU locks TCP connections with iptables during dump/restore; without iptables
    (minimal hosts, containers) that fails ("Failed to lock TCP connection"), so the
    lock is skipped: the backend is drained and llmux closed its own connections."""
    return None if shutil.which("iptables-restore") else "skip"


def dump_argv(criu: str, pid: int, images: str, log_file: str, *, externals: Sequence[ExternalSocket] = (),
              freeze_cgroup: str | None = None, libdir: str | None = None, lock: str | None = None) -> list[str]:
    argv = [criu, "dump", "--tree", str(pid), "--images-dir", images, "--log-file", log_file, "-v4", *DUMP_FLAGS]
    if lock:
        argv.append(f"--network-lock={lock}")
    for ext in externals:
        argv += ["--external", f"unix[{ext.inode}]"]
    if freeze_cgroup:
        argv += ["--freeze-cgroup", freeze_cgroup]
    if libdir:
        argv += ["--libdir", libdir]
    return argv


def restore_argv(criu: str, images: str, log_file: str, pid_file: str, *,
                 externals: Sequence[ExternalSocket] = (), libdir: str | None = None,
                 lock: str | None = None) -> list[str]:
    argv = [criu, "restore", "--images-dir", images, "--log-file", log_file, "-v4", "--restore-detached",
            "--pidfile", pid_file, "--manage-cgroups=ignore", *RESTORE_FLAGS]
    if lock:
        argv.append(f"--network-lock={lock}")
    for ext in externals:
        argv += ["--inherit-fd", f"fd[{ext.fd}]:socket:[{ext.inode}]"]
    if libdir:
        argv += ["--libdir", libdir]
    return argv


def log_errors(log_file: str | Path, limit: int = 3) -> str:
    """The last `limit` 'Error' lines of a CRIU log, joined, for a one-line message."""
    try:
        lines = Path(log_file).read_text(errors="replace").splitlines()
    except OSError:
        return f"no log at {log_file}"
    errors = [line.split(": ", 1)[-1].strip() for line in lines if "Error" in line]
    return " | ".join(errors[-limit:]) or (lines[-1].strip() if lines else "empty log")


def pid_taken_error(log_text: str) -> bool:
    """Whether a restore failed because a PID it needs belongs to another process."""
    return bool(re.search(r"(File exists|EEXIST|Can't fork for \d+|PID .* is taken)", log_text))


class Criu:
    """The `criu` executable, run through `command_prefix` (nsenter into the PID
    namespace the backends live in; empty on a normal host)."""

    def __init__(self, path: str = "criu", *, command_prefix: Sequence[str] = (), libdir: str | None = None):
        self.path = path
        self.command_prefix = list(command_prefix)
        self.libdir = libdir if libdir and Path(libdir).is_dir() else None
        self.network_lock = network_lock()

    async def _run(self, argv: Sequence[str], timeout: float) -> tuple[int, str]:
        try:
            result = await run_tool([*self.command_prefix, *argv], timeout)
        except OSError as exc:
            return 127, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
        if result is None:
            return 124, f"{argv[0]} {argv[1] if len(argv) > 1 else ''} gave no answer within {timeout:.0f}s"
        return result

    async def check(self) -> str | None:
        """None when `criu check` passes here; otherwise why not, with the fix."""
        code, out = await self._run([self.path, "check"], CHECK_TIMEOUT)
        if code == 0:
            return None
        if code == 127:
            return f"{out}; install CRIU >= 4.2 or set checkpoint.criu_path"
        return f"'{self.path} check' failed: {out.splitlines()[-1] if out else code}; CRIU >= 4.2 and root are needed"

    async def version(self) -> str | None:
        code, out = await self._run([self.path, "--version"], CHECK_TIMEOUT)
        return out.splitlines()[0].strip() if code == 0 and out else None

    async def std_sockets(self, pids: Sequence[int]) -> list[ExternalSocket]:
        """The socket inodes on fds 0-2 of `pids` (journald streams): they must be
        declared external on dump and inherited on restore."""
        paths = [f"/proc/{pid}/fd/{fd}" for pid in pids for fd in (0, 1, 2)]
        if not paths:
            return []
        # one readlink per path, so a missing fd does not hide the others
        script = 'for p in "$@"; do printf "%s %s\\n" "$p" "$(readlink "$p" 2>/dev/null)"; done'
        code, out = await self._run(["sh", "-c", script, "sh", *paths], CHECK_TIMEOUT)
        fds: dict[int, set[int]] = {}
        for line in out.splitlines():
            path, _, target = line.partition(" ")
            match = _SOCKET_RE.search(target)
            if match:
                fds.setdefault(int(match.group(1)), set()).add(int(path.rsplit("/", 1)[1]))
        # one socket on stdout and stderr is inherited once: on stdout (the restore
        # unit's fd 1 is its own journal stream), else on whichever std fd held it
        return [ExternalSocket(inode, 1 if 1 in seen else min(seen)) for inode, seen in sorted(fds.items())]

    async def pid_in_use(self, pid: int) -> bool:
        code, _ = await self._run(["test", "-e", f"/proc/{pid}"], CHECK_TIMEOUT)
        return code == 0

    async def dump(self, pid: int, images: str, log_file: str, *, externals: Sequence[ExternalSocket] = (),
                   freeze_cgroup: str | None = None, timeout: float = DUMP_TIMEOUT) -> tuple[bool, str]:
        """Dump the tree of `pid`; (ok, one-line reason)."""
        argv = dump_argv(self.path, pid, images, log_file, externals=externals, freeze_cgroup=freeze_cgroup,
                         libdir=self.libdir, lock=self.network_lock)
        Path(log_file).unlink(missing_ok=True)  # an old log would explain the wrong failure
        log.info("criu dump: %s", " ".join(argv))
        code, out = await self._run(argv, timeout)
        if code == 0:
            return True, ""
        return False, f"criu dump exited {code}: {log_errors(log_file) if Path(log_file).exists() else out[-300:]}"
