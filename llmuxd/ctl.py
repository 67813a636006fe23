"""llmuxctl: control llmuxd over D-Bus.

    llmuxctl status                      models, states, queues
    llmuxctl switch [--force] MODEL      switch and show progress; exit status by result
                                         (--force: in manual mode, move the pin to MODEL)
    llmuxctl pin MODEL | unpin | mode auto|manual
    llmuxctl sleep MODEL [EVICTION] | wake MODEL
    llmuxctl eviction MODEL [EVICTION | --reset]
    llmuxctl reload
    llmuxctl logs MODEL [JOURNALCTL-ARGS...]
    llmuxctl fleet HOST_URL...           several hosts' state, and a LiteLLM config for them (HTTP, no bus)
    llmuxctl keys add NAME [--models M...] [--max-in-flight N] [--rate R[/s] --burst B]
                  [--priority batch] [--expires DATE] [--control] [--dir DIR]
                                         new API key: the secret alone on stdout, once
    llmuxctl keys list | revoke NAME     key files (no secrets), with use counts from llmuxd

It talks to the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured) or, with
--user, to an embedded daemon on the session bus. Errors are one line on
stderr; --json prints machine-readable results (and errors) on stdout.

Exit status: 0 done, 1 the daemon refused or the operation failed, 2 usage,
3 llmuxd is not reachable, 4 not authorized.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
from typing import Any, Optional, Sequence

from dbus_fast import Message, Variant

from llmuxd.bus.client import NOT_RUNNING, BusCallError, LLMuxClient
from llmuxd.bus.errors import ACCESS_DENIED, INTERACTIVE_AUTH_REQUIRED
from llmuxd.names import BUS_NAME, MODEL_IFACE, model_from_object_path, unit_name, validate_model_name

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED = 0, 1, 2, 3, 4


class CtlError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED, name: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.name = name


def _seconds(usec: int) -> str:
    s = usec / 1_000_000
    if s == 0:
        return "0s"
    if s < 10:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s:.0f}s"
    return f"{s / 3600:.1f}h"


def format_status(status: dict) -> str:
    """The status table a person reads."""
    head = f"llmux {status.get('version', '?')}: {status.get('state', '?')}, mode {status.get('mode', '?')}"
    if status.get("pinned"):
        head += f", pinned to {status['pinned']}"
    rows = [("MODEL", "STATE", "PROCESS", "EVICTION", "IN-FLIGHT", "QUEUE", "WAIT", "UNIT")]
    for name in sorted(status.get("models", {})):
        m = status["models"][name]
        state = m.get("state", "")
        if m.get("last_error"):
            state += " (!)"
        rows.append(
            (
                name,
                state,
                m.get("process_state", "") or "-",
                m.get("eviction", ""),
                str(m.get("in_flight", 0)),
                str(m.get("queue_depth", 0)),
                _seconds(m.get("wait_estimate_usec", 0)),
                m.get("unit", "") or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    errors = [(n, m["last_error"]) for n, m in sorted(status.get("models", {}).items()) if m.get("last_error")]
    if errors:
        lines.append("")
        lines.extend(f"(!) {n}: {e}" for n, e in errors)
    if status.get("keys"):
        import time

        lines.append("")
        lines.extend(format_keys(status["keys"], time.time()))
    return "\n".join(lines)


def _ago(epoch_usec: int, now: float) -> str:
    if not epoch_usec:
        return "never"
    return _seconds(int(max(0.0, now - epoch_usec / 1_000_000) * 1_000_000)) + " ago"


def format_keys(keys: dict, now: float) -> list[str]:
    """The per-key rows of `llmuxctl status` (ids only, never a secret)."""
    rows = [("KEY", "REQUESTS", "IN-FLIGHT", "LIMITED", "LAST USE")]
    for key_id in sorted(keys):
        k = keys[key_id]
        rows.append((key_id, str(k.get("requests", 0)), str(k.get("in_flight", 0)), str(k.get("limited", 0)),
                     _ago(k.get("last_used_usec", 0), now)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmuxctl", description="Control llmuxd over D-Bus.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--system", dest="user", action="store_false", help="talk to llmuxd on the system bus (default)")
    where.add_argument("--user", dest="user", action="store_true", help="talk to an embedded llmuxd on the session bus")
    p.set_defaults(user=False)
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--no-ask-password", action="store_true", help="never ask polkit to authenticate interactively")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("status", help="show models and their state")
    s = sub.add_parser("switch", help="switch to MODEL, showing progress")
    s.add_argument("model")
    s.add_argument("--no-wait", action="store_true", help="return once the switch is queued")
    s.add_argument("--force", action="store_true",
                   help="in manual mode, move the pin to MODEL and switch (as llmux 0.7's /control/switch did)")
    s.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS", help="give up after SECONDS (default: the daemon's)")
    s = sub.add_parser("pin", help="manual mode, pinned to MODEL")
    s.add_argument("model")
    sub.add_parser("unpin", help="back to automatic switching")
    s = sub.add_parser("mode", help="set the mode")
    s.add_argument("mode", choices=["auto", "manual"])
    s = sub.add_parser("sleep", help="evict MODEL now")
    s.add_argument("model")
    s.add_argument("eviction", nargs="?", default="", help="e.g. offload+keep_running (default: configured)")
    s = sub.add_parser("wake", help="wake MODEL")
    s.add_argument("model")
    s = sub.add_parser("eviction", help="show or override MODEL's eviction")
    s.add_argument("model")
    s.add_argument("eviction", nargs="?", help="WEIGHTS+PROCESS; omit to show the current one")
    s.add_argument("--reset", action="store_true", help="back to the configured eviction")
    sub.add_parser("reload", help="re-read the configuration")
    s = sub.add_parser("logs", help="show MODEL's backend log (journalctl)")
    s.add_argument("model")
    s.add_argument("journal_args", nargs=argparse.REMAINDER, help="passed to journalctl (e.g. -f, -n 50)")
    s = sub.add_parser("fleet", help="show several llmux hosts' state and print a LiteLLM config for them")
    s.add_argument("hosts", nargs="+", metavar="HOST_URL", help="e.g. http://gpu1:3000 (or gpu1:3000)")
    s.add_argument("--only", choices=["table", "litellm", "vllm-router"], help="print only this part")
    from llmuxd.keys.ctl import add_parser as add_keys_parser

    add_keys_parser(sub)
    return p


def journal_command(model: str, user: bool, extra: Sequence[str]) -> list[str]:
    """The journalctl line for a model's backend log."""
    if user:
        return ["journalctl", f"LLMUX_MODEL={model}", *extra]
    return ["journalctl", "-u", unit_name(model), *extra]


def start_polkit_agent() -> Optional[subprocess.Popen]:
    """Run pkttyagent for this terminal, as systemctl does, so that polkit can
    ask for a password here when no desktop agent is running. Returns once the
    agent is registered (it closes the notify pipe), or None without one."""
    agent = shutil.which("pkttyagent")
    if agent is None or not sys.stdout.isatty():
        return None
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [agent, "--notify-fd", str(write_fd), "--fallback"], pass_fds=[write_fd], stdin=sys.stdin
        )
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return None
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 10.0)
        if ready:
            os.read(read_fd, 1)
    finally:
        os.close(read_fd)
    return proc


class Ctl:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.agent: Optional[subprocess.Popen] = None

    def emit(self, text: str = "", data: Any = None) -> None:
        if self.args.json:
            if data is not None:
                print(json.dumps(data, indent=2, sort_keys=True))
        elif text:
            print(text)

    async def connect(self) -> LLMuxClient:
        from llmuxd.bus.connection import open_bus

        which = "session" if self.args.user else "system"
        try:
            bus = await open_bus(system=not self.args.user)
        except Exception as exc:
            raise CtlError(f"cannot connect to the {which} bus: {exc}", EXIT_UNREACHABLE) from None
        interactive = not self.args.no_ask_password and sys.stdin.isatty() and not self.args.user
        if interactive and os.geteuid() != 0:
            self.agent = start_polkit_agent()
        return LLMuxClient(bus, interactive=interactive)

    def explain(self, err: BusCallError) -> CtlError:
        if err.name in NOT_RUNNING:
            hint = "llmuxd run --config FILE" if self.args.user else "systemctl start llmuxd"
            bus = "session" if self.args.user else "system"
            return CtlError(f"llmuxd is not running on the {bus} bus ({BUS_NAME} has no owner); start it with: {hint}", EXIT_UNREACHABLE, err.name)
        if err.name in (ACCESS_DENIED, INTERACTIVE_AUTH_REQUIRED):
            return CtlError(err.message, EXIT_DENIED, err.name)
        return CtlError(err.message, EXIT_FAILED, err.name)

    async def run(self) -> int:
        a = self.args
        if a.command == "logs":
            return self.logs()
        if a.command == "fleet":
            return await self.fleet()
        if a.command == "keys":
            return await self.keys()
        client = await self.connect()
        try:
            return await getattr(self, "cmd_" + a.command)(client)
        except BusCallError as err:
            raise self.explain(err) from None
        finally:
            client.bus.disconnect()
            if self.agent is not None:
                self.agent.terminate()
                self.agent.wait()

    def logs(self) -> int:
        try:
            validate_model_name(self.args.model)
        except ValueError as exc:
            raise CtlError(str(exc), EXIT_USAGE) from None
        argv = journal_command(self.args.model, self.args.user, self.args.journal_args)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise CtlError(f"cannot run {argv[0]}: {exc.strerror}; is systemd's journalctl installed?") from None
        return EXIT_OK  # not reached

    async def fleet(self) -> int:
        """Over HTTP, not the bus: the hosts are other machines."""
        from llmuxd.fleet import cli

        reports = await cli.fetch_all(self.args.hosts)
        down = [r for r in reports if r.signal is None]
        if len(down) == len(reports):
            raise CtlError("no host answered: " + "; ".join(f"{r.url}: {r.error}" for r in down), EXIT_UNREACHABLE)
        if self.args.json:
            print(json.dumps(cli.as_json(reports), indent=2, sort_keys=True))
        else:
            print(cli.render(reports, self.args.only))
        if down:
            print(f"llmuxctl: {len(down)} of {len(reports)} hosts did not answer; they are left out", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    async def keys(self) -> int:
        """Key files directly (no bus); `keys list` asks llmuxd for use counts when it answers."""
        from llmuxd.keys import ctl as keys_ctl

        usage: Optional[dict] = None
        if self.args.keys_command == "list":
            usage = await self._key_usage()
        try:
            return keys_ctl.run(self.args, usage)
        except keys_ctl.KeysCtlError as err:
            raise CtlError(str(err), err.status) from None

    async def _key_usage(self) -> Optional[dict]:
        """Per key use from llmuxd's status, or None when it does not answer."""
        from llmuxd.bus.connection import open_bus

        try:
            client = LLMuxClient(await asyncio.wait_for(open_bus(system=not self.args.user), 5))
        except Exception:  # noqa: BLE001 - no bus, no daemon: list the files without counts
            return None
        try:
            return (await asyncio.wait_for(client.status(), 5)).get("keys", {})
        except (BusCallError, asyncio.TimeoutError):
            return None
        finally:
            client.bus.disconnect()

    async def cmd_status(self, c: LLMuxClient) -> int:
        status = await c.status()
        self.emit(format_status(status), status)
        return EXIT_OK

    async def cmd_switch(self, c: LLMuxClient) -> int:
        model = self.args.model
        timeout_usec = int(max(0.0, self.args.timeout) * 1_000_000)
        if self.args.no_wait:
            if self.args.force:
                await c.call("SwitchWithOptions", "sa{sv}", [model, {"force": Variant("b", True)}])
            else:
                await c.call("Switch", "s", [model])
            self.emit(f"switch to {model} queued", {"model": model, "queued": True})
            return EXIT_OK
        finished: list[list] = []

        def on_signal(msg: Message) -> None:
            if msg.member == "SwitchStarted" and not self.args.json:
                print(f"switching {msg.body[0] or 'none'} -> {msg.body[1]} ...", flush=True)
            elif msg.member == "SwitchFinished":
                finished.append(msg.body)
            elif msg.member == "PropertiesChanged" and msg.body[0] == MODEL_IFACE and not self.args.json:
                state = msg.body[1].get("State")
                if state is not None:
                    name = model_from_object_path(msg.path or "") or msg.path
                    print(f"  {name}: {state.value}", flush=True)

        await c.watch(on_signal)
        if self.args.force:
            options = {"force": Variant("b", True), "wait": Variant("b", True), "timeout_usec": Variant("t", timeout_usec)}
            await c.call("SwitchWithOptions", "sa{sv}", [model, options])
        else:  # the method every llmuxd has
            await c.call("SwitchAndWait", "st", [model, timeout_usec])
        mine = [f for f in finished if f[1] == model and f[2]]
        took = f" in {_seconds(mine[-1][3])}" if mine else ""
        self.emit(
            f"{model} is active{took}",
            {"model": model, "ok": True, "duration_usec": mine[-1][3] if mine else 0},
        )
        return EXIT_OK

    async def cmd_pin(self, c: LLMuxClient) -> int:
        await c.call("Pin", "s", [self.args.model])
        self.emit(f"pinned to {self.args.model} (manual mode)", {"pinned": self.args.model, "mode": "manual"})
        return EXIT_OK

    async def cmd_unpin(self, c: LLMuxClient) -> int:
        await c.call("Unpin")
        self.emit("unpinned (auto mode)", {"pinned": "", "mode": "auto"})
        return EXIT_OK

    async def cmd_mode(self, c: LLMuxClient) -> int:
        await c.call("SetMode", "s", [self.args.mode])
        self.emit(f"mode {self.args.mode}", {"mode": self.args.mode})
        return EXIT_OK

    async def cmd_sleep(self, c: LLMuxClient) -> int:
        await c.call("Sleep", "ss", [self.args.model, self.args.eviction])
        how = self.args.eviction or "its configured eviction"
        self.emit(f"{self.args.model} put to sleep ({how})", {"model": self.args.model, "slept": True, "eviction": self.args.eviction})
        return EXIT_OK

    async def cmd_wake(self, c: LLMuxClient) -> int:
        await c.call("Wake", "s", [self.args.model])
        self.emit(f"{self.args.model} is awake", {"model": self.args.model, "awake": True})
        return EXIT_OK

    async def cmd_eviction(self, c: LLMuxClient) -> int:
        a = self.args
        if a.reset and a.eviction:
            raise CtlError("give either an EVICTION or --reset, not both", EXIT_USAGE)
        if a.reset or a.eviction:
            await c.call("SetEviction", "ss", [a.model, "" if a.reset else a.eviction])
        status = await c.status()
        if a.model not in status["models"]:
            raise CtlError(f"model '{a.model}' does not exist; known models: {', '.join(sorted(status['models'])) or 'none'}")
        current = status["models"][a.model]["eviction"]
        self.emit(f"{a.model}: {current}", {"model": a.model, "eviction": current})
        return EXIT_OK

    async def cmd_reload(self, c: LLMuxClient) -> int:
        await c.call("Reload")
        self.emit("configuration reloaded", {"reloaded": True})
        return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    ctl = Ctl(args)
    try:
        return asyncio.run(ctl.run())
    except CtlError as err:
        if args.json:
            print(json.dumps({"error": err.name or "llmuxctl", "message": err.message}))
        print(f"llmuxctl: {err.message}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
