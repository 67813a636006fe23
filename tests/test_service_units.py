"""The shipped unit files and packaging say what the service contract needs
(no systemd needed: these read the files, and ask systemd-analyze where it
is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
DEBIAN = ROOT / "packaging" / "debian"
#: `systemd-analyze security` exposure (0 best .. 10 worst); 4.6 when written
MAX_EXPOSURE = 5.0


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)], keeping repeated keys in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{name}: {line!r} outside a section"
        current.append((key.strip(), value.strip()))
    return sections


def values(sections, section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


@pytest.mark.parametrize(
    "name, section, key, expected",
    [
        ("llmuxd.service", "Service", "Type", "notify"),
        ("llmuxd.service", "Service", "NotifyAccess", "main"),
        ("llmuxd.service", "Service", "Restart", "on-failure"),
        ("llmuxd.service", "Service", "RestartPreventExitStatus", "78"),
        ("llmuxd.service", "Service", "Sockets", "llmux.socket"),
        ("llmuxd.service", "Install", "Alias", "dbus-io.llmux.LLMux1.service"),
        ("llmuxd.service", "Install", "WantedBy", "multi-user.target"),
        ("llmux.socket", "Socket", "ListenStream", "127.0.0.1:3000"),
        ("llmux.socket", "Socket", "FileDescriptorName", "http"),
        ("llmux.socket", "Socket", "Service", "llmuxd.service"),
        ("llmux.socket", "Install", "WantedBy", "sockets.target"),
    ],
)
def test_unit_settings(name, section, key, expected):
    assert values(unit(name), section, key) == [expected]


def test_reload_is_a_synchronous_bus_call():
    [reload] = values(unit("llmuxd.service"), "Service", "ExecReload")
    assert re.fullmatch(r"/usr/bin/busctl --system --timeout=\d+ call io\.llmux\.LLMux1 /io/llmux/LLMux1 "
                        r"io\.llmux\.LLMux1\.Manager Reload", reload), reload


def test_watchdog_is_set():
    [watchdog] = values(unit("llmuxd.service"), "Service", "WatchdogSec")
    assert re.fullmatch(r"\d+s", watchdog)


def test_bus_activation_goes_through_the_alias():
    activation = (ROOT / "dbus" / "io.llmux.LLMux1.service")
    if not activation.exists():
        pytest.skip("dbus/ not shipped yet")
    assert "SystemdService=dbus-io.llmux.LLMux1.service" in activation.read_text().splitlines()


def test_sysusers_and_tmpfiles_agree_on_the_state_directory():
    assert (SYSTEMD / "llmux.sysusers").read_text().splitlines()[-1].split() == \
        ["u", "llmux", "-", '"llmux', "model", 'backends"', "/var/lib/llmux"]
    assert "d /var/lib/llmux 0750 llmux llmux -" in (SYSTEMD / "llmux.tmpfiles").read_text().splitlines()


@pytest.mark.parametrize("link", sorted(p.name for p in DEBIAN.iterdir() if p.is_symlink()))
def test_packaging_links_resolve(link):
    assert (DEBIAN / link).resolve().exists(), f"packaging/debian/{link} points nowhere"


def test_package_depends_on_the_runtime_stack():
    control = (DEBIAN / "control").read_text()
    binary = control.split("\nPackage: llmux\n", 1)[1]
    for dep in ["python3-aiohttp", "python3-dbus-fast", "python3-pydantic", "python3-yaml",
                "python3-prometheus-client", "dbus-system-bus", "systemd"]:
        assert dep in binary, dep
    assert "Architecture: all" in binary


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_hardening_exposure():
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(SYSTEMD / "llmuxd.service")],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for llmuxd\.service: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate unit files offline: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout[-3000:]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path):
    # verify resolves ExecStart=; point it at a stand-in for the packaged binary
    for name in ("llmuxd.service", "llmux.socket", "llmux.slice"):
        text = (SYSTEMD / name).read_text().replace("/usr/bin/llmuxd", "/bin/true")
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in
                             ("llmuxd.service", "llmux.socket", "llmux.slice"))],
                            capture_output=True, text=True, timeout=120)
    problems = [line for line in result.stderr.splitlines()
                if "llmux" in line and "non-existent unit multi-user.target" not in line]
    assert problems == [], result.stderr
