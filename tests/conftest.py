"""Shared fixtures: the real test systemd and the S3 server (one per session each), the
simulator; the no-silent-skips rule (skip_policy.py) and the torch rule below.

Test modules import helpers as top-level modules (`from fakes import ...`,
`from sim_fixtures import ...`): pytest puts tests/ on sys.path (rootdir
conftest, no tests/__init__.py).
"""

import importlib.util
import os

import pytest

from s3_server import fault_proxy, s3_server  # noqa: F401  (moto_server, session fixture)
from skip_policy import pytest_runtest_makereport, pytest_sessionfinish, pytest_terminal_summary  # noqa: F401
from sysd.fixtures import real_systemd  # noqa: F401  (session fixture)

#: torch is in the PyPI venv (scripts/bootstrap) and nowhere in Debian 12
HAVE_TORCH = importlib.util.find_spec("torch") is not None
#: scripts/test sets this for its PyPI pass, where a skipped torch test would hide a broken venv
REQUIRE_TORCH = os.environ.get("LLMUX_TEST_REQUIRE_TORCH") == "1"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("torch") is not None and not HAVE_TORCH:
        if REQUIRE_TORCH:
            pytest.fail("torch is not installed in this venv but LLMUX_TEST_REQUIRE_TORCH=1 "
                        "(scripts/test's PyPI pass): run scripts/bootstrap pypi")
        pytest.skip("needs torch (pip install 'llmux[torch]'); Debian 12 packages none")
