"""What is wrong with a configuration, said so that a person can fix it:
``FILE: KEY.PATH: what was wrong; what is allowed``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Tuple

from llmuxd.errors import InvalidConfig


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: where (file, key path) and what to do about it."""

    file: str
    path: str  # dotted key path, "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}" if self.path else f"{self.file}: {self.message}"


class ConfigError(InvalidConfig):
    """The configuration is invalid; ``str()`` has one line per problem,
    ``FILE: KEY.PATH: what was wrong; what is allowed``. ``warnings`` holds
    what was found besides (unknown keys, often the cause of a missing one)."""

    def __init__(self, issues: "list[ConfigIssue] | ConfigIssue", warnings: "list[ConfigIssue] | None" = None):
        if isinstance(issues, ConfigIssue):
            issues = [issues]
        self.issues = list(issues)
        self.warnings = list(warnings or [])
        super().__init__("\n".join(str(i) for i in self.issues))


def shown(value: Any) -> str:
    """A value as the user wrote it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, Mapping)):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def unknown_key_message(key: Any, allowed: Iterable[str], legacy: Iterable[str] = ()) -> str:
    """'did you mean' the closest key (legacy llmux 0.7 spellings included),
    else the list of current keys. Unknown keys are ignored with a warning
    (systemd's rule for unit files; llmux 0.7 ignored them silently)."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(key), allowed + sorted(legacy), n=1, cutoff=0.6)
    if close:
        return f"unknown key, ignored; did you mean '{close[0]}'?"
    return f"unknown key, ignored; allowed keys: {', '.join(allowed)}"


class Issues:
    """Problems found while normalising, each tagged with the file it came from."""

    def __init__(self, main_file: str, model_sources: Mapping[str, str]):
        self.main_file = main_file
        self.model_sources = model_sources
        self.items: List[ConfigIssue] = []
        #: what loads anyway but deserves a look (unknown keys, llmux 0.7 keys without effect)
        self.warnings: List[ConfigIssue] = []
        #: informational lines for Config.notes (translations worth knowing about)
        self.notes: List[str] = []
        #: models whose eviction is policy.eviction (problems are reported there)
        self.inherited_eviction: set = set()

    def file_for(self, loc: Tuple[Any, ...]) -> str:
        if len(loc) >= 2 and loc[0] == "models":
            return self.model_sources.get(loc[1], self.main_file)
        return self.main_file

    def add(self, loc: Tuple[Any, ...], message: str) -> None:
        issue = ConfigIssue(self.file_for(loc), dotted(loc), message)
        if issue not in self.items:
            self.items.append(issue)

    def warn(self, loc: Tuple[Any, ...], message: str) -> None:
        issue = ConfigIssue(self.file_for(loc), dotted(loc), message)
        if issue not in self.warnings:
            self.warnings.append(issue)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items, self.warnings)
