"""The daemon's event loop: uvloop when installed, the standard loop on request.

Unit level: which loop `eventloop.run` really runs a coroutine on, for each
--event-loop choice with and without uvloop importable, and the error that
names the fix. Process level: `llmuxd run` serves on the loop it was told
($LLMUXD_EVENT_LOOP, the default of --event-loop, or the default) and says
which in its log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import urllib.request

import pytest

from daemon_process import DaemonProcess, daemon_env, http_json, sim_model, write_config
from llmuxd.daemon import eventloop
from llmuxd.daemon.main import build_parser

LOOP_CHOICES = [
    # (--event-loop, uvloop importable, the loop's module or the words of the error)
    ("auto", True, "uvloop"),
    ("auto", False, "asyncio"),
    ("uvloop", True, "uvloop"),
    ("uvloop", False, "install python3-uvloop (or pip install uvloop), or use --event-loop asyncio"),
    ("asyncio", True, "asyncio"),
    ("asyncio", False, "asyncio"),
    ("trio", True, "event loop 'trio' is unknown; choose one of auto, uvloop, asyncio"),
]


@pytest.mark.parametrize("choice,importable,expected", LOOP_CHOICES)
def test_run_uses_the_chosen_loop(choice, importable, expected, monkeypatch, caplog):
    if not importable:
        monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    ran_on = []

    async def main() -> int:
        ran_on.append(type(asyncio.get_running_loop()).__module__.split(".")[0])
        return 0

    caplog.set_level(logging.INFO, logger="llmuxd.daemon.eventloop")
    status = eventloop.run(main(), choice)
    if expected in ("uvloop", "asyncio"):
        assert (status, ran_on) == (0, [expected])
        assert f"event loop: {expected}" in caplog.text
    else:
        assert (status, ran_on) == (2, []), "the daemon does not start on another loop than asked"
        assert expected in caplog.text


@pytest.mark.parametrize("environ,argv,expected", [
    ({}, [], "auto"),
    ({"LLMUXD_EVENT_LOOP": "asyncio"}, [], "asyncio"),
    ({"LLMUXD_EVENT_LOOP": "asyncio"}, ["--event-loop", "uvloop"], "uvloop"),
    ({}, ["--event-loop", "AsyncIO"], "asyncio"),
])
def test_event_loop_option_defaults_to_the_environment(environ, argv, expected, monkeypatch):
    monkeypatch.delenv("LLMUXD_EVENT_LOOP", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["run", "--config", "x.yaml", *argv])
    assert args.event_loop == expected


@pytest.mark.parametrize("environ,expected", [
    (None, "uvloop"),  # installed in both test venvs, so the default takes it
    ("asyncio", "asyncio"),
])
def test_daemon_serves_on_the_chosen_loop(tmp_path, environ, expected):
    config = write_config(tmp_path, {"alpha": sim_model("org/alpha-7b", tmp_path / "gpu.json", 1000)})
    env = daemon_env()
    env.pop("LLMUXD_EVENT_LOOP", None)
    if environ is not None:
        env["LLMUXD_EVENT_LOOP"] = environ
    daemon = DaemonProcess(config, tmp_path / "llmuxd.log", bus="none", env=env)
    try:
        daemon.wait_ready()
        body = {"model": "alpha", "prompt": "hi", "max_tokens": 3}
        status, _, answer = http_json(daemon.base + "/v1/completions", json.dumps(body).encode(),
                                      {"Content-Type": "application/json"})
        assert status == 200 and answer["choices"], answer
        request = urllib.request.Request(daemon.base + "/v1/completions",
                                         data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        assert len(events) >= 2 and events[-1] == "data: [DONE]", events
        assert f"event loop: {expected}" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
