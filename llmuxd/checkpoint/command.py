"""Running a checkpoint tool (criu, cuda-checkpoint) once: its exit status and output, bounded."""

from __future__ import annotations

import asyncio
from typing import Sequence


async def run_tool(argv: Sequence[str], timeout: float) -> tuple[int, str] | None:
    """(exit status, stdout and stderr together, stripped) of `argv`; None when it gave no
    answer within `timeout` seconds (it is killed and reaped).

    Raises OSError when `argv[0]` cannot be started: each tool words its own fix.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    return proc.returncode or 0, out.decode(errors="replace").strip()
