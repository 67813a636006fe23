"""No silent skips: a pytest plugin (its hooks are imported by tests/conftest.py).

As an ordinary user the integration tests skip, each with its reason (they
need root to boot the test systemd, CRIU, polkitd, the .deb, real vLLM). As
root, and whenever `CI` is set, the machine is meant to have all of that, so
a skip of a test marked with one of `STRICT_MARKERS` is turned into a
failure that keeps the reason: a green run then really ran them.

Every run ends with one line counting the skips per marker (a test with two
markers counts under both; `other` is the unmarked ones); with
`LLMUX_SKIP_COUNTS=FILE` in the environment the same line is written to FILE,
which is how `scripts/test` prints it after each pass.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

#: markers whose tests may not skip as root or under CI
STRICT_MARKERS = ("systemd", "criu", "polkit", "package", "real_vllm", "s3", "fleet", "browser")
OTHER = "other"
_COUNTS = pytest.StashKey[dict]()


#: torch is in the PyPI venv (scripts/bootstrap) and nowhere in Debian 12
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A `torch` test without torch skips, except where scripts/test's PyPI pass sets
    LLMUX_TEST_REQUIRE_TORCH=1: there a skip would hide a broken venv, so it fails."""
    if item.get_closest_marker("torch") is not None and not HAVE_TORCH:
        if os.environ.get("LLMUX_TEST_REQUIRE_TORCH") == "1":
            pytest.fail("torch is not installed in this venv but LLMUX_TEST_REQUIRE_TORCH=1 "
                        "(scripts/test's PyPI pass): run scripts/bootstrap pypi")
        pytest.skip("needs torch (pip install 'llmux[torch]'); Debian 12 packages none")


def strict() -> bool:
    """Root, or a CI job (CI set to anything but empty, 0 or false)."""
    return os.geteuid() == 0 or os.environ.get("CI", "").lower() not in ("", "0", "false")


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _counts(config: pytest.Config) -> dict[str, int]:
    if _COUNTS not in config.stash:
        config.stash[_COUNTS] = {name: 0 for name in (*STRICT_MARKERS, OTHER)}
    return config.stash[_COUNTS]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    markers = [name for name in STRICT_MARKERS if item.get_closest_marker(name)]
    counts = _counts(item.config)
    for name in markers or [OTHER]:
        counts[name] += 1
    if markers and strict():
        who = "root" if os.geteuid() == 0 else "CI"
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} ({', '.join(markers)}) was skipped, and as {who} a skip "
                           f"of an integration test is a failure: {_reason(report)}")


def skip_line(config: pytest.Config) -> str:
    counts = _counts(config)
    return "skipped per marker: " + ", ".join(f"{name} {n}" for name, n in counts.items())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    terminalreporter.write_line(skip_line(config))


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("LLMUX_SKIP_COUNTS")
    if path:
        with open(path, "w") as out:
            out.write(skip_line(session.config) + "\n")
