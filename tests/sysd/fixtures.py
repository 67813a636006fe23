"""pytest fixture: one real test systemd per session (tests marked `systemd`).

Import it from tests/conftest.py (`from sysd.fixtures import real_systemd`), or
from a test module. Skips with the reason when the machine cannot boot it.
"""

from __future__ import annotations

import pytest

from skip_policy import require_marker
from sysd.testbed import TestSystemd, unavailable_reason


@pytest.fixture(scope="session")
def real_systemd():
    require_marker("systemd", "boots the test systemd")  # the first user; the rest: skip_policy's call hook
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    bed = TestSystemd.boot()
    try:
        yield bed
    finally:
        bed.down()
