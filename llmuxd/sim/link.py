"""The host link (PCIe / NVLink-C2C) that weights cross on sleep and wake.

`--h2d-gbps` / `--d2h-gbps` give the bandwidth each way in GB/s (10^9 bytes).
The two directions are independent: one transfer each way at once does not
slow the other (a full-duplex link). Transfers the same way share it: each
gets 1/n of the bandwidth while n run, as copies on one link do.

Simulators are separate processes, so "the transfers that run" are marker
files in a directory shared by every simulator on the host (next to the GPU
ledger): one file per transfer, named after its direction and owner pid. A
transfer advances in small ticks at the rate its share gives it now, so a
second transfer that starts or ends midway changes the rest of the first one.
Markers of dead processes are ignored (a SIGKILLed simulator's copy ended
with it). Without a directory only this process's transfers share the link.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Dict, Optional

H2D = "h2d"
D2H = "d2h"
#: seconds between two rate updates of a running transfer
TICK = 0.01
_ids = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostLink:
    """Paces transfers to the configured bandwidth, shared per direction."""

    def __init__(self, h2d_gbps: float, d2h_gbps: float, directory: Optional[str] = None):
        self.gbps = {H2D: max(0.0, h2d_gbps), D2H: max(0.0, d2h_gbps)}
        self.directory = directory
        self._local: Dict[str, int] = {H2D: 0, D2H: 0}

    def seconds_alone(self, direction: str, nbytes: int) -> float:
        """How long `nbytes` take with the link to themselves (0: unlimited)."""
        gbps = self.gbps[direction]
        return nbytes / (gbps * 1e9) if gbps > 0 and nbytes > 0 else 0.0

    def running(self, direction: str) -> int:
        """Transfers the same way now (this one included), on the whole host."""
        if self.directory is None:
            return self._local[direction]
        try:
            names = os.listdir(self.directory)
        except OSError:
            return self._local[direction]
        n = 0
        for name in names:
            parts = name.split("-")
            if len(parts) == 3 and parts[0] == direction and parts[1].isdigit() and _pid_alive(int(parts[1])):
                n += 1
        return max(n, self._local[direction])

    async def transfer(self, direction: str, nbytes: int) -> float:
        """Wait as long as moving `nbytes` takes; returns the seconds it took."""
        gbps = self.gbps[direction]
        if gbps <= 0 or nbytes <= 0:
            return 0.0
        began = time.monotonic()
        marker = self._mark(direction)
        self._local[direction] += 1
        try:
            left = float(nbytes)
            last = began
            while left > 0:
                rate = gbps * 1e9 / max(1, self.running(direction))
                await asyncio.sleep(min(TICK, left / rate))
                now = time.monotonic()
                left -= rate * (now - last)
                last = now
        finally:
            self._local[direction] -= 1
            if marker is not None:
                try:
                    os.unlink(marker)
                except OSError:
                    pass
        return time.monotonic() - began

    def _mark(self, direction: str) -> Optional[str]:
        if self.directory is None:
            return None
        try:
            os.makedirs(self.directory, exist_ok=True)
            try:
                os.chmod(self.directory, 0o1777)  # simulators may run as other users
            except OSError:
                pass
            path = os.path.join(self.directory, f"{direction}-{os.getpid()}-{next(_ids)}")
            with open(path, "w"):
                pass
            return path
        except OSError:
            return None
