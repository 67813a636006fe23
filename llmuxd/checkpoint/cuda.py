"""cuda_suspend: `cuda-checkpoint --toggle --pid P` on every CUDA process of a backend.

The toggle moves a process's device memory to host RAM (suspend) and back
(resume); the same command does both, so the state is asked first where the
driver can say (`--get-state`, drivers >= 550) and a toggle that would go the
wrong way is not sent. Toggles run in parallel, as llmux 0.7 did. With tensor
parallelism the NCCL communicators must be torn down first and rebuilt after
(`collective_rpc suspend_nccl` / `resume_nccl`, llmux 0.7 A.11).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Sequence

from llmuxd.checkpoint.command import run_tool
from llmuxd.checkpoint.errors import CheckpointError

log = logging.getLogger("llmuxd.checkpoint.cuda")

TOGGLE_TIMEOUT = 300.0
STATE_TIMEOUT = 30.0
#: states `cuda-checkpoint --get-state` prints
RUNNING = "running"
CHECKPOINTED = "checkpointed"
LOCKED = "locked"


class CudaCheckpointTool:
    """The `cuda-checkpoint` executable at `path`, run (optionally) through
    `command_prefix` (e.g. nsenter into the PID namespace the PIDs belong to)."""

    def __init__(self, path: str = "cuda-checkpoint", *, command_prefix: Sequence[str] = (),
                 timeout: float = TOGGLE_TIMEOUT):
        self.path = path
        self.command_prefix = list(command_prefix)
        self.timeout = timeout

    async def _run(self, *args: str, timeout: float) -> tuple[int, str]:
        try:
            result = await run_tool([*self.command_prefix, self.path, *args], timeout)
        except OSError as exc:
            raise FileNotFoundError(
                f"cannot run {self.path!r}: {exc.strerror or exc}; install NVIDIA's cuda-checkpoint or set "
                "checkpoint.cuda_checkpoint_path") from None
        return (124, f"no answer within {timeout:.0f}s") if result is None else result

    async def get_state(self, pid: int) -> str | None:
        """'running', 'checkpointed', 'locked', ... or None when the driver cannot
        say or `pid` is not a CUDA process."""
        code, out = await self._run("--get-state", "--pid", str(pid), timeout=STATE_TIMEOUT)
        if code != 0:
            return None
        state = out.split()[-1].lower() if out.split() else ""
        return state or None

    async def toggle(self, pid: int) -> None:
        code, out = await self._run("--toggle", "--pid", str(pid), timeout=self.timeout)
        if code != 0:
            raise RuntimeError(f"cuda-checkpoint --toggle --pid {pid} failed (exit {code}): {out[-300:]}")

    async def cuda_pids(self, pids: Sequence[int]) -> list[int]:
        """Those of `pids` that are CUDA processes: by --get-state when the driver
        answers it, else by a /dev/nvidia mapping in /proc/PID/maps."""
        states = await asyncio.gather(*(self.get_state(pid) for pid in pids))
        found = [pid for pid, state in zip(pids, states) if state is not None]
        if found:
            return found
        return [pid for pid in pids if _maps_nvidia(pid)]


def _maps_nvidia(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("/dev/nvidia" in line for line in f)
    except OSError:
        return False


RpcCall = Callable[[str], Awaitable[Any]]


async def _toggle_all(tool: CudaCheckpointTool, pids: Sequence[int], want: str) -> None:
    """Toggle every pid not already in state `want`, in parallel; one error names them all."""

    async def one(pid: int) -> None:
        state = await tool.get_state(pid)
        if state == want:
            log.info("pid %d is already %s; not toggled", pid, want)
            return
        await tool.toggle(pid)

    results = await asyncio.gather(*(one(pid) for pid in pids), return_exceptions=True)
    errors = [str(r) for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError("; ".join(errors))


async def suspend(model: str, tool: CudaCheckpointTool, pids: Sequence[int], *,
                  tensor_parallel: int = 1, rpc: RpcCall | None = None) -> list[int]:
    """Suspend every CUDA process among `pids`; returns the PIDs toggled.

    TP>1: suspend_nccl first. A failure raises CheckpointError (the caller
    escalates to stop: a half-suspended TP group cannot serve)."""
    cuda = await tool.cuda_pids(pids)
    if not cuda:
        raise CheckpointError(model, "sleep", f"no CUDA process among the backend's processes {list(pids)}; "
                                              "cuda_suspend needs a GPU backend — choose another eviction")
    try:
        if tensor_parallel > 1 and rpc is not None:
            await rpc("suspend_nccl")
        await _toggle_all(tool, cuda, CHECKPOINTED)
    except FileNotFoundError as exc:
        raise CheckpointError(model, "sleep", str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(model, "sleep", f"cuda_suspend failed: {exc}") from None
    log.info("model %s: CUDA state of pids %s suspended", model, cuda)
    return cuda


async def resume(model: str, tool: CudaCheckpointTool, pids: Sequence[int], *,
                 tensor_parallel: int = 1, rpc: RpcCall | None = None) -> None:
    """Toggle the suspended `pids` back, then resume_nccl for TP>1."""
    try:
        await _toggle_all(tool, pids, RUNNING)
        if tensor_parallel > 1 and rpc is not None:
            await rpc("resume_nccl")
    except FileNotFoundError as exc:
        raise CheckpointError(model, "wake", str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(model, "wake", f"cuda resume failed: {exc}") from None
    log.info("model %s: CUDA state of pids %s resumed", model, list(pids))


def tool_available(path: str) -> bool:
    from shutil import which

    return bool(which(path)) or (os.path.isabs(path) and os.access(path, os.X_OK))
