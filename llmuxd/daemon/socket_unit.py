"""Which address serves under the service: llmux.socket's, not the config's.

Under systemd, llmuxd serves on the socket llmux.socket hands over, whatever
`listen` (or llmux 0.7's `port`) says. When the two differ, check-config and
the journal at start say which address serves and how to move it: a drop-in
for llmux.socket. check-config reads the unit files (as systemd would, with
drop-ins); the daemon compares what it was actually handed.
"""

from __future__ import annotations

import glob
import os
from typing import Iterable, List, Optional, Tuple

from llmuxd.config.values import parse_listen

SOCKET_UNIT = "llmux.socket"
#: where systemd looks for units, most important first (systemd.unit(5))
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")


def _listen_lines(path: str) -> Optional[List[str]]:
    """The ListenStream= values of a unit file's [Socket] section, in order ("" resets)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    section, out = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Socket" and line.split("=", 1)[0].strip() == "ListenStream":
            out.append(line.split("=", 1)[1].strip())
    return out


def socket_unit_streams(root: str = "/") -> Optional[List[str]]:
    """llmux.socket's effective ListenStream= addresses (drop-ins applied), or None
    when no such unit is installed under `root`."""
    dirs = [os.path.join(root, d.lstrip("/")) for d in UNIT_DIRS]
    main = next((os.path.join(d, SOCKET_UNIT) for d in dirs if os.path.isfile(os.path.join(d, SOCKET_UNIT))), None)
    if main is None:
        return None
    streams: List[str] = []
    dropins = {}
    for d in reversed(dirs):  # a drop-in of the same name in a more important directory wins
        for path in glob.glob(os.path.join(glob.escape(d), SOCKET_UNIT + ".d", "*.conf")):
            dropins[os.path.basename(path)] = path
    for path in [main] + [dropins[name] for name in sorted(dropins)]:
        for value in _listen_lines(path) or []:
            if value == "":
                streams = []
            else:
                streams.append(value)
    return streams


def _key(address: str) -> Optional[Tuple[str, str, int]]:
    """(kind, host, port) of a `listen` value or a ListenStream= value ("3000": every host)."""
    text = address.strip()
    if text.isdigit():
        return ("tcp", "*", int(text))
    if text.startswith("/"):
        return ("unix", text, 0)
    try:
        kind, host, port = parse_listen(text)
    except ValueError:
        return None
    return (kind, "*" if host in ("::", "0.0.0.0") and kind == "tcp" else host, port)


def served_elsewhere(listen: str, served: Iterable[str]) -> bool:
    """True when `listen` is not among the addresses that serve."""
    want = _key(listen)
    served = [s for s in served if s]
    return bool(served) and want is not None and all(_key(s) != want for s in served)


def listen_not_served(listen: str, served: List[str]) -> str:
    """One line: which address serves instead of `listen`, and how to move it."""
    target = listen[len("unix:"):] if listen.startswith("unix:") else listen
    return (
        f"{listen!r} is not served under the service: llmux.socket hands over {', '.join(served)}, which serves "
        f"instead (systemd holds the socket); to serve on {listen}, move the socket with a drop-in: "
        f"`systemctl edit llmux.socket` with the lines '[Socket]', 'ListenStream=', 'ListenStream={target}', "
        "then `systemctl restart llmux.socket llmuxd`"
    )
