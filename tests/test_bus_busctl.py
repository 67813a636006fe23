"""What busctl users type (the README's lines) works against the service:
tree, introspect, get-property, call, --json, and readable errors."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from test_bus_support import start_service, system_bus  # noqa: F401

pytestmark = pytest.mark.skipif(not shutil.which("busctl"), reason="needs busctl")


@pytest.fixture
async def running(system_bus):
    r = await start_service(system_bus.address)
    yield r
    await r.close()


async def busctl(address: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "busctl", f"--address={address}", "--no-pager", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


async def test_tree(system_bus, running):
    rc, out, err = await busctl(system_bus.address, "tree", "io.llmux.LLMux1")
    assert rc == 0, err
    for path in ("/io/llmux/LLMux1", "/io/llmux/LLMux1/model/llama", "/io/llmux/LLMux1/model/qwen_2d7b"):
        assert path in out


async def test_introspect_shows_typed_members(system_bus, running):
    rc, out, err = await busctl(system_bus.address, "introspect", "io.llmux.LLMux1", "/io/llmux/LLMux1")
    assert rc == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(".")}
    assert rows[".Acquire"][1:4] == ["method", "st", "st"]
    assert rows[".SwitchFinished"][1:3] == ["signal", "ssbts"]
    assert rows[".Version"][1:4] == ["property", "s", '"0.1.0-test"']
    assert "const" in rows[".Version"]
    assert "emits-change" in rows[".State"]
    rc, out, err = await busctl(system_bus.address, "introspect", "io.llmux.LLMux1",
                                "/io/llmux/LLMux1/model/llama", "io.llmux.LLMux1.Model")
    assert rc == 0, err
    assert '"offload+keep_running"' in out


async def test_get_property_and_call(system_bus, running):
    rc, out, _ = await busctl(system_bus.address, "get-property", "io.llmux.LLMux1", "/io/llmux/LLMux1",
                              "io.llmux.LLMux1.Manager", "Version")
    assert (rc, out) == (0, 's "0.1.0-test"\n')
    rc, out, err = await busctl(system_bus.address, "call", "io.llmux.LLMux1", "/io/llmux/LLMux1",
                                "io.llmux.LLMux1.Manager", "SwitchAndWait", "st", "llama", "0")
    assert (rc, out) == (0, ""), err
    rc, out, _ = await busctl(system_bus.address, "get-property", "io.llmux.LLMux1",
                              "/io/llmux/LLMux1/model/llama", "io.llmux.LLMux1.Model", "State")
    assert out == 's "ready"\n'
    rc, out, err = await busctl(system_bus.address, "--json=short", "call", "io.llmux.LLMux1",
                                "/io/llmux/LLMux1", "io.llmux.LLMux1.Manager", "GetStatus")
    assert rc == 0, err
    status = json.loads(out)["data"][0]
    assert status["state"]["data"] == "active:llama"


async def test_errors_read_well(system_bus, running):
    rc, _, err = await busctl(system_bus.address, "call", "io.llmux.LLMux1", "/io/llmux/LLMux1",
                              "io.llmux.LLMux1.Manager", "Switch", "s", "nope")
    assert rc == 1
    assert err == "Call failed: model 'nope' does not exist; known models: llama, qwen-7b\n"
