"""`llmuxd checkpoint|restore|validate MODEL`: operator tools around one model.

- `checkpoint MODEL [--eviction W+checkpoint] [--no-warmup]`: start the model,
  warm it up, sleep it with a checkpoint eviction: the image set lands in the
  catalogue, and the next daemon start restores it lazily.
- `restore MODEL`: restore the model's image as its unit and leave it running
  (a later llmuxd adopts it); with checkpoint.object_store, an image only in
  the bucket is downloaded first. `checkpoint` waits for the upload.
- `validate MODEL --policies a,b,...`: llmux's validation table (llmux 0.7
  `--validate`): for each eviction, sleep and wake times, the backend's GPU
  memory (NVML / nvidia-smi / the simulator's ledger) and host RSS before and
  after, whether the deterministic answer survived the wake; exit status 1
  when any row fails.

The lead wires these into `llmuxd.daemon.main` with `add_tool_parsers(subparsers)`
and `run_tool(args)`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

from llmuxd.checkpoint.canary import CANARY_MAX_TOKENS, CANARY_PROMPT
from llmuxd.checkpoint.manager import CheckpointManager
from llmuxd.errors import LLMuxError
from llmuxd.eviction import Eviction, EvictionError, ProcessStrategy, WeightStrategy
from llmuxd.lifecycle import BackendState

log = logging.getLogger("llmuxd.tools")

DEFAULT_CHECKPOINT_EVICTION = Eviction(WeightStrategy.DISCARD, ProcessStrategy.CHECKPOINT)


def _runtime(kind: str) -> Any:
    if kind == "auto":
        kind = "systemd" if os.geteuid() == 0 and (
            os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or os.path.exists("/run/dbus/system_bus_socket")) else "subprocess"
    if kind == "systemd":
        from llmuxd.runtime.systemd import SystemdRuntime

        return SystemdRuntime()
    from llmuxd.runtime.subprocess import SubprocessRuntime

    return SubprocessRuntime()


async def open_orchestrator(config: Any, runtime: Any, **manager_kw: Any) -> tuple[Any, CheckpointManager]:
    """An orchestrator with the checkpoint room installed, its backends adopted."""
    from llmuxd.orchestrator import Orchestrator

    await runtime.connect()
    orchestrator = Orchestrator(config, runtime)
    manager = CheckpointManager(config, **manager_kw).install(orchestrator)
    await orchestrator.adopt()
    return orchestrator, manager


def _model(config: Any, model: str) -> Any:
    if model not in config.models:
        known = ", ".join(sorted(config.models)) or "none"
        raise LLMuxError(f"model '{model}' is not in the configuration; known models: {known}")
    return config.models[model]


def default_checkpoint_eviction(model: str, configured: Eviction) -> tuple[Eviction, str]:
    """The eviction `checkpoint MODEL` uses without --eviction, and one line saying which and why:
    llmux 0.7's discard+checkpoint, unless the model's own eviction is another checkpoint one (the
    image must be what the model's sleeps make, or the daemon would restore a different state)."""
    if configured.process is ProcessStrategy.CHECKPOINT and configured != DEFAULT_CHECKPOINT_EVICTION:
        return configured, (f"{model}: no --eviction: using the model's own '{configured}' (llmux 0.7 used "
                            f"'{DEFAULT_CHECKPOINT_EVICTION}'; the image must match how the model sleeps)")
    return DEFAULT_CHECKPOINT_EVICTION, (f"{model}: no --eviction: using '{DEFAULT_CHECKPOINT_EVICTION}', "
                                         "llmux 0.7's default")


async def checkpoint_model(orchestrator: Any, manager: CheckpointManager, model: str,
                           eviction: Eviction | None = None, *, warmup: bool = True, out: TextIO = sys.stdout) -> int:
    if eviction is None:
        eviction, why = default_checkpoint_eviction(model, orchestrator.config.models[model].eviction)
        print(why, file=out)
    await orchestrator.ensure_awake(model)
    if warmup:
        m = orchestrator._get(model)
        manager.canary.baselines[model] = await m.engine.probe(model, CANARY_PROMPT, CANARY_MAX_TOKENS)
    manifest = await manager.checkpoint_now(orchestrator, model, eviction)
    images = manager.images_for(orchestrator._get(model))
    print(f"{model}: checkpointed with {eviction} to {images} ({manifest.size_bytes / (1 << 20):.1f} MiB, "
          f"{len(manifest.checksums)} files)", file=out)
    store = manager.store
    if store is None:
        return 0
    await manager.wait_uploads()  # published before the tool exits
    if model in store.upload_errors:
        print(f"{model}: not uploaded: {store.upload_errors[model]}", file=out)
        return 1
    published = store.last_published[model]
    print(f"{model}: uploaded to {store.url(model)} (generation {published.generation})", file=out)
    return 0


async def restore_model(orchestrator: Any, manager: CheckpointManager, model: str, *, out: TextIO = sys.stdout) -> int:
    if orchestrator.state(model) is BackendState.READY:
        print(f"{model}: already running ({orchestrator.status(model).unit})", file=out)
        return 0
    if model not in manager.mark_lazy(orchestrator) and model not in await manager.mark_lazy_from_store(orchestrator):
        print(f"{model}: no image to restore that matches the configuration (see the log); not started", file=out)
        return 1
    await orchestrator.ensure_awake(model)
    status = orchestrator.status(model)
    how = manager.restore_outcome.get(model, "restored")
    print(f"{model}: {how}; running as {status.unit} (pid {status.main_pid})", file=out)
    return 0 if how == "restored" else 1


# -- validate --------------------------------------------------------------------


@dataclass
class ValidationRow:
    eviction: str
    sleep_s: float | None = None
    wake_s: float | None = None
    gpu_before: int | None = None
    gpu_asleep: int | None = None
    gpu_awake: int | None = None
    rss_before: int | None = None
    rss_asleep: int | None = None
    answer_ok: bool = False
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.answer_ok and not self.note.startswith("error")


def _rss_mb(pids: Sequence[int]) -> int | None:
    total, seen = 0, False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) // 1024
                        seen = True
        except OSError:
            continue
    return total if seen else None


async def _measure(orchestrator: Any, manager: CheckpointManager, model: str) -> tuple[int | None, int | None]:
    m = orchestrator._get(model)
    if m.handle is None or m.handle.exited.is_set():
        return 0, 0
    pids = await orchestrator.runtime.pids(m.handle)
    return await manager.probe_for(m).usage_mb(pids), _rss_mb(pids)


async def validate_model(orchestrator: Any, manager: CheckpointManager, model: str, policies: Sequence[Eviction],
                         *, out: TextIO = sys.stdout) -> int:
    await orchestrator.ensure_awake(model)
    m = orchestrator._get(model)
    baseline = await m.engine.probe(model, CANARY_PROMPT, CANARY_MAX_TOKENS)
    rows = []
    for eviction in policies:
        row = ValidationRow(str(eviction))
        rows.append(row)
        try:
            await orchestrator.ensure_awake(model)
            row.gpu_before, row.rss_before = await _measure(orchestrator, manager, model)
            t0 = time.monotonic()
            await orchestrator.sleep(model, eviction)
            row.sleep_s = time.monotonic() - t0
            status = orchestrator.status(model)
            if status.eviction != eviction:
                row.note = f"slept as {status.eviction or status.phase}: {status.reason or ''}".strip()
            row.gpu_asleep, row.rss_asleep = await _measure(orchestrator, manager, model)
            t0 = time.monotonic()
            await orchestrator.ensure_awake(model)
            row.wake_s = time.monotonic() - t0
            row.gpu_awake, _ = await _measure(orchestrator, manager, model)
            answer = await m.engine.probe(model, CANARY_PROMPT, CANARY_MAX_TOKENS)
            row.answer_ok = answer == baseline
            if not row.answer_ok:
                row.note = f"answer {answer!r} != {baseline!r}"
        except Exception as exc:  # noqa: BLE001 - a row, not a crash
            row.note = f"error: {exc}"
    print(format_table(model, rows), file=out)
    return 0 if all(r.passed for r in rows) else 1


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def format_table(model: str, rows: Sequence[ValidationRow]) -> str:
    head = ("Eviction", "Sleep s", "Wake s", "GPU before", "GPU asleep", "GPU awake", "RSS before", "RSS asleep",
            "Answer", "Result")
    lines = [head]
    for r in rows:
        lines.append((r.eviction, _fmt(r.sleep_s, ".2f"), _fmt(r.wake_s, ".2f"), _fmt(r.gpu_before),
                      _fmt(r.gpu_asleep), _fmt(r.gpu_awake), _fmt(r.rss_before), _fmt(r.rss_asleep),
                      "same" if r.answer_ok else "DIFFERENT" if r.wake_s is not None else "-",
                      "PASS" if r.passed else "FAIL"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [f"validation of model '{model}' (memory in MiB)"]
    text += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text += [f"  {r.eviction}: {r.note}" for r in rows if r.note]
    failed = sum(not r.passed for r in rows)
    text.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(text)


def parse_policies(text: str) -> list[Eviction]:
    policies = [p.strip() for p in text.split(",") if p.strip()]
    if not policies:
        raise EvictionError("--policies needs at least one eviction, e.g. offload+keep_running,discard+checkpoint")
    return [Eviction.parse(p) for p in policies]


# -- command line ------------------------------------------------------------------


def add_tool_parsers(subparsers: Any) -> None:
    """Add `checkpoint`, `restore` and `validate` to llmuxd's argparse subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `llmuxd --config F validate ...` (the top-level option) must not be reset
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="main config file (default /etc/llmux/llmux.yaml)")
    common.add_argument("--runtime", choices=("auto", "systemd", "subprocess"), default="auto",
                        help="where the backend runs (auto: systemd when root with a system bus)")
    common.add_argument("model", help="the model's public name")
    p = subparsers.add_parser("checkpoint", parents=[common], help="start, warm up and checkpoint a model")
    p.add_argument("--eviction", default=None, help="WEIGHTS+checkpoint (default: llmux 0.7's discard+checkpoint, or the model's own "
                        "checkpoint eviction when it has another; the tool says which)")
    p.add_argument("--no-warmup", action="store_true", help="dump without a warm-up request first")
    p.set_defaults(tool="checkpoint")
    p = subparsers.add_parser("restore", parents=[common], help="restore a model's checkpoint and leave it running")
    p.set_defaults(tool="restore")
    p = subparsers.add_parser("validate", parents=[common], help="try evictions on a model and print a table")
    p.add_argument("--policies", required=True, help="comma-separated evictions, e.g. offload+keep_running,discard+stop")
    p.set_defaults(tool="validate")


async def _run_tool(args: argparse.Namespace, config: Any, out: TextIO) -> int:
    _model(config, args.model)
    runtime = _runtime(args.runtime)
    orchestrator, manager = await open_orchestrator(config, runtime)
    leave_running = args.tool == "restore"
    try:
        if args.tool == "checkpoint":
            eviction = Eviction.parse(args.eviction) if args.eviction else None
            return await checkpoint_model(orchestrator, manager, args.model, eviction, warmup=not args.no_warmup,
                                          out=out)
        if args.tool == "restore":
            return await restore_model(orchestrator, manager, args.model, out=out)
        return await validate_model(orchestrator, manager, args.model, parse_policies(args.policies), out=out)
    finally:
        await orchestrator.close(stop_backends=not leave_running)
        await runtime.close()


def run_tool(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run a parsed tool command; errors are one line on stderr, exit status 1 (2 for bad input)."""
    from llmuxd.config import ConfigError, load_config

    try:
        config = load_config(getattr(args, "config", None))
        return asyncio.run(_run_tool(args, config, out))
    except (ConfigError, EvictionError) as exc:
        print(f"llmuxd {args.tool}: {exc}", file=sys.stderr)
        return 2
    except LLMuxError as exc:
        print(f"llmuxd {args.tool}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m llmuxd.daemon.tools validate MODEL ...`) until main.py wires it."""
    parser = argparse.ArgumentParser(prog="llmuxd")
    add_tool_parsers(parser.add_subparsers(dest="command", required=True))
    return run_tool(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
