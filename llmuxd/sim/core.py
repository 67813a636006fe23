"""The simulated engine: scheduler, sleep/wake state, weights, GPU ledger, faults.

It follows vLLM 0.32's `EngineCore` as observed (reference/vllm-api.md §3.3):
sleep always pauses the scheduler and, for level >= 1, puts the executor's
tags `weights` and `kv_cache` to sleep; `/is_sleeping` is "scheduler paused or
any tag asleep"; a wake naming a tag that is not asleep wakes nothing.
Requests that arrive while asleep are held until wake, never rejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from llmuxd.sim.device import DeviceOutOfMemory, DeviceState, import_torch
from llmuxd.sim.ledger import GpuLedger, GpuOutOfMemory
from llmuxd.sim.link import D2H, H2D, HostLink
from llmuxd.sim.settings import SimSettings
from llmuxd.sim.weights import ensure_weights_file, read_weights

EXECUTOR_TAGS = ("weights", "kv_cache")
SLEEP_MODES = ("abort", "wait", "keep")
#: share of (GPU need - residue) that the weights take; the KV cache takes the rest
WEIGHTS_SHARE = 0.6
GARBAGE_MARK = "\ufffdgarbage"

FAULT_KINDS = (
    "fail_sleep",  # /sleep (level 1 or 2) answers 500
    "fail_wake",  # /wake_up answers 500
    "fail_wake_midway",  # a weights wake reserves its memory, copies half, then answers 500 (leaks: vLLM PR #34600)
    "fail_release",  # /release_kv_cache_memory answers 500
    "hang_sleep",  # /sleep never answers (until the fault is cleared)
    "fail_reload",  # collective_rpc reload_weights answers 500
    "wrong_reload",  # reload_weights answers 200 but brings back the wrong bytes
    "sleep_keeps_memory",  # /sleep answers 200 but keeps the GPU reservation (vLLM #32714)
    "crash",  # the process exits now (code 1)
    "crash_mid_stream",  # the process exits in the middle of the next streamed response
    "garbage",  # outputs are garbage
    "latency",  # `seconds` added to each inference request
    "slow_start",  # the next start of this served model takes `seconds` more
    "engine_dead",  # /health 503, inference 500 (vLLM's EngineDeadError) until cleared
)

_WORDS = (
    "the a of and to in is it that was for on are with as be at by this from or one had not but "
    "all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part over new sound take only little work know place "
    "year live me back give most very after thing our just name good sentence man think say great "
    "where help through much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large must big even such"
).split()


class SimError(Exception):
    """An engine call failed; `status` and `message` become vLLM's error envelope."""

    def __init__(self, status: int, message: str, type_: str = "InternalServerError"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_


@dataclass
class Fault:
    kind: str
    count: int = 1  # how many times it fires; -1 = until cleared
    seconds: float = 0.0


@dataclass
class GenRequest:
    """One inference request inside the engine."""

    rid: str
    prompt: str
    max_tokens: int
    natural_stop: bool  # finish with "stop" (else "length")
    rng: random.Random
    garbage: bool
    #: the greedy answer's seed before the weights checksum is mixed in (None: sampled)
    basis: int | None = None
    #: the weights checksum read when the request was admitted (--device)
    checksum: str = ""
    abort_evt: asyncio.Event = field(default_factory=asyncio.Event)
    produced: int = 0
    finish_reason: str | None = None
    #: False once the client hung up; vLLM aborts such requests
    client_alive: Callable[[], bool] | None = None


class SimCore:
    """All state of one simulated vLLM server."""

    def __init__(self, settings: SimSettings):
        self.s = settings
        self.started_at = time.time()
        # scheduling / sleep state
        self.scheduler_paused = False
        self.sleeping_tags: set[str] = set()
        self.sleep_level: int | None = None
        self._running_evt = asyncio.Event()  # set while the scheduler runs
        self._running_evt.set()
        self._admit_evt = asyncio.Event()  # set while new requests may start
        self._admit_evt.set()
        self._sleep_lock = asyncio.Lock()
        self.dead = False  # EngineDeadError: /health answers 503
        self.requests: dict[str, GenRequest] = {}  # running (admitted) requests
        self._slot_evt = asyncio.Event()  # a running slot was freed
        self._step_fut: asyncio.Future[None] | None = None
        self.waiting = 0
        self.served = 0
        # weights
        self.weights: bytearray | None = None
        self.weights_path: str | None = None
        self.weights_valid = True
        #: real tensors with --device (llmuxd/sim/device.py); None in ledger mode
        self.device: DeviceState | None = None
        # gpu
        self.ledger = (
            GpuLedger(settings.gpu_ledger, settings.gpu_capacity_mb) if settings.gpu_ledger else None
        )
        self.gpu_reserved_mb = 0
        link_dir = os.environ.get("LLMUX_SIM_LINK_DIR") or (
            settings.gpu_ledger + ".link" if settings.gpu_ledger else None)
        self.link = HostLink(settings.h2d_gbps, settings.d2h_gbps, link_dir)
        #: the level the weights went to sleep with (1 offloaded, 2 discarded), None while on the GPU
        self.weights_level: int | None = None
        # faults and history
        self.faults: dict[str, Fault] = {}
        self._hang_release = asyncio.Event()
        self.calls: list[dict[str, Any]] = []
        self.rpc_history: list[dict[str, Any]] = []
        self.op_durations: dict[str, list[float]] = {"sleep": [], "wake": [], "release_kv_cache_memory": []}
        self.prefix_cache_resets = 0
        self.worker_pids: list[int] = []

    # ------------------------------------------------------------------ start

    def load(self) -> None:
        """Cold start, before the port is bound: reserve GPU memory (may fail
        like CUDA OOM) and read the weights into host RAM; with --device, onto the device."""
        if self.s.device is not None:
            self._load_device()
            return
        if self.ledger is not None and self.s.gpu_mb > 0:
            self.ledger.reserve(self.s.gpu_mb, model=self.s.name)
            self.gpu_reserved_mb = self.s.gpu_mb
        if self.s.weights_mb > 0:
            self.weights_path = ensure_weights_file(self.s.cache_dir, self.s.model, self.s.weights_mb)
            self.weights = read_weights(self.weights_path, drop_cache=self.s.drop_cache)

    def _load_device(self) -> None:
        path = ensure_weights_file(self.s.cache_dir, self.s.model, self.s.weights_mb)
        self.weights_path = path
        self.device = DeviceState(import_torch(), self.s.device, path, self.s.weights_mb << 20,
                                  utilization=self.s.gpu_memory_utilization, kv_gib=self.s.kv_cache_gib,
                                  drop_cache=self.s.drop_cache)
        try:
            self.device.load()
        except BaseException:
            self.device.release()
            raise
        self._note_device()

    def _note_device(self) -> None:
        """With --device, gpu_reserved_mb reports what the tensors hold."""
        if self.device is not None:
            self.gpu_reserved_mb = self.device.state()["device_bytes"] >> 20

    async def _on_device(self, fn: Callable[[], Any]) -> None:
        """Run a device operation (copies of whole weights) off the event loop."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, fn)
        finally:
            self._note_device()

    def release_gpu(self) -> None:
        if self.device is not None:
            self.device.release()
            self._note_device()
        if self.ledger is not None and self.gpu_reserved_mb:
            try:
                self.ledger.release()
            except OSError:
                pass
            self.gpu_reserved_mb = 0

    # ---------------------------------------------------------------- faults

    def add_fault(self, kind: str, count: int | None, seconds: float | None) -> Fault:
        if kind not in FAULT_KINDS:
            raise SimError(400, f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}",
                           "Bad Request")
        default_count = -1 if kind in ("garbage", "latency", "sleep_keeps_memory", "engine_dead") else 1
        fault = Fault(kind, default_count if count is None else int(count), float(seconds or 0.0))
        if fault.count == 0:
            self.clear_fault(kind)
            return fault
        self.faults[kind] = fault
        if kind == "slow_start":
            path = self._slow_start_marker()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(str(fault.seconds))
        return fault

    def clear_fault(self, kind: str | None = None) -> None:
        kinds = [kind] if kind else list(self.faults)
        for k in kinds:
            self.faults.pop(k, None)
            if k == "slow_start":
                try:
                    os.unlink(self._slow_start_marker())
                except OSError:
                    pass
        if "hang_sleep" not in self.faults:
            self._hang_release.set()

    @property
    def engine_failed(self) -> bool:
        """The `engine_dead` fault is armed: vLLM's EngineDeadError."""
        return "engine_dead" in self.faults

    def take_fault(self, kind: str) -> Fault | None:
        """The pending fault of `kind`, consuming one use of it."""
        fault = self.faults.get(kind)
        if fault is None:
            return None
        if fault.count > 0:
            fault.count -= 1
            if fault.count == 0:
                del self.faults[kind]
        return fault

    def _slow_start_marker(self) -> str:
        safe = hashlib.sha256(self.s.name.encode()).hexdigest()[:16]
        return os.path.join(self.s.cache_dir, f"slow-start-{safe}")

    def consume_slow_start(self) -> float:
        """Seconds a previous process asked this start to take longer."""
        path = self._slow_start_marker()
        try:
            with open(path) as f:
                seconds = float(f.read().strip() or 0)
            os.unlink(path)
            return seconds
        except (OSError, ValueError):
            return 0.0

    # ------------------------------------------------------------ sleep/wake

    @property
    def is_sleeping(self) -> bool:
        return self.scheduler_paused or bool(self.sleeping_tags)

    @property
    def sleep_state(self) -> str:
        """vllm:engine_sleep_state's label."""
        if "weights" not in self.sleeping_tags:
            return "awake"
        return "weights_offloaded" if self.weights_level == 1 else "discard_all"

    def _gpu_target_mb(self) -> int:
        need = self.s.gpu_mb
        if not self.sleeping_tags:
            return need
        residue = min(self.s.gpu_residue_mb, need)
        weights = self.gpu_weights_mb
        mb = residue
        if "weights" not in self.sleeping_tags:
            mb += weights
        if "kv_cache" not in self.sleeping_tags:
            mb += need - residue - weights
        return mb

    @property
    def gpu_weights_mb(self) -> int:
        """The weights' part of the GPU need (LLMUX_SIM_GPU_WEIGHTS_MB, else a share of it)."""
        need = self.s.gpu_mb
        rest = need - min(self.s.gpu_residue_mb, need)
        if self.s.gpu_weights_mb is not None:
            return max(0, min(self.s.gpu_weights_mb, rest))
        return int(rest * WEIGHTS_SHARE)

    @property
    def transfer_bytes(self) -> int:
        """What crosses the host link when the weights move: the device tensors'
        size with --device, else the weights' part of the ledger reservation."""
        if self.device is not None:
            return self.device.weights_bytes
        return self.gpu_weights_mb << 20

    def _set_gpu(self, mb: int) -> None:
        if self.ledger is None or self.s.gpu_mb <= 0:
            return
        self.ledger.reserve(mb, model=self.s.name)  # raises GpuOutOfMemory
        self.gpu_reserved_mb = mb

    async def sleep(self, level: int, mode: str) -> None:
        async with self._sleep_lock:
            t0 = time.monotonic()
            if level >= 1 and self.take_fault("fail_sleep"):  # a level-0 pause moves nothing
                raise SimError(500, "Call to sleep method failed: simulated sleep failure (fault fail_sleep)")
            if self.take_fault("hang_sleep"):
                self._hang_release.clear()
                await self._hang_release.wait()
            self._admit_evt.clear()
            if mode == "wait":
                while self.requests:
                    await asyncio.sleep(0.01)
            elif mode == "abort":
                for req in list(self.requests.values()):
                    req.abort_evt.set()
            self.scheduler_paused = True
            self._running_evt.clear()
            if level >= 1 and "weights" not in self.sleeping_tags:
                # the executor sleeps once: weights offloaded (a copy to the host) or
                # discarded, and the KV cache (if a release has not freed it already)
                if self.s.sleep_time > 0:
                    await asyncio.sleep(self.s.sleep_time * level)
                keeps = self.take_fault("sleep_keeps_memory") is not None
                if level == 1 and not keeps:
                    await self._moving(D2H, self._device_sleep(level) if self.device is not None else None)
                elif self.device is not None and not keeps:
                    await self._on_device(self._device_sleep(level))
                self.sleeping_tags = set(EXECUTOR_TAGS)
                self.sleep_level = level
                self.weights_level = level
                if level >= 2:
                    self.weights = None  # discarded; wake gets fresh (garbage) memory
                if not keeps and self.device is None:
                    self._set_gpu(self._gpu_target_mb())  # freed once the copy is done
            elif self.sleep_level is None or level > self.sleep_level and "weights" not in self.sleeping_tags:
                self.sleep_level = level
            self.op_durations["sleep"].append(time.monotonic() - t0)

    async def _moving(self, direction: str, device_copy: Callable[[], None] | None) -> None:
        """Move the weights across the host link: the paced transfer, and with
        --device the real copy beside it (the slower of the two sets the time)."""
        paced = self.link.transfer(direction, self.transfer_bytes)
        if device_copy is None:
            await paced
        else:
            await asyncio.gather(self._on_device(device_copy), paced)

    async def release_kv_cache_memory(self) -> None:
        """vLLM 0.32's `/release_kv_cache_memory`: free the KV cache of a paused
        engine (after `/sleep?level=0`), so another model's weights may come in
        while this one's go out. The CPU worker refuses it."""
        async with self._sleep_lock:
            t0 = time.monotonic()
            if not self.scheduler_paused:
                raise SimError(500, "Call to release_kv_cache_memory method failed: "
                                    "release_kv_cache_memory() requires a completed pause first")
            if not self.s.selective_discard:
                raise SimError(500, "Call to release_kv_cache_memory method failed: Worker failed with "
                                    "error 'Selective discard is not supported on CPU.', please check the "
                                    "stack trace above for the root cause")
            if self.take_fault("fail_release"):
                raise SimError(500, "Call to release_kv_cache_memory method failed: simulated failure "
                                    "(fault fail_release)")
            if "kv_cache" not in self.sleeping_tags:
                self.sleeping_tags.add("kv_cache")
                if self.device is not None:
                    device = self.device
                    await self._on_device(device.free_kv)
                else:
                    self._set_gpu(self._gpu_target_mb())
            self.op_durations["release_kv_cache_memory"].append(time.monotonic() - t0)

    def _device_sleep(self, level: int) -> Callable[[], None]:
        device = self.device
        assert device is not None

        def run() -> None:
            if level >= 2:
                device.discard_weights()
            else:
                device.offload_weights()
            device.free_kv()
        return run

    async def _device_wake(self, woke: set[str]) -> None:
        """Bring the woken tags back onto the device (level 2 weights: fresh memory)."""
        device = self.device
        assert device is not None

        def run() -> None:
            if "weights" in woke:
                device.wake_weights()
            if "kv_cache" in woke:
                device.wake_kv()
        try:
            await self._on_device(run)
        except DeviceOutOfMemory as exc:
            raise SimError(500, f"Call to wake_up method failed: {exc}") from None

    async def wake_up(self, tags: list[str] | None) -> None:
        async with self._sleep_lock:
            t0 = time.monotonic()
            if self.take_fault("fail_wake"):
                raise SimError(500, "Call to wake_up method failed: simulated wake failure (fault fail_wake)")
            exec_tags = None if tags is None else [t for t in tags if t != "scheduling"]
            woke: set[str] = set()
            if exec_tags is None:
                woke = set(self.sleeping_tags)
            elif exec_tags and all(t in self.sleeping_tags for t in exec_tags):
                woke = set(exec_tags)
            if woke:
                if self.s.wake_time > 0:
                    await asyncio.sleep(self.s.wake_time * (self.sleep_level or 1))
                remaining = self.sleeping_tags - woke
                old = self.sleeping_tags
                self.sleeping_tags = remaining
                try:
                    if self.device is None:
                        self._set_gpu(self._gpu_target_mb())  # reserved before the copy: in transit counts
                    copy_in = "weights" in woke and self.weights_level == 1
                    if "weights" in woke and self.take_fault("fail_wake_midway"):
                        await self.link.transfer(H2D, self.transfer_bytes // 2)
                        raise SimError(500, "Call to wake_up method failed: simulated failure halfway "
                                            "through the weights (fault fail_wake_midway)")
                    if self.device is not None:
                        if copy_in:
                            await asyncio.gather(self._device_wake(woke), self.link.transfer(H2D, self.transfer_bytes))
                        else:
                            await self._device_wake(woke)
                    elif copy_in:
                        await self.link.transfer(H2D, self.transfer_bytes)
                except GpuOutOfMemory as exc:
                    self.sleeping_tags = old
                    raise SimError(500, f"Call to wake_up method failed: {exc}") from None
                except SimError:
                    self.sleeping_tags = old
                    raise
                if "weights" in woke:
                    level, self.weights_level = self.weights_level, None
                    if level == 2:
                        self.weights_valid = False  # vLLM #29341: needs reload_weights
                if "weights" in woke and self.weights is None and self.s.weights_mb > 0 and self.device is None:
                    self.weights = bytearray(self.s.weights_mb << 20)  # fresh, not loaded
            if tags is None or "scheduling" in (tags or []) or (woke and not self.sleeping_tags):
                if not self.sleeping_tags:
                    self.scheduler_paused = False
            if not self.is_sleeping:
                self.sleep_level = None
                self._running_evt.set()
                self._admit_evt.set()
            self.op_durations["wake"].append(time.monotonic() - t0)

    def pause(self) -> None:
        self.scheduler_paused = True
        self._running_evt.clear()
        self._admit_evt.clear()

    def resume(self) -> None:
        if not self.sleeping_tags:
            self.scheduler_paused = False
            self._running_evt.set()
            self._admit_evt.set()

    async def collective_rpc(self, method: str) -> list[Any] | None:
        self.rpc_history.append({"method": method, "time": time.time()})
        if method == "reload_weights":
            if self.take_fault("fail_reload"):
                raise SimError(500, "Call to collective_rpc method failed: simulated reload_weights "
                                    "failure (fault fail_reload)")
            if "weights" in self.sleeping_tags:
                raise SimError(500, "Call to collective_rpc method failed: reload_weights needs the "
                                    "weights awake; call /wake_up?tags=weights first")
            wrong = self.take_fault("wrong_reload") is not None
            paced = self.link.transfer(H2D, self.transfer_bytes)  # the weights come back over the link
            if self.device is not None:
                device = self.device
                await asyncio.gather(self._on_device(lambda: device.reload(corrupt=wrong)), paced)
            elif self.weights_path is not None:
                self.weights = (await asyncio.gather(asyncio.get_running_loop().run_in_executor(
                    None, read_weights, self.weights_path, self.weights, self.s.drop_cache
                ), paced))[0]
            else:
                await paced
            # without --device no answer reads the bytes: a wrong reload shows as garbage
            self.weights_valid = not (wrong and self.device is None)
            return None
        if method in ("suspend_nccl", "resume_nccl"):
            return None
        return [None] * self.s.tp

    # ------------------------------------------------------------ generation

    def new_request(self, prefix: str, prompt: str, max_tokens: int | None,
                    temperature: float, seed: int | None) -> GenRequest:
        """A request; `max_tokens=None` means "until the model stops", a length
        of 8-32 tokens derived from the prompt (finish_reason "stop")."""
        basis = hashlib.sha256(f"{self.s.name}\0{prompt}".encode()).digest()
        if temperature > 0 and seed is None:
            rng = random.Random(os.urandom(16))
        else:
            rng = random.Random(int.from_bytes(basis, "big") ^ (seed or 0))
        if max_tokens is None:
            n, natural = 8 + basis[0] % 25, True
        else:
            n, natural = max(0, int(max_tokens)), False
        rid = f"{prefix}-{hashlib.sha256(os.urandom(8)).hexdigest()[:16]}"
        garbage = self.take_fault("garbage") is not None
        sampled = temperature > 0 and seed is None
        greedy_basis = None if sampled else int.from_bytes(basis, "big") ^ (seed or 0)
        return GenRequest(rid, prompt, n, natural, rng, garbage, basis=greedy_basis)

    async def _step(self, delay: float) -> None:
        """Wait for the next engine step. One timer for all running requests,
        which advance a token per step together, as in vLLM's batches."""
        fut = self._step_fut
        if fut is None or fut.done():
            loop = asyncio.get_running_loop()
            fut = self._step_fut = loop.create_future()
            loop.call_later(delay, _resolve, fut)
        await asyncio.shield(fut)

    async def _admit(self, req: GenRequest) -> None:
        """Hold a new request while the scheduler is paused (asleep) or all
        `max_num_seqs` slots are taken; vLLM never rejects it."""
        self.waiting += 1
        try:
            latency = self.faults.get("latency")
            if latency is not None:
                self.take_fault("latency")
                await asyncio.sleep(latency.seconds)
            while True:
                if self.dead:
                    await asyncio.Event().wait()  # the engine is gone: never answers
                if not self._admit_evt.is_set():
                    await self._admit_evt.wait()
                elif len(self.requests) >= self.s.max_num_seqs:
                    self._slot_evt.clear()
                    await self._slot_evt.wait()
                else:
                    break
        finally:
            self.waiting -= 1
        self.requests[req.rid] = req
        if not self.weights_valid:
            req.garbage = True
        if self.device is not None:
            # the answer is a function of the bytes the weights hold now
            req.checksum = self.device.checksum()
            if req.basis is not None:
                req.rng = random.Random(req.basis ^ int(req.checksum or "0", 16))

    async def generate(self, req: GenRequest) -> AsyncIterator[str]:
        """Yield the tokens of `req`, honouring sleep (hold), abort and keep.
        Sets `req.finish_reason` when done."""
        await self._admit(req)
        delay = 1.0 / self.s.tokens_per_s if self.s.tokens_per_s > 0 else 0.0
        try:
            for i in range(req.max_tokens):
                if not self._running_evt.is_set() and not req.abort_evt.is_set():
                    await _first(self._running_evt, req.abort_evt)  # mode=keep freezes here
                if req.abort_evt.is_set():
                    req.finish_reason = "abort"
                    return
                if delay:
                    await self._step(delay)
                if self.dead:
                    await asyncio.Event().wait()
                if req.abort_evt.is_set() or (req.client_alive and not req.client_alive()):
                    req.finish_reason = "abort"
                    return
                req.produced += 1
                if req.garbage:
                    yield GARBAGE_MARK if i == 0 else "!"
                else:
                    yield " " + req.rng.choice(_WORDS)
            req.finish_reason = "stop" if req.natural_stop else "length"
        finally:
            if self.requests.pop(req.rid, None) is not None:
                self.served += 1
                self._slot_evt.set()

    def embedding(self, text: str, garbage: bool) -> list[float]:
        if garbage:
            return [0.0] * self.s.embed_dim
        seed = int.from_bytes(hashlib.sha256(f"{self.s.name}\0{text}".encode()).digest(), "big")
        rng = random.Random(seed)
        vec = [rng.gauss(0.0, 1.0) for _ in range(self.s.embed_dim)]
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [round(v / norm, 7) for v in vec]

    def kill_engine(self) -> None:
        """SIGTERM with requests in flight: the engine dies, the requests never
        get an answer (vLLM with --shutdown-timeout 0)."""
        self.dead = True
        self._admit_evt.set()
        self._running_evt.set()

    # ---------------------------------------------------------------- report

    @property
    def _weights_loaded(self) -> bool:
        if self.device is not None:
            return self.device.weights is not None or self.device.host_copy is not None
        return self.weights is not None

    @property
    def _weights_bytes(self) -> int:
        if self.device is not None:
            return self.device.weights_bytes if self._weights_loaded else 0
        return len(self.weights) if self.weights is not None else 0

    def state(self) -> dict[str, Any]:
        return {
            "model": self.s.model,
            "served_model_names": self.s.served_names,
            "pid": os.getpid(),
            "is_sleeping": self.is_sleeping,
            "sleep_level": self.sleep_level,
            "weights_level": self.weights_level,
            "sleeping_tags": sorted(self.sleeping_tags),
            "scheduler_paused": self.scheduler_paused,
            "sleep_state": self.sleep_state,
            "dev_mode": self.s.dev_mode,
            "weights_loaded": self._weights_loaded,
            "weights_valid": self.weights_valid,
            "weights_bytes": self._weights_bytes,
            "weights_checksum": self.device.checksum() if self.device is not None else None,
            "device": self.device.state() if self.device is not None else None,
            "weights_path": self.weights_path,
            "gpu_ledger": self.s.gpu_ledger,
            "gpu_need_mb": self.s.gpu_mb,
            "gpu_reserved_mb": self.gpu_reserved_mb,
            "tp": self.s.tp,
            "worker_pids": self.worker_pids,
            "faults": {k: {"count": f.count, "seconds": f.seconds} for k, f in self.faults.items()},
            "calls": self.calls[-200:],
            "collective_rpc": self.rpc_history,
            "prefix_cache_resets": self.prefix_cache_resets,
            "requests_running": len(self.requests),
            "requests_waiting": self.waiting,
            "requests_served": self.served,
            "ignored_flags": self.s.ignored_flags,
            "uptime_s": round(time.time() - self.started_at, 3),
        }


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
