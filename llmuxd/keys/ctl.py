"""`llmuxctl keys add | list | revoke`: key files in keys_dir, by hand-safe means.

`add` prints the new secret alone on stdout (so `KEY=$(llmuxctl keys add x)`
works) and everything else on stderr; the secret is not stored anywhere.
Changes take effect when llmuxd reloads, which this command does not do on its
own: the operator decides when (`systemctl reload llmuxd`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

from llmuxd.keys.admin import KeyAdminError, add_key, revoke_key
from llmuxd.keys.files import DEFAULT_KEYS_DIR, keys_dir_of, read_keys

EXIT_FAILED, EXIT_USAGE = 1, 2
RELOAD_HINT = "apply it with: systemctl reload llmuxd (embedded: kill -HUP the llmuxd run process)"


class KeysCtlError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys: add, list, revoke (files in keys_dir)")
    keys.add_argument("--dir", default=None, metavar="DIR",
                      help="the keys directory (default: keys_dir of the config, else /etc/llmux/keys.d)")
    keys.add_argument("--config", default=None, metavar="FILE",
                      help="the config whose keys_dir to use (default /etc/llmux/llmux.yaml)")
    ksub = keys.add_subparsers(dest="keys_command", metavar="add|list|revoke")
    ksub.required = True
    add = ksub.add_parser("add", help="new key: prints its secret once, alone on stdout")
    add.add_argument("name")
    add.add_argument("--models", nargs="+", metavar="MODEL", help="names or globs it may use (default all)")
    add.add_argument("--max-in-flight", type=int, metavar="N")
    add.add_argument("--rate", metavar="R[/s]", help="requests per second (or R/m, R/h)")
    add.add_argument("--burst", type=int, metavar="B", help="requests at once before the rate applies")
    add.add_argument("--priority", choices=["interactive", "batch"])
    add.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (from 00:00 UTC) or an ISO time")
    add.add_argument("--control", action="store_true", default=None, help="may use control routes over HTTP")
    add.add_argument("--description", metavar="TEXT")
    ksub.add_parser("list", help="the keys (no secrets), with use counts when llmuxd answers")
    rev = ksub.add_parser("revoke", help="remove a key (in force until llmuxd reloads)")
    rev.add_argument("name")


def keys_directory(args: argparse.Namespace) -> str:
    """--dir, else the config's keys_dir, else the default."""
    if args.dir:
        return args.dir
    from llmuxd.config import ConfigError, load_config

    try:
        return keys_dir_of(load_config(args.config))[0]
    except ConfigError as exc:
        if args.config:
            raise KeysCtlError(f"cannot read {args.config} for keys_dir: {str(exc).splitlines()[0]}; "
                               "fix it or give --dir") from None
        return DEFAULT_KEYS_DIR  # no config here: the default place


def run(args: argparse.Namespace, usage: Optional[dict]) -> int:
    directory = keys_directory(args)
    if args.keys_command == "add":
        return _add(args, directory)
    if args.keys_command == "revoke":
        try:
            path = revoke_key(directory, args.name)
        except KeyAdminError as exc:
            raise KeysCtlError(str(exc)) from None
        print(f"key '{args.name}' removed from {path}; {RELOAD_HINT}", file=sys.stderr)
        if args.json:
            print(json.dumps({"revoked": args.name, "file": path}))
        return 0
    return _list(args, directory, usage)


def _add(args: argparse.Namespace, directory: str) -> int:
    fields = {"models": args.models, "max_in_flight": args.max_in_flight, "rate": args.rate, "burst": args.burst,
              "priority": args.priority, "expires": args.expires, "control": args.control,
              "description": args.description}
    try:
        written = add_key(directory, args.name, fields)
    except KeyAdminError as exc:
        raise KeysCtlError(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        raise KeysCtlError(f"cannot write the key into {directory}: {exc.strerror or exc}") from None
    print(f"key '{written.key.id}' written to {written.path} ({written.ownership}); {RELOAD_HINT}", file=sys.stderr)
    print("the secret follows on stdout, shown this once: it is not stored anywhere", file=sys.stderr)
    print(written.secret, flush=True)
    return 0


def _list(args: argparse.Namespace, directory: str, usage: Optional[dict]) -> int:
    from llmuxd.config import ConfigError

    try:
        keys, warnings = read_keys(directory, explicit=True, environ={})
    except ConfigError as exc:
        raise KeysCtlError("the key files have problems (llmuxd keeps its previous keys until they are fixed):\n"
                           + str(exc)) from None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    now = time.time()
    rows = []
    for key in keys:
        use = (usage or {}).get(key.id, {})
        rows.append({
            "id": key.id, "models": list(key.models), "limits": key.describe_limits(),
            "priority": key.priority.value, "control": key.control,
            "expires": key.expires.isoformat() if key.expires else None, "expired": key.expired(),
            "file": key.source, "requests": use.get("requests") if usage is not None else None,
            "in_flight": use.get("in_flight") if usage is not None else None,
            "last_used_usec": use.get("last_used_usec") if usage is not None else None,
        })
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    from llmuxd.ctl import _ago

    table = [("KEY", "MODELS", "LIMITS", "PRIORITY", "CONTROL", "EXPIRES", "REQUESTS", "IN-FLIGHT", "LAST USE")]
    for r in rows:
        expires = "never" if not r["expires"] else r["expires"][:19].replace("T", " ") + (" (expired)" if r["expired"] else "")
        counted = usage is not None
        table.append((r["id"], ",".join(r["models"]), r["limits"], r["priority"], "yes" if r["control"] else "no",
                      expires, str(r["requests"] or 0) if counted else "-", str(r["in_flight"] or 0) if counted else "-",
                      _ago(r["last_used_usec"] or 0, now) if counted else "-"))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    if usage is None:
        print("(llmuxd did not answer on the bus: no use counts)", file=sys.stderr)
    print(f"{len(rows)} key(s) in {directory}", file=sys.stderr)
    return 0
