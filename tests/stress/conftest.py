"""Shared fixtures of the stress suite, and the summary printed after it.

Each test module starts one `llmuxd run` (module scope) through
`harness.start_daemon`; its teardown (`harness.stop_and_check`) checks what a
user would check after Ctrl-C: exit status 0 and no backend left running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import TOTALS


@pytest.fixture(scope="module")
def stress_tmp(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TOTALS["scenarios"]:
        return
    t = TOTALS
    terminalreporter.section("llmux stress summary")
    terminalreporter.write_line(
        f"scenarios run {t['scenarios']}, requests sent {t['sent']}, lost {t['lost']}, "
        f"misrouted {t['misrouted']}, cut {t['cut']}, unexpected statuses {t['unexpected']}, "
        f"invariant violations {t['violations']}")
    if t["failed"]:
        terminalreporter.write_line(f"scenarios with problems: {', '.join(t['failed'])}")


