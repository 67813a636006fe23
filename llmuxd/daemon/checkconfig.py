"""`llmuxd check-config [--strict] [FILE]`: validate a config without starting anything.

Prints the effective configuration (YAML, every default filled in, backend
ports resolved) on stdout and exits 0, or prints each problem on stderr as
``FILE: KEY.PATH: what was wrong; what is allowed`` and exits 1. Meant for
``ExecReload=``-style pre-checks and for people editing /etc/llmux.

Warnings (unknown keys, which are ignored; llmux 0.7 keys that do nothing
here) go to stderr as ``warning: FILE: KEY: what`` and do not fail the check,
as the daemon loads such a file too; ``--strict`` makes them problems (exit 1).
Notes (translations, overrides) go to stderr as ``note: ...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, TextIO

import yaml

from llmuxd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def check_config(
    path: Optional[str] = None,
    dropin_dir: Optional[str] = None,
    *,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
    strict: bool = False,
) -> int:
    """Load `path` (default /etc/llmux/llmux.yaml) and its drop-ins; 0 if valid,
    else 1 (also for warnings when `strict`)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        config = load_config(path, dropin_dir)
        _check_keys(config)
    except ConfigError as exc:
        problems = [str(i) for i in exc.issues] + ([str(w) for w in exc.warnings] if strict else [])
        for line in problems:
            print(line, file=err)
        if not strict:
            for warning in exc.warnings:
                print(f"warning: {warning}", file=err)
        print(f"{len(problems)} problem(s); nothing was changed", file=err)
        return 1
    if strict and config.warnings:
        for line in config.warnings:
            print(line, file=err)
        print(f"{len(config.warnings)} problem(s) (--strict: warnings count); nothing was changed", file=err)
        return 1
    for note in config.notes:
        print(f"note: {note}", file=err)
    for warning in config.warnings:
        print(f"warning: {warning}", file=err)
    out.write("# effective configuration, read from:\n")
    for source in config.sources:
        out.write(f"#   {source}\n")
    out.write(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False))
    return 0


def _check_keys(config: "object") -> None:
    """The API key files (each bad entry a problem, a file others can read a
    warning) and the rule that a listen address other hosts reach needs keys."""
    from llmuxd.config import ConfigIssue
    from llmuxd.http.auth import exposure_problem
    from llmuxd.keys.files import keys_dir_of, keys_for_config

    keys, warnings = keys_for_config(config)
    config.warnings.extend(str(w) for w in warnings)  # type: ignore[attr-defined]
    problem = exposure_problem([config.listen], bool(keys), config.auth)  # type: ignore[attr-defined]
    if problem is not None:
        raise ConfigError(ConfigIssue(config.sources[0], "listen", problem))  # type: ignore[attr-defined]
    if keys:
        config.notes.append(f"API keys: {len(keys)} ({', '.join(k.id for k in keys)}) from "  # type: ignore[attr-defined]
                            f"{keys_dir_of(config)[0]} and systemd credentials")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmuxd check-config",
        description="Validate the llmux configuration and print the effective result.",
    )
    parser.add_argument("file", nargs="?", default=None, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--dropin-dir", default=None, help="models.d directory (default: beside FILE)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on warnings too (unknown keys, llmux 0.7 keys that do nothing here)")
    args = parser.parse_args(argv)
    return check_config(args.file, args.dropin_dir, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
