"""In-process llmux hosts for the fleet tests: a real `Switcher` on `FakeBackends` behind the
real `FrontEnd`, on an ephemeral loopback port, driven into the states a router must see.
Import as `from fleet_support import Host` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

import aiohttp
from aiohttp.test_utils import TestServer

from fakes import FakeBackends, make_config
from llmuxd.fleet.signal import STATE_PATH, HostSignal
from llmuxd.http import FrontEnd
from llmuxd.switcher import Switcher

WAIT = 30  # bound for event waits; never a timing assertion


class Host:
    """A started switcher and front end on an ephemeral port, and the tasks a scenario left."""

    def __init__(self, models: Any, *, policy: Optional[dict] = None, groups: Optional[dict] = None):
        self.config = make_config(models, policy={"min_active": 0, **(policy or {})}, groups=groups)
        self.backends = FakeBackends(self.config)
        self.switcher = Switcher(self.config, self.backends, clock=asyncio.get_running_loop().time)
        self.frontend = FrontEnd(self.config, self.switcher, version="9.9")
        self.server = TestServer(self.frontend.make_app())
        self.tasks: List[asyncio.Task] = []
        self.gates: List[asyncio.Event] = []

    async def __aenter__(self) -> "Host":
        await self.switcher.start()
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for gate in self.gates:
            gate.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.session.close()
        await self.server.close()
        await self.switcher.close()

    @property
    def base(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def get(self, path: str) -> aiohttp.ClientResponse:
        resp = await self.session.get(self.base + path)
        await resp.read()
        return resp

    async def signal(self) -> HostSignal:
        resp = await self.get(STATE_PATH)
        assert resp.status == 200
        return HostSignal.from_json(await resp.json())

    async def serve(self, model: str) -> None:
        """One request for `model`, answered and released (the model is then awake)."""
        (await asyncio.wait_for(self.switcher.acquire(model), WAIT)).release()

    def request(self, model: str) -> asyncio.Task:
        task = asyncio.ensure_future(self.switcher.acquire(model))
        self.tasks.append(task)
        return task

    async def hold_start(self, model: str) -> None:
        """A request for `model` whose start is held: the model stays `starting`."""
        self.gates.append(self.backends.hold("start", model))
        self.request(model)
        await asyncio.wait_for(self.backends.entered("start", model).wait(), WAIT)


