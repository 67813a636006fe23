"""sd_notify: tell systemd how llmuxd is doing (Type=notify, WatchdogSec=).

The protocol is one datagram per notification to the AF_UNIX socket named by
$NOTIFY_SOCKET ("@name" is the abstract namespace), holding newline-separated
KEY=VALUE lines. It is small enough to speak directly, which keeps the daemon
free of libsystemd and lets the tests read the datagrams off a socket of their
own. Every send is best effort: a daemon that cannot reach systemd keeps
serving, and without $NOTIFY_SOCKET (tests, embedded mode) nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> str | bytes:
    """$NOTIFY_SOCKET as a connect() address: '@x' is the abstract socket '\\0x'."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when
    systemd is not watching this process."""
    env = os.environ if env is None else env
    raw = env.get(WATCHDOG_USEC_ENV)
    if not raw:
        return None
    watched_pid = env.get(WATCHDOG_PID_ENV)
    if watched_pid and watched_pid != str(os.getpid() if pid is None else pid):
        return None  # the watchdog belongs to another process (e.g. our parent)
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a number of microseconds", WATCHDOG_USEC_ENV, raw)
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


class Notifier:
    """Sends sd_notify datagrams; a no-op without $NOTIFY_SOCKET.

    The helpers below are the whole vocabulary llmuxd uses: READY=1 once the
    bus name is owned, units are adopted and HTTP is served; STATUS= whenever
    the switcher's picture changes; RELOADING=1 / READY=1 around a reload;
    STOPPING=1 on SIGTERM; WATCHDOG=1 from the event loop.
    """

    def __init__(self, address: str | None = None, *, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.address = address if address is not None else env.get(NOTIFY_SOCKET_ENV) or None
        self._env = env
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str, **fields: object) -> bool:
        """Send one datagram of KEY=VALUE lines; True if systemd got it."""
        if not self.address:
            return False
        parts = list(lines) + [f"{key}={value}" for key, value in fields.items()]
        payload = "\n".join(parts).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, socket_address(self.address))
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise flood the log
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            self._last_status = status
            lines.append(f"STATUS={status}")
        return self.send(*lines, MAINPID=os.getpid())

    def status(self, text: str) -> bool:
        """STATUS=text, sent only when it differs from the last one sent."""
        if text == self._last_status:
            return True
        self._last_status = text
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str = "stopping") -> bool:
        self._last_status = status
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (a long adoption or drain)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        return watchdog_interval(self._env) if self.enabled else None

    async def run_watchdog(self, interval: float | None = None) -> None:
        """Ping WATCHDOG=1 every `interval` seconds (default: half of
        $WATCHDOG_USEC) until cancelled. It runs as a task on the event loop,
        so a loop that stops turning stops the pings and systemd restarts us."""
        interval = self.watchdog_interval() if interval is None else interval
        if not interval:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def format_status(active: list[str], sleeping: int, queued: int, *, switching: str | None = None,
                  pinned: str | None = None) -> str:
    """The STATUS= line `systemctl status llmuxd` shows, e.g.
    'active: qwen · 2 sleeping · 0 queued'."""
    head = f"switching: {switching}" if switching else f"active: {', '.join(active) or 'none'}"
    parts = [head, f"{sleeping} sleeping", f"{queued} queued"]
    if pinned:
        parts.append(f"pinned: {pinned}")
    return " · ".join(parts)
