"""`llmuxd`: the daemon's command line.

    llmuxd [--config FILE]                  system mode (systemd service; llmuxd/daemon/system.py)
    llmuxd run --config FILE [--listen A] [--bus auto|session|none]
                                            embedded mode: subprocess backends, no root, no system
                                            bus; D-Bus on the session bus when there is one
    llmuxd check-config [--strict] [FILE]   validate a config and print the effective result
    llmuxd checkpoint|restore|validate MODEL  operator tools (llmuxd/daemon/tools.py)

Subcommands are imported only when chosen, so `llmuxd --help` and
`check-config` stay fast and work with parts of the daemon missing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Callable, List, Optional

from llmuxd.daemon import eventloop

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
OPEN_FILES_WITHOUT_HARD_LIMIT = 1 << 20  # the kernel's default fs.nr_open


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, type=str.lower,
                        help="log verbosity (default info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmuxd",
        description="llmux daemon: several vLLM models behind one OpenAI-compatible endpoint.",
    )
    parser.add_argument("--config", default=None,
                        help="config file for system mode (default /etc/llmux/llmux.yaml)")
    _add_log_level(parser)
    eventloop.add_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="embedded mode: backends as subprocesses, HTTP on the configured address",
        description="Run llmux in the foreground as an ordinary user: backends are child "
                    "processes, no systemd or system bus needed. SIGHUP reloads the config file; "
                    "SIGTERM/Ctrl-C stops it and them.",
    )
    run.add_argument("--config", "-c", required=True, help="config file (YAML, or llmux 0.7 JSON)")
    run.add_argument("--listen", default=None,
                     help="override `listen:` (host:port or unix:/path), e.g. 127.0.0.1:3000")
    run.add_argument("--dropin-dir", default=None, help="models.d directory (default: beside the config)")
    run.add_argument("--bus", default="auto", choices=("auto", "session", "none"),
                     help="where to offer io.llmux.LLMux1 (llmuxctl --user): session = the session bus, "
                          "failing if there is none; none = no D-Bus; auto (default) = the session bus "
                          "when DBUS_SESSION_BUS_ADDRESS is set and reachable, else none")
    _add_log_level(run)
    eventloop.add_option(run)

    sub.add_parser("check-config", add_help=False,
                   help="validate a config and print the effective result (see check-config --help)")

    # operator tools: llmux 0.7's --validate / --checkpoint / --restore-detached
    from llmuxd.daemon.tools import add_tool_parsers

    add_tool_parsers(sub)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr)
    if level != "debug":  # aiohttp's per-request noise is only worth seeing when debugging
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _load(path: str, dropin_dir: Optional[str]) -> Any:
    """The config, or None after printing each problem (FILE: key: what; fix)."""
    from llmuxd.config import ConfigError, load_config

    try:
        return load_config(path, dropin_dir)
    except ConfigError as exc:
        for issue in getattr(exc, "issues", [exc]):
            print(issue, file=sys.stderr)
        return None
    except OSError as exc:
        print(f"{path}: cannot read the config: {exc.strerror}", file=sys.stderr)
        return None


def raise_open_file_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one. Every proxied request holds
    two sockets (client and backend), and an ordinary user's soft limit is
    usually 1024, so a few hundred concurrent requests would fail with 'Too
    many open files' in embedded mode (system mode's unit sets LimitNOFILE)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_WITHOUT_HARD_LIMIT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit: only very many concurrent requests need more


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    raise_open_file_limit()
    config = _load(args.config, args.dropin_dir)
    if config is None:
        return 1
    from llmuxd.daemon.embedded import run_embedded

    try:
        return eventloop.run(run_embedded(config, listen=args.listen, config_path=args.config,
                                          dropin_dir=args.dropin_dir, bus=args.bus), args.event_loop)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


def cmd_check_config(argv: List[str]) -> int:
    from llmuxd.daemon.checkconfig import main as check_main

    return check_main(argv)


# -- slot: system mode --------------------------------------------------------
# The default command (no subcommand) is the systemd service. It lives in
# llmuxd/daemon/system.py (the service room), which provides either
# `main(argv) -> int` or `async def run_system(args) -> int`; it is imported
# only here, so the rest of llmuxd works before it exists.
SYSTEM_MODULE = "llmuxd.daemon.system"


def cmd_system(args: argparse.Namespace, argv: List[str]) -> int:
    try:
        system = importlib.import_module(SYSTEM_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != SYSTEM_MODULE:
            raise
        print("llmuxd: system mode not available in this build; "
              "use `llmuxd run --config FILE` (embedded mode)", file=sys.stderr)
        return 2
    entry: Optional[Callable[..., Any]] = getattr(system, "main", None)
    if entry is not None:
        return int(entry(argv) or 0)
    setup_logging(args.log_level)
    return eventloop.run(system.run_system(args), args.event_loop)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check-config":
        return cmd_check_config(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if getattr(args, "tool", None):
        from llmuxd.daemon.tools import run_tool

        setup_logging(args.log_level)
        return run_tool(args)
    return cmd_system(args, argv)


if __name__ == "__main__":
    sys.exit(main())
