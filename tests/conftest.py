"""Shared fixtures: the real test systemd (one per session) and the simulator.

Test modules import helpers as top-level modules (`from fakes import ...`,
`from sim_fixtures import ...`): pytest puts tests/ on sys.path (rootdir
conftest, no tests/__init__.py).
"""

from sysd.fixtures import real_systemd  # noqa: F401  (session fixture)
