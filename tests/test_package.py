"""The .deb, end to end: build it, install it with apt on this Debian 12 machine,
boot the test systemd with the installed units and bus policy, run the service
scenarios of tests/test_service.py against it, then purge it.

What differs from test_service.py is only where things come from: the units,
bus policy and tmpfiles/sysusers snippets are the installed ones, ExecStart is
the packaged /usr/bin/llmuxd with /etc/llmux/llmux.yaml as shipped (models are
added in /etc/llmux/models.d/), backends are the packaged llmux-vllm-sim
running as the llmux user, state lives in /var/lib/llmux. A drop-in moves
llmux.socket off port 3000 and shortens the watchdog for the watchdog scenario.

The test systemd shares /etc, /usr and /var with this machine, so `apt
install` here is what it sees; units are linked into its private /run
(`systemctl enable --runtime`: nothing is written to the host's /etc).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sysd.helpers import free_port
from sysd.testbed import TestSystemd, unavailable_reason
from test_service import (  # noqa: F401 - the scenarios, collected here in this order
    ROOT,
    ServiceBed,
    install_units,
    test_enable_now_reaches_ready,
    test_request_through_the_socket_is_answered_by_the_simulator,
    test_second_model_switches_and_the_journal_tells,
    test_pin_refuses_the_other_model_with_503,
    test_reload_adds_a_model,
    test_reload_with_a_broken_config_fails_and_keeps_serving,
    test_reload_removes_a_model_and_stops_its_unit,
    test_restart_keeps_backends_and_serves_without_cold_start,
    test_runtime_overrides_survive_a_restart,
    test_corrupt_state_file_is_ignored_with_a_warning,
    test_missing_state_directory_is_created,
    test_foreign_unit_with_our_name_is_never_touched,
    test_sigkill_mid_switch_then_start_is_consistent,
    test_watchdog_restarts_a_wedged_daemon,
    test_stop_leaves_backends_running,
    test_bus_activation_starts_the_one_llmuxd,
    test_unreadable_config_at_boot_names_file_and_key,
    write_dropins,
)

pytestmark = [pytest.mark.systemd, pytest.mark.package, pytest.mark.slow]

PACKAGE = "llmux"
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def package_installed() -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True, text=True)
    return "install ok installed" in result.stdout or "config-files" in result.stdout


def apt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "-y", "-q", *args], capture_output=True, text=True, env=APT_ENV,
                          timeout=600)


def purge() -> subprocess.CompletedProcess:
    return apt("purge", PACKAGE)


def why_not() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    for tool in ("dpkg-buildpackage", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (a Debian machine with dpkg-dev is needed)"
    return None


@pytest.fixture(scope="module")
def built_deb():
    """packaging/build-deb from this checkout, into a temporary directory."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    out = Path(tempfile.mkdtemp(prefix="llmux-deb."))
    result = subprocess.run([str(ROOT / "packaging" / "build-deb"), str(out)], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "DEB_BUILD_OPTIONS": "nocheck"})
    assert result.returncode == 0, result.stdout + result.stderr
    [deb] = out.glob("llmux_*_all.deb")
    yield deb
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def svc(built_deb):
    if package_installed():  # left over from an interrupted run
        purge()
    result = apt("install", str(built_deb))
    assert result.returncode == 0, result.stdout + result.stderr
    bed = TestSystemd.boot()
    try:
        service = ServiceBed(bed, free_port(), "/etc/llmux/llmux.yaml", "/var/lib/llmux", None,
                             ["/usr/bin/llmux-vllm-sim", "serve"])
        install_units(service, Path("/lib/systemd/system"))
        write_dropins(service, [])
        bed.run("systemctl", "reload", "dbus.service", check=False)  # the installed bus policy
        bed.run("systemctl", "daemon-reload")
        yield service
    finally:
        bed.run("systemctl", "stop", "llmuxd.service", "llmux.socket", check=False)
        bed.run("systemctl", "stop", "llmux-model-*.service", check=False)
        bed.down()
        for model in ("alpha", "beta", "gamma", "alpha2"):
            Path(f"/etc/llmux/models.d/{model}.yaml").unlink(missing_ok=True)
        if package_installed():
            purge()


def test_package_installs_units_policy_user_and_simulator(svc):
    files = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=True).stdout.split()
    for path in ["/lib/systemd/system/llmuxd.service", "/lib/systemd/system/llmux.socket",
                 "/lib/systemd/system/llmux.slice", "/usr/share/dbus-1/system.d/io.llmux.LLMux1.conf",
                 "/usr/share/dbus-1/system-services/io.llmux.LLMux1.service",
                 "/usr/share/polkit-1/actions/io.llmux.LLMux1.policy",
                 "/usr/share/dbus-1/interfaces/io.llmux.LLMux1.Manager.xml",
                 "/usr/lib/sysusers.d/llmux.conf", "/usr/lib/tmpfiles.d/llmux.conf",
                 "/etc/llmux/llmux.yaml", "/etc/llmux/models.d",
                 "/usr/bin/llmuxd", "/usr/bin/llmux-vllm-sim", "/usr/bin/llmuxctl"]:
        assert path in files, path
    for asset in ("index.html", "console.js", "console.css"):  # the console's page, shipped in the package
        assert f"/usr/lib/python3/dist-packages/llmuxd/http/console/static/{asset}" in files, asset
    conffiles = Path(f"/var/lib/dpkg/info/{PACKAGE}.conffiles").read_text().split()
    assert "/etc/llmux/llmux.yaml" in conffiles
    assert subprocess.run(["getent", "passwd", "llmux"], capture_output=True).returncode == 0
    state = Path("/var/lib/llmux")
    assert state.is_dir() and state.owner() == "llmux" and oct(state.stat().st_mode & 0o777) == "0o750"


def test_backends_run_as_the_llmux_user(svc):
    assert svc.request("alpha")[0] == 200
    assert svc.prop("llmux-model-alpha.service", "User") == "llmux"


def test_purge_removes_what_it_installed(svc):
    files = [Path(p) for p in subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True,
                                             check=True).stdout.split()]
    svc.systemctl("stop", "llmuxd.service", "llmux.socket")
    svc.systemctl("stop", "llmux-model-*.service")
    for model in ("alpha", "beta", "gamma", "alpha2"):
        svc.remove_model(model)
    result = purge()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not package_installed()
    left = [p for p in files if p.exists() and not p.is_dir()]
    assert left == [], left
    for path in ["/etc/llmux", "/var/lib/llmux", "/usr/lib/python3/dist-packages/llmuxd",
                 "/etc/systemd/system/multi-user.target.wants/llmuxd.service",
                 "/etc/systemd/system/sockets.target.wants/llmux.socket",
                 "/etc/systemd/system/dbus-io.llmux.LLMux1.service"]:
        assert not Path(path).exists(), path
