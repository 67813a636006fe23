"""Free TCP ports for tests, never the same one twice in one run.

Binding port 0 and closing the socket lets the kernel hand the same port out again on
the next call; a daemon whose listen port came back as a model's port then refused its
own config (CI saw it once in ~2,000 tests). Remembering what was handed out closes that.
"""

from __future__ import annotations

import socket

_handed_out: set[tuple[str, int]] = set()


def free_port(ip: str = "127.0.0.1") -> int:
    """A port on `ip` that is free now and that this process has not handed out before."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        if (ip, port) not in _handed_out:
            _handed_out.add((ip, port))
            return port
    raise RuntimeError(f"no fresh free port on {ip} after 1000 tries")
