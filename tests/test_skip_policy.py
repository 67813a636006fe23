"""No silent skips (tests/skip_policy.py), shown on a real pytest run of a
small test file: as root or under CI every skip fails with its reason (a torch
test without torch too, and a module skipped while collected); as an ordinary
user it stays a skip; the skips are counted per marker, `other` included; a
test that boots the test systemd without its marker fails everywhere.

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

@pytest.mark.llamacpp
def test_llamacpp_skip():
    pytest.skip("no llama.cpp test bed")


@pytest.mark.browser
def test_browser_skip():
    pytest.skip("chromium is missing")

def test_unmarked_skip():
    pytest.skip("an ordinary skip")

@pytest.mark.torch
def test_torch():
    import torch

@pytest.mark.systemd
@pytest.mark.xfail(reason="a known bug")
def test_xfail_is_not_a_skip():
    assert False

@pytest.mark.systemd
def test_that_runs():
    pass

# stands in for tests/sysd/fixtures.py's fixture: the policy goes by its name
@pytest.fixture
def real_systemd():
    return "bed"

def test_unmarked_user_of_the_test_systemd(real_systemd):
    pass

@pytest.fixture(params=["subprocess", "systemd"])
def runtime(request):
    return request.getfixturevalue("real_systemd") if request.param == "systemd" else "process"

def test_unmarked_parameter_that_boots_it(runtime):
    pass

@pytest.fixture(params=["subprocess", pytest.param("systemd", marks=pytest.mark.systemd)])
def marked_runtime(request):
    return request.getfixturevalue("real_systemd") if request.param == "systemd" else "process"

def test_marked_parameter_that_boots_it(marked_runtime):
    pass
'''

#: a module that skips while collected (the policy's per-test hook never sees it)
SKIPPED_MODULE = '''
import pytest
pytest.importorskip("no_such_module_llmux")

def test_never_collected():
    pass
'''

#: a fixture skip without torch in sight: sitecustomize hides it from the sample's pytest
HIDE_TORCH = 'import sys\nsys.modules["torch"] = None\n'

MARKED_SKIPS = {
    "test_systemd_skip_in_the_body": "the test systemd cannot boot here",
    "test_criu_skip": "criu check fails",
    "test_polkit_skip_marker": "polkitd is not installed",
    "test_package_skip_in_a_fixture": "dpkg-buildpackage is missing",
    "test_real_vllm_skipif": "no real vLLM cache",
    "test_s3_skip": "moto_server is missing",
    "test_fleet_skip": "no LiteLLM venv",
    "test_llamacpp_skip": "no llama.cpp test bed",
    "test_browser_skip": "chromium is missing",
    "test_unmarked_skip": "an ordinary skip",
}
NOT_MARKED = "boots the test systemd but is not marked `systemd`"
#: as an ordinary user the torch test skips too (counted under torch)
COUNT_STRICT = "skipped per marker: systemd 2, criu 1, polkit 1, package 1, real_vllm 1, s3 1, fleet 1, llamacpp 1, browser 1, torch 0, other 1"
COUNT_USER = "skipped per marker: systemd 2, criu 1, polkit 1, package 1, real_vllm 1, s3 1, fleet 1, llamacpp 1, browser 1, torch 1, other 1"


def run_sample(*, user: int | None, ci: str | None, sample: str = SAMPLE) -> dict:
    """Run `sample` under the skip policy, without torch; per test its outcome
    and message, and what pytest printed and wrote to LLMUX_SKIP_COUNTS."""
    work = Path(tempfile.mkdtemp(prefix="llmux-skip-policy-"))
    try:
        work.chmod(0o777)
        (work / "test_sample.py").write_text(sample)
        (work / "sitecustomize.py").write_text(HIDE_TORCH)
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
        env.update(PYTHONPATH=f"{work}:{TESTS}", LLMUX_SKIP_COUNTS=str(work / "counts"))
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


def assert_systemd_users_checked(run: dict) -> None:
    """Everywhere: an unmarked test that boots the test systemd fails, saying so."""
    for name in ("test_unmarked_user_of_the_test_systemd", "test_unmarked_parameter_that_boots_it[systemd]"):
        kind, message = run["outcomes"][name]
        assert kind in ("failure", "error") and NOT_MARKED in message, (name, kind, message)
    for name in ("test_unmarked_parameter_that_boots_it[subprocess]",
                 "test_marked_parameter_that_boots_it[subprocess]", "test_marked_parameter_that_boots_it[systemd]"):
        assert run["outcomes"][name][0] == "passed", (name, run["outcomes"][name])


def needs_setpriv() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run pytest as an ordinary user")


def run_as(who: str, sample: str = SAMPLE) -> dict:
    if who == "root":
        if os.geteuid() != 0:
            pytest.skip("needs root")
        return run_sample(user=None, ci=None, sample=sample)
    needs_setpriv()
    return run_sample(user=NOBODY, ci="true", sample=sample)


@pytest.mark.parametrize("who", ["root", "nobody with CI=true"])
def test_every_skip_fails_with_its_reason_as_root_or_under_ci(who):
    run = run_as(who)
    assert run["rc"] == 1, run["stdout"]
    for name, reason in MARKED_SKIPS.items():
        kind, message = run["outcomes"][name]
        assert kind in ("failure", "error"), (name, kind, message)
        assert reason in message and "a skip is a failure" in message, message
    kind, message = run["outcomes"]["test_torch"]
    assert kind in ("failure", "error") and "torch is not installed" in message and "-m 'not torch'" in message
    assert_systemd_users_checked(run)
    assert run["outcomes"]["test_xfail_is_not_a_skip"][0] == "skipped"  # junit's word for xfail
    assert run["outcomes"]["test_that_runs"][0] == "passed"
    assert COUNT_STRICT in run["stdout"] and run["counts"] == COUNT_STRICT + "\n"


def test_an_ordinary_user_outside_ci_sees_skips_with_their_reasons():
    needs_setpriv()
    run = run_sample(user=NOBODY, ci=None)
    assert run["rc"] == 1, run["stdout"]  # the unmarked users of the test systemd
    for name, reason in {**MARKED_SKIPS, "test_torch": "needs torch"}.items():
        kind, message = run["outcomes"][name]
        assert (kind, reason in message) == ("skipped", True), (name, kind, message)
    assert_systemd_users_checked(run)
    assert COUNT_USER in run["stdout"] and run["counts"] == COUNT_USER + "\n"


@pytest.mark.parametrize("who", ["root", "nobody with CI=true", "nobody"])
def test_a_module_skipped_while_collected_is_counted_and_fails_when_strict(who):
    """A module-level importorskip skips before any per-test hook runs."""
    if who == "nobody":
        needs_setpriv()
        run = run_sample(user=NOBODY, ci=None, sample=SKIPPED_MODULE)
    else:
        run = run_as(who, SKIPPED_MODULE)
    assert run["counts"].endswith(", other 1\n"), run["counts"]
    if who == "nobody":
        assert run["rc"] == 5 and "1 skipped" in run["stdout"], run["stdout"]  # 5: no test ran
    else:
        assert run["rc"] != 0 and "was skipped while collected" in run["stdout"], run["stdout"]
        assert "no_such_module_llmux" in run["stdout"]
