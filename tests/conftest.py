"""Shared fixtures: the real test systemd and the S3 server (one per session each), the
simulator; the no-silent-skips rules (skip_policy.py).

Test modules import helpers as top-level modules (`from fakes import ...`,
`from sim_fixtures import ...`): pytest puts tests/ on sys.path (rootdir
conftest, no tests/__init__.py).
"""

from s3_server import fault_proxy, s3_server  # noqa: F401  (moto_server, session fixture)
from skip_policy import (  # noqa: F401  (pytest hooks)
    pytest_make_collect_report,
    pytest_runtest_call,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
from sysd.fixtures import real_systemd  # noqa: F401  (session fixture)
