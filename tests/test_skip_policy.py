"""No silent skips (tests/skip_policy.py), shown on a real pytest run of a
small test file: as root or under CI a skipped integration test fails with its
reason; as an ordinary user it stays a skip; the skips are counted per marker.

The ordinary-user runs use the real thing: pytest as `nobody` (setpriv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
NOBODY = 65534

SAMPLE = '''
import pytest

@pytest.mark.systemd
def test_systemd_skip_in_the_body():
    pytest.skip("the test systemd cannot boot here")

@pytest.mark.systemd
@pytest.mark.criu
def test_criu_skip():
    pytest.skip("criu check fails")

@pytest.mark.polkit
@pytest.mark.skip(reason="polkitd is not installed")
def test_polkit_skip_marker():
    pass

@pytest.fixture
def deb():
    pytest.skip("dpkg-buildpackage is missing")

@pytest.mark.package
def test_package_skip_in_a_fixture(deb):
    pass

@pytest.mark.real_vllm
@pytest.mark.skipif(True, reason="no real vLLM cache")
def test_real_vllm_skipif():
    pass

@pytest.mark.s3
def test_s3_skip():
    pytest.skip("moto_server is missing")

@pytest.mark.fleet
def test_fleet_skip():
    pytest.skip("no LiteLLM venv")

@pytest.mark.browser
def test_browser_skip():
    pytest.skip("chromium is missing")

def test_unmarked_skip():
    pytest.skip("an ordinary skip")

@pytest.mark.systemd
@pytest.mark.xfail(reason="a known bug")
def test_xfail_is_not_a_skip():
    assert False

@pytest.mark.systemd
def test_that_runs():
    pass
'''

MARKED_SKIPS = {
    "test_systemd_skip_in_the_body": "the test systemd cannot boot here",
    "test_criu_skip": "criu check fails",
    "test_polkit_skip_marker": "polkitd is not installed",
    "test_package_skip_in_a_fixture": "dpkg-buildpackage is missing",
    "test_real_vllm_skipif": "no real vLLM cache",
    "test_s3_skip": "moto_server is missing",
    "test_fleet_skip": "no LiteLLM venv",
    "test_browser_skip": "chromium is missing",
}
COUNT_LINE = "skipped per marker: systemd 2, criu 1, polkit 1, package 1, real_vllm 1, s3 1, fleet 1, browser 1, other 1"


def run_sample(*, user: int | None, ci: str | None) -> dict:
    """Run SAMPLE under the skip policy; per test its outcome and message,
    and what pytest printed and wrote to LLMUX_SKIP_COUNTS."""
    work = Path(tempfile.mkdtemp(prefix="llmux-skip-policy-"))
    try:
        work.chmod(0o777)
        (work / "test_sample.py").write_text(SAMPLE)
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
        env.update(PYTHONPATH=str(TESTS), LLMUX_SKIP_COUNTS=str(work / "counts"))
        if ci is not None:
            env["CI"] = ci
        as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
        result = subprocess.run(
            [*as_user, sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:cacheprovider",
             "-W", "ignore::pytest.PytestUnknownMarkWarning", f"--junitxml={work / 'junit.xml'}",
             "test_sample.py"],
            cwd=work, env=env, capture_output=True, text=True, timeout=120,
        )
        outcomes = {}
        for case in ET.parse(work / "junit.xml").getroot().iter("testcase"):
            kinds = [child for child in case if child.tag in ("failure", "error", "skipped")]
            kind = kinds[0] if kinds else None
            outcomes[case.get("name")] = (
                "passed" if kind is None else kind.tag,
                "" if kind is None else (kind.get("message") or "") + (kind.text or ""),
            )
        return {"rc": result.returncode, "outcomes": outcomes, "stdout": result.stdout,
                "counts": (work / "counts").read_text()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def needs_setpriv() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run pytest as an ordinary user")


@pytest.mark.parametrize("who", ["root", "nobody with CI=true"])
def test_a_skipped_integration_test_fails_with_its_reason_as_root_or_under_ci(who):
    if who == "root":
        if os.geteuid() != 0:
            pytest.skip("needs root")
        run = run_sample(user=None, ci=None)
    else:
        needs_setpriv()
        run = run_sample(user=NOBODY, ci="true")
    assert run["rc"] == 1, run["stdout"]
    for name, reason in MARKED_SKIPS.items():
        kind, message = run["outcomes"][name]
        assert kind in ("failure", "error"), (name, kind, message)
        assert reason in message and "a skip of an integration test is a failure" in message, message
    assert run["outcomes"]["test_unmarked_skip"][0] == "skipped"
    assert run["outcomes"]["test_xfail_is_not_a_skip"][0] == "skipped"  # junit's word for xfail
    assert run["outcomes"]["test_that_runs"][0] == "passed"
    assert COUNT_LINE in run["stdout"] and run["counts"] == COUNT_LINE + "\n"


def test_an_ordinary_user_outside_ci_sees_skips_with_their_reasons():
    needs_setpriv()
    run = run_sample(user=NOBODY, ci=None)
    assert run["rc"] == 0, run["stdout"]
    for name, reason in MARKED_SKIPS.items():
        kind, message = run["outcomes"][name]
        assert (kind, reason in message) == ("skipped", True), (name, kind, message)
    assert COUNT_LINE in run["stdout"] and run["counts"] == COUNT_LINE + "\n"
