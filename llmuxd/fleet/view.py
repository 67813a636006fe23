"""A router's view of many llmux hosts, refreshed in the background.

`FleetView.choose` is called on a router's request path, so it never waits on
the network: it reads the last signal each host sent. One asyncio task per host
polls `GET /llmux/v1/state` every `refresh_s` seconds on the loop that first
asked (LiteLLM's event loop when it runs inside LiteLLM). A host whose last
signal is older than `stale_s` (it stopped answering in time), that refused or
broke the last poll's connection or did not answer as llmux, or that a router saw
fail to connect (`mark_down`) is skipped until a poll succeeds again; when
every host is skipped `choose` returns nothing and the router routes as it would
without llmux.

Standard library and aiohttp only (both are in LiteLLM's environment).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Deque, Dict, FrozenSet, Hashable, List, Optional, Sequence, Set, Tuple

import aiohttp

from llmuxd.fleet.ranking import Option, preferred
from llmuxd.fleet.signal import AWAKE, STARTING, STATE_PATH, HostSignal, SignalError, state_url

log = logging.getLogger("llmux.fleet")

DEFAULT_REFRESH_S = 1.0
#: a model's demand is the rate of its requests this router saw in the last minute
DEMAND_WINDOW_S = 60.0
#: pressure steps: a quarter of an average host's demand
PRESSURE_STEPS_PER_HOST = 4
#: a model stays on the host it lives on unless another is lighter by this many steps:
#: moving costs a cold start there and leaves its old host's memory to the next eviction
HOME_STEPS = 2


def host_key(base: str) -> str:
    """One key per host however its URL is written (`http://h:3000`, `…/v1`, `…/v1/`)."""
    return base if base.endswith(STATE_PATH) else state_url(base)


@dataclass
class HostRecord:
    #: the signal's URL, which is also the host's key
    url: str
    signal: Optional[HostSignal] = None
    fetched_at: float = float("-inf")
    down: bool = False
    error: Optional[str] = None
    polls: int = 0


class FleetView:
    """Signals of the hosts it was asked about; see the module docstring."""

    def __init__(
        self,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        stale_s: Optional[float] = None,
        timeout_s: Optional[float] = None,
        claim_s: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not refresh_s > 0:
            raise ValueError(f"refresh_s must be > 0 seconds, not {refresh_s!r}")
        self.refresh_s = float(refresh_s)
        #: a signal older than this is not used (a host that stopped answering)
        self.stale_s = float(stale_s) if stale_s is not None else max(3 * self.refresh_s, 2.0)
        #: one poll's limit
        self.timeout_s = float(timeout_s) if timeout_s is not None else min(max(self.refresh_s, 0.5), 2.0)
        #: how long "sent here to be started" counts, until the host's own signal shows it
        self.claim_s = float(claim_s) if claim_s is not None else max(2 * self.refresh_s, 1.0)
        self.clock = clock
        self.hosts: Dict[str, HostRecord] = {}
        self._claims: Dict[Tuple[str, str], float] = {}
        #: when this router saw each model's recent requests (its demand)
        self._seen: Dict[str, Deque[float]] = {}
        #: the host this router last sent each model to be woken on (where it lives)
        self._home: Dict[str, str] = {}
        self._tasks: Dict[str, "asyncio.Task[None]"] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._session: Optional[aiohttp.ClientSession] = None

    # -- the request path (no I/O) -------------------------------------------------

    def signal(self, base: str) -> Optional[HostSignal]:
        """The host's signal when it is fresh and the host is up, else None."""
        rec = self.hosts.get(host_key(base))
        if rec is None or rec.down or rec.signal is None:
            return None
        if self.clock() - rec.fetched_at > self.stale_s:
            return None
        return rec.signal

    def claims(self, base: str) -> FrozenSet[str]:
        now, key = self.clock(), host_key(base)
        return frozenset(m for (k, m), at in self._claims.items() if k == key and now - at < self.claim_s)

    def claim(self, base: str, model: str) -> None:
        self._claims[(host_key(base), model)] = self.clock()
        self._home[model] = host_key(base)

    def demand(self, model: str) -> float:
        """Requests per second this router saw for `model` over the last DEMAND_WINDOW_S."""
        seen = self._seen.get(model)
        if not seen:
            return 0.0
        horizon = self.clock() - DEMAND_WINDOW_S
        while seen and seen[0] < horizon:
            seen.popleft()
        return len(seen) / DEMAND_WINDOW_S

    def _note(self, model: str) -> None:
        self._seen.setdefault(model, collections.deque()).append(self.clock())

    def _pressures(self, model: str, hosts: Sequence[str]) -> Dict[str, int]:
        """Each host's pressure for placing `model`: the demand of the other models that
        live there (awake or starting in its signal, or last sent there by this router),
        a model living on k hosts counting 1/k on each, in PRESSURE_STEPS_PER_HOST steps
        of an average host's demand."""
        residents: Dict[str, Set[str]] = {h: set() for h in hosts}
        for h in hosts:
            signal = self.signal(h)
            if signal is not None:
                residents[h].update(n for n, m in signal.models.items() if m.state in (AWAKE, STARTING))
        for other, h in self._home.items():
            if h in residents and not any(other in r for k, r in residents.items() if k != h):
                residents[h].add(other)
        homes: Dict[str, int] = collections.Counter(m for r in residents.values() for m in r)
        load = {h: sum(self.demand(m) / homes[m] for m in r if m != model) for h, r in residents.items()}
        total = sum(self.demand(m) for m in homes)
        step = total / max(len(hosts), 1) / PRESSURE_STEPS_PER_HOST
        if step <= 0:
            return {h: 0 for h in hosts}
        home = self._home.get(model)
        return {h: max(0, int(v / step) - (HOME_STEPS if h == home else 0)) for h, v in load.items()}

    def mark_down(self, base: str, reason: str) -> None:
        """Skip `base` until its next successful poll (a router saw it refuse a connection)."""
        rec = self.hosts.get(host_key(base))
        if rec is not None and not rec.down:
            rec.down, rec.error = True, reason
            log.warning("llmux fleet: skipping %s until it answers again: %s", rec.url, reason)

    def choose(self, entries: Sequence[Tuple[Hashable, str, str]]) -> List[Hashable]:
        """The keys to route to among (key, host base URL, model on that host); empty:
        no usable signal, route as if llmux were not there. Starts polling new hosts."""
        for _, base, _ in entries:
            self.watch(base)
        if entries:
            self._note(entries[0][2])  # one request, whatever the number of its deployments
        options = [Option(key, host_key(base), model, self.signal(base), self.claims(base))
                   for key, base, model in entries]
        if not any(o.model_signal is not None and o.model_signal.state == AWAKE for o in options):
            # a placement is about to be made: weigh what already lives on each host
            pressure = self._pressures(entries[0][2], [o.host for o in options]) if entries else {}
            options = [replace(o, pressure=pressure.get(o.host, 0)) for o in options]
        best = preferred(options)
        if len(best) == 1 and best[0].model_signal is not None and best[0].model_signal.state != AWAKE:
            self.claim(best[0].host, best[0].model)
        return [o.key for o in best]

    # -- polling -------------------------------------------------------------------

    def watch(self, base: str) -> None:
        """Poll `base` from now on (needs a running loop; later calls are cheap)."""
        key = host_key(base)
        if key not in self.hosts:
            self.hosts[key] = HostRecord(key)
        self._ensure_polling(key)

    def _ensure_polling(self, key: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: polling starts on the first call from one
        if loop is not self._loop:  # first use, or a new loop (the old one's tasks are gone)
            self._loop, self._tasks, self._session = loop, {}, None
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = loop.create_task(self._poll_forever(key), name=f"llmux-fleet-poll {key}")

    async def refresh(self, base: str) -> HostRecord:
        """Poll `base` once now (also what the background task does)."""
        key = host_key(base)
        rec = self.hosts.setdefault(key, HostRecord(key))
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        rec.polls += 1
        try:
            async with self._session.get(key) as resp:
                if resp.status != 200:
                    raise SignalError(f"HTTP {resp.status} from {key}")
                signal = HostSignal.from_json(await resp.json(content_type=None))
        except asyncio.TimeoutError:
            # slow, not gone: the last signal stays in use until it is stale
            rec.error = f"no answer within {self.timeout_s:g}s"
            return rec
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if not rec.down:
                log.warning("llmux fleet: %s unreachable or not llmux, skipped: %s", key, _one_line(exc))
            rec.down, rec.error = True, _one_line(exc)
            return rec
        if rec.down:
            log.info("llmux fleet: %s answers again", key)
        rec.signal, rec.fetched_at, rec.down, rec.error = signal, self.clock(), False, None
        return rec

    async def _poll_forever(self, key: str) -> None:
        while True:
            try:
                await self.refresh(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad answer
                log.exception("llmux fleet: polling %s failed", key)
            await asyncio.sleep(self.refresh_s)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = {}
        if self._session is not None:
            await self._session.close()
            self._session = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
