"""pytest fixture: one real test systemd per session (tests marked `systemd`).

Import it from tests/conftest.py (`from sysd.fixtures import real_systemd`), or
from a test module. Skips with the reason when the machine cannot boot it.
"""

from __future__ import annotations

import pytest

from sysd.testbed import TestSystemd, unavailable_reason


@pytest.fixture(scope="session")
def real_systemd():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    bed = TestSystemd.boot()
    try:
        yield bed
    finally:
        bed.down()
