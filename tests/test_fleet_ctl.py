"""`llmuxctl fleet HOST_URL...` as a user runs it: a real llmuxctl process reading real llmux
front ends (`fleet_support.Host`) over loopback HTTP.

What a person must see: one row per host with its GPU budget use and each model's state
there, down hosts named, and router configuration that matches the hosts (the LiteLLM
config is also loaded by a real LiteLLM proxy in tests/fleet/).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import List, Tuple

import yaml

from daemon_process import daemon_env
from fleet_support import Host
from ports import free_port

TWO = ("a", "b")


async def llmuxctl(*args: str) -> Tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmuxd.ctl", *args, env=daemon_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def row(table: str, host: str) -> List[str]:
    for line in table.splitlines():
        if line.startswith(host):
            return [c for c in line[len(host):].split("  ") if c.strip()]
    raise AssertionError(f"no row for {host} in:\n{table}")


def hostname(h: Host) -> str:
    return h.base.split("://", 1)[1]


async def test_fleet_table_config_and_router_lines() -> None:
    async with Host(TWO) as h1, Host(TWO) as h2, Host(TWO) as h3:
        await h1.serve("a")
        await h2.serve("b")
        await h3.switcher.pin("a")
        hosts = [h1.base, hostname(h2) + "/v1", h3.base + "/"]  # however a person writes them
        rc, out, err = await llmuxctl("fleet", *hosts, "--only", "table")
        assert rc == 0, err
        assert "fleet: 3 of 3 hosts answering, 2 models" in out
        assert [c.strip() for c in row(out, hostname(h1))] == ["default 1/1", "awake 0+0", "asleep ~" + f"{h1.switcher.wait_estimate('b'):.1f}s"]
        assert row(out, hostname(h2))[2].strip() == "awake 0+0"
        assert row(out, hostname(h3) + " (pinned a)")[2].strip().endswith("(refused)")
        assert [c.strip() for c in row(out, "awake on")] == ["2 of 3", "1 of 3"]

        rc, out, err = await llmuxctl("fleet", *hosts, "--only", "litellm")
        assert rc == 0, err
        config = yaml.safe_load(out)
        deployments = {(d["model_name"], d["litellm_params"]["api_base"]) for d in config["model_list"]}
        assert deployments == {(m, h.base + "/v1") for m in TWO for h in (h1, h2, h3)}
        assert all(d["litellm_params"]["model"] == "openai/" + d["model_name"] for d in config["model_list"])
        assert config["litellm_settings"]["callbacks"] == ["llmuxd.fleet.litellm.llmux_routing"]

        rc, out, err = await llmuxctl("fleet", *hosts, "--only", "vllm-router")
        commands = [line for line in out.splitlines() if not line.startswith("#")]
        assert commands == [f"vllm-router --worker-urls {h3.base} --policy round_robin --host 0.0.0.0 --port 30000   # a"]

        rc, out, err = await llmuxctl("--json", "fleet", *hosts)
        data = json.loads(out)
        assert data["hosts"][h1.base]["models"]["a"]["state"] == "awake"
        assert data["vllm_router"] == [{"model": "a", "argv": commands[0].split("   #")[0].split()}]


async def test_fleet_names_down_hosts_and_says_so_in_the_exit_status() -> None:
    async with Host(TWO) as h1:
        down = dead_url()
        rc, out, err = await llmuxctl("fleet", h1.base, down, "--only", "table")
        assert rc == 1
        assert row(out, down.split("://")[1])[0].strip() == "down"
        assert f"(!) {down.split('://')[1]}: " in out
        assert "1 of 2 hosts did not answer" in err

        rc, out, err = await llmuxctl("fleet", down)
        assert rc == 3 and out == ""
        assert err.startswith("llmuxctl: no host answered: " + down)
