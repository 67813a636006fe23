"""A real systemd 252 for tests: boot it, run commands inside, read its journal, tear it down.

Wraps `up.sh`, `exec.sh` and `down.sh` beside this file. Each instance has its
own state dir (/tmp/llmux-sysd.XXXXXX) and cgroup, so several test runs (or
helpers) can boot their own at the same time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
UP = HERE / "up.sh"
EXEC = HERE / "exec.sh"
DOWN = HERE / "down.sh"
REQUIRED_BINARIES = ("unshare", "nsenter", "busctl", "journalctl", "dbus-daemon")


def unavailable_reason() -> str | None:
    """Why the test systemd cannot boot here, or None when it can."""
    if os.geteuid() != 0:
        return "the real-systemd test bed needs root (it boots systemd in its own namespaces)"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed (apt install systemd)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt install systemd dbus util-linux)"
    return None


@dataclass
class TestSystemd:
    """One booted test systemd; `env` holds what up.sh printed."""

    __test__ = False  # not a test class, despite the name

    state_dir: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def boot(cls, timeout: float = 120.0) -> "TestSystemd":
        state_dir = tempfile.mkdtemp(prefix="llmux-sysd.")
        env = {**os.environ, "SYSD_TEST_DIR": state_dir, "SYSD_TEST_CG": f"llmux-sysd-{os.getpid()}-{Path(state_dir).name[11:]}"}
        result = subprocess.run([str(UP)], env=env, capture_output=True, text=True, timeout=timeout)
        bed = cls(state_dir)
        if result.returncode != 0:
            bed.down()
            raise RuntimeError(f"tests/sysd/up.sh failed ({result.returncode}): {result.stderr.strip()}")
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.isupper():
                bed.env[key] = value
        return bed

    @property
    def bus_address(self) -> str:
        return self.env["DBUS_SYSTEM_BUS_ADDRESS"]

    @property
    def journal_dir(self) -> str:
        return self.env["SYSD_TEST_JOURNAL_DIR"]

    @property
    def pid(self) -> int:
        return int(self.env["SYSD_TEST_PID"])

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run argv inside the namespaces (systemctl, journalctl, kill with unit PIDs ...)."""
        env = {**os.environ, "SYSD_TEST_DIR": self.state_dir}
        return subprocess.run([str(EXEC), *argv], env=env, capture_output=True, text=True, check=check, timeout=timeout)

    def journal(self, *matches: str) -> str:
        """Message lines of the journal entries matching e.g. 'LLMUX_MODEL=tiny' (read from the host)."""
        result = subprocess.run(
            ["journalctl", "--directory", self.journal_dir, "--no-pager", "-o", "cat", *matches],
            capture_output=True, text=True, timeout=60,
        )
        return result.stdout

    def unit_property(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def down(self) -> None:
        env = {**os.environ, "SYSD_TEST_DIR": self.state_dir}
        subprocess.run([str(DOWN)], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(self.state_dir, ignore_errors=True)
