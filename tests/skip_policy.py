"""No silent skips: a pytest plugin (its hooks are imported by tests/conftest.py).

As an ordinary user the integration tests skip, each with its reason (they
need root to boot the test systemd, CRIU, polkitd, the .deb, real vLLM, llama.cpp). As
root, and whenever `CI` is set, the machine is meant to have all of that, so
every skip is turned into a failure that keeps the reason: a green run then
really ran everything it collected. What a run must not do is deselected
instead (`-m "not torch"`, as scripts/test's Debian pass does), which is
visible in the command line, not hidden in a skip.

That covers the skips a per-test hook does not see: a module that skips
while it is collected (a module-level `pytest.importorskip`) is a collection
error as root or under CI, and counted under `other` elsewhere.

A test that boots the test systemd must be marked `systemd` (its fixture,
`real_systemd`, and tests/test_service.py's `boot_from_tree` check), so that
its skips are counted under that marker and the marker selects it.

Every run ends with one line counting the skips per marker (a test with two
markers counts under both; `other` is the unmarked ones and skipped modules);
with `LLMUX_SKIP_COUNTS=FILE` in the environment the same line is written to
FILE, which is how `scripts/test` prints it after each pass.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

#: markers counted in the skip line, in its order
STRICT_MARKERS = ("systemd", "criu", "polkit", "package", "real_vllm", "s3", "fleet", "llamacpp", "browser", "torch")
OTHER = "other"
_COUNTS = pytest.StashKey[dict]()
#: the fixture that boots the test systemd (tests/sysd/fixtures.py)
SYSTEMD_FIXTURE = "real_systemd"

#: torch is in the PyPI venv (scripts/bootstrap) and nowhere in Debian 12
HAVE_TORCH = importlib.util.find_spec("torch") is not None

#: the test being set up or run (for require_marker, called from fixtures and helpers)
_current: pytest.Item | None = None


def strict() -> bool:
    """Root, or a CI job (CI set to anything but empty, 0 or false)."""
    return os.geteuid() == 0 or os.environ.get("CI", "").lower() not in ("", "0", "false")


def _who() -> str:
    return "root" if os.geteuid() == 0 else "CI"


def require_marker(marker: str, what: str) -> None:
    """Fail the current test unless it is marked `marker`: called where a test
    starts something only that marker's tests may (e.g. boots the test systemd),
    before any skip, so that an unmarked user fails everywhere, not only as root."""
    item = _current
    if item is not None and item.get_closest_marker(marker) is None:
        pytest.fail(f"{item.nodeid} {what} but is not marked `{marker}`: add @pytest.mark.{marker} "
                    f"(or pytest.param(..., marks=pytest.mark.{marker}) on the parameter that does), "
                    f"so that its skips are counted and fail as root or under CI (tests/skip_policy.py)",
                    pytrace=False)


def _fixtures_used(item: pytest.Item) -> set[str]:
    """Fixtures the test requested, statically or with request.getfixturevalue()."""
    names = set(getattr(item, "fixturenames", ()))
    request = getattr(item, "_request", None)
    names.update(getattr(request, "_fixture_defs", {}) or {})
    return names


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember the test; a `torch` test without torch skips as an ordinary
    user and fails as root or under CI (deselect it with -m "not torch" instead)."""
    global _current
    _current = item
    if item.get_closest_marker("torch") is not None and not HAVE_TORCH:
        if strict():
            pytest.fail(f"torch is not installed in this venv, and as {_who()} a torch test may not skip: "
                        "run scripts/bootstrap pypi, or deselect them with -m 'not torch' "
                        "(as scripts/test's Debian pass does)", pytrace=False)
        pytest.skip("needs torch (pip install 'llmux[torch]'); Debian 12 packages none")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """A test that got the test systemd from a fixture (also through a
    parametrized fixture's getfixturevalue) must be marked `systemd`."""
    if SYSTEMD_FIXTURE in _fixtures_used(item):
        require_marker("systemd", "boots the test systemd")


def _reason(report: Any) -> str:
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
    if strict():
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} ({', '.join(markers) or OTHER}) was skipped, and as {_who()} "
                           f"a skip is a failure: {_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module skipped while collected (module-level importorskip or
    pytest.skip(allow_module_level=True)): counted, and an error when strict."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not isinstance(collector, pytest.Module):
        return
    _counts(collector.config)[OTHER] += 1
    if strict():
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} was skipped while collected, and as {_who()} a skip is "
                           f"a failure (skip inside a fixture or test, under its marker): {_reason(report)}")


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
