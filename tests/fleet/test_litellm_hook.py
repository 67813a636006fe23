"""llmux's LiteLLM hook inside a real `litellm.Router`, run by LiteLLM's own Python
(tests/fleet/litellm_hook_check.py): LiteLLM's deployment dicts parse to (host, model), and
LiteLLM's failure event for a dropped connection (an InternalServerError caused by a
connection error) takes the host out of routing at once, before any poll could.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fleet_harness import REPO, require_litellm

pytestmark = [pytest.mark.fleet]


def test_dropped_connection_takes_the_host_out_of_routing_at_once() -> None:
    exe = require_litellm()
    python = exe.parent / "python"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPATH=str(REPO))
    run = subprocess.run([str(python), str(Path(__file__).with_name("litellm_hook_check.py"))],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["targets"] == [[found["a"], "m"], [found["b"], "m"]]
    # the first request goes where the model is awake (A), meets the dropped connection...
    assert found["errors"] == ["InternalServerError"]
    assert found["a_down"] and found["a_error"] == "InternalServerError from LiteLLM"
    # ...and every later one goes to B, with no poll in between
    assert found["served"] == [found["b"]] * 5
