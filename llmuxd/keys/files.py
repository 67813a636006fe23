"""Reading key files: `keys_dir/*.yaml` and systemd credentials, in the same format.

A file holds one key (a mapping with `id`), several (`keys:` with a list, or a
top-level list), or none (empty). A key::

    id: chat-frontend            # what logs, metrics and status show
    sha256: 9f86d0…              # 64 hex digits: the sha256 of the secret, never the secret
    models: [llama-*, qwen-7b]   # names or globs; default all
    max_in_flight: 8             # default no limit
    rate: 5/s                    # requests per second (or /m, /h), refilling a bucket of `burst`
    burst: 10                    # default: the rate rounded up (at least 1)
    priority: interactive        # or batch
    expires: 2027-01-01          # a date (from 00:00 UTC) or a time; default never
    control: false               # may use the control routes over HTTP (the console)
    description: the chat UI     # free text

Unknown fields are errors, not warnings: a misspelt `models` would otherwise
widen a key to every model. Every problem is one line, `FILE: key 'ID':
what; what to do`; a file others can read is a warning (it holds hashes only,
but a weak hand-made secret can be guessed from its hash offline).
"""

from __future__ import annotations

import glob
import math
import os
import re
import stat
from datetime import date, datetime, time, timezone
from typing import Any, Iterable, List, Mapping, Optional, Tuple

import yaml

from llmuxd.config.issues import ConfigError, ConfigIssue, shown
from llmuxd.config.loader import _UniqueKeyLoader
from llmuxd.keys.model import ALL_MODELS, KEY_ID_PATTERN, KEY_ID_RULE, ApiKey
from llmuxd.priority import DEFAULT_PRIORITY, Priority

#: default place of key files (config `keys_dir`)
DEFAULT_KEYS_DIR = "/etc/llmux/keys.d"
#: file names read in keys_dir; hidden files (editors', atomic writes' temporaries) never
KEY_FILE_SUFFIXES = (".yaml", ".yml")
#: systemd credentials read as key files: `LoadCredential=llmux-keys:/path` (or llmux-keys.NAME)
CREDENTIAL_NAME = "llmux-keys"
FIELDS = ("id", "sha256", "models", "max_in_flight", "rate", "burst", "priority", "expires",
          "control", "description")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*$")
_PER = {None: 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hour": 3600.0}


class KeyFieldError(ValueError):
    """One field of one key is wrong; the message says what to write instead."""


def parse_rate(value: Any) -> float:
    """Requests per second from `5`, `5/s`, `120/m`, `1000/h`."""
    if isinstance(value, bool):
        raise KeyFieldError(f"{shown(value)} is not a rate; write requests per second, e.g. 5 or 5/s (or 120/m)")
    if isinstance(value, (int, float)):
        rate = float(value)
    else:
        match = _RATE.match(str(value))
        if not match:
            raise KeyFieldError(f"{shown(value)} is not a rate; write requests per second, e.g. 5 or 5/s (or 120/m)")
        rate = float(match.group(1)) / _PER[match.group(2)]
    if not rate > 0 or math.isinf(rate):
        raise KeyFieldError(f"{shown(value)} must be more than 0; leave rate out for no limit")
    return rate


def parse_expires(value: Any) -> datetime:
    """An aware UTC time; a plain date means 00:00 UTC that day (the key is refused from then)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time(0, 0))
    else:
        text = str(value).strip().replace("Z", "+00:00")
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise KeyFieldError(f"{shown(value)} is not a date; write YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeyFieldError(f"{name}: {shown(value)} must be a whole number of at least 1; leave it out for no limit")
    return value


def _models(value: Any) -> Tuple[str, ...]:
    if value is None:
        return ALL_MODELS
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(m, str) and m.strip() for m in items):
        raise KeyFieldError(f"models: {shown(value)} must be a list of model names or globs (e.g. [llama-*]); "
                            "leave it out for all models")
    return tuple(m.strip() for m in items)


def key_from_mapping(data: Mapping[str, Any], source: str) -> ApiKey:
    """One key from its parsed fields; raises KeyFieldError with the first problem."""
    unknown = [str(k) for k in data if k not in FIELDS]
    if unknown:
        raise KeyFieldError(f"unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    digest = data.get("sha256")
    if digest is None:
        raise KeyFieldError("sha256: missing; give the sha256 of the secret (llmuxctl keys add writes it)")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise KeyFieldError(f"sha256: {shown(digest)} is not 64 hex digits; give the sha256 of the secret "
                            "(printf %s SECRET | sha256sum), never the secret itself")
    rate = parse_rate(data["rate"]) if data.get("rate") is not None else None
    burst = _positive_int("burst", data["burst"]) if data.get("burst") is not None else None
    if burst is not None and rate is None:
        raise KeyFieldError("burst needs a rate; add rate: R/s or remove burst")
    if rate is not None and burst is None:
        burst = max(1, math.ceil(rate))
    max_in_flight = _positive_int("max_in_flight", data["max_in_flight"]) if data.get("max_in_flight") is not None else None
    raw_priority = data.get("priority", DEFAULT_PRIORITY.value)
    try:
        priority = Priority(str(raw_priority))
    except ValueError:
        raise KeyFieldError(f"priority: {shown(raw_priority)} is not one of "
                            f"{', '.join(p.value for p in Priority)}") from None
    control = data.get("control", False)
    if not isinstance(control, bool):
        raise KeyFieldError(f"control: {shown(control)} must be true or false")
    expires = parse_expires(data["expires"]) if data.get("expires") is not None else None
    description = data.get("description") or ""
    return ApiKey(id=str(data["id"]), sha256=digest.lower(), models=_models(data.get("models")),
                  max_in_flight=max_in_flight, rate=rate, burst=burst, priority=priority,
                  expires=expires, control=control, source=source, description=str(description))


def _entries(data: Any, path: str) -> List[Any]:
    if data is None:
        return []
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and set(data) == {"keys"}:
        return data["keys"] if isinstance(data["keys"], list) else [data["keys"]]
    if isinstance(data, dict):
        return [data]
    raise ConfigError(ConfigIssue(path, "", f"expected a key (a mapping with id and sha256), a list of keys "
                                            f"or 'keys:' with a list, got {shown(data)}"))


#: a key's id as written, for naming the keys of a file that does not parse
_ID_LINE = re.compile(r"^[\s-]*id:\s*['\"]?([A-Za-z0-9][A-Za-z0-9._@-]*)", re.M)


def _ids_in(text: str) -> str:
    ids = _ID_LINE.findall(text)
    return f"key {', '.join(repr(i) for i in ids)}" if ids else ""


def _read_yaml(path: str) -> Any:
    text = ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(ConfigIssue(path, "", f"cannot read: {exc.strerror or exc}")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(ConfigIssue(path, "", f"not UTF-8 text ({exc.reason})")) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(ConfigIssue(path, _ids_in(text), f"{where}invalid YAML: {what}; "
                                      "no key of this file is used")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(ConfigIssue(path, "", f"invalid YAML: {' '.join(str(exc).split())}")) from None


def read_key_file(path: str, issues: List[ConfigIssue], warnings: List[ConfigIssue]) -> List[ApiKey]:
    """The keys of one file; problems are appended to `issues` (one line each)."""
    try:
        entries = _entries(_read_yaml(path), path)
    except ConfigError as exc:
        issues.extend(exc.issues)
        return []
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    keys: List[ApiKey] = []
    for index, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            issues.append(ConfigIssue(path, f"key #{index}", f"expected a mapping with id and sha256, got {shown(entry)}"))
            continue
        key_id = entry.get("id")
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.match(key_id):
            what = "missing" if key_id is None else f"{shown(key_id)} is not a valid id"
            issues.append(ConfigIssue(path, f"key #{index}", f"id: {what}; an id is {KEY_ID_RULE}"))
            continue
        try:
            keys.append(key_from_mapping(entry, path))
        except KeyFieldError as exc:
            issues.append(ConfigIssue(path, f"key '{key_id}'", str(exc)))
            continue
        if mode & stat.S_IROTH:
            warnings.append(ConfigIssue(path, f"key '{key_id}'", f"the file is readable by every user "
                                        f"(mode {stat.S_IMODE(mode):04o}); chmod 0640 it: a hash lets a weak "
                                        "secret be guessed offline"))
    return keys


def key_files(directory: str) -> List[str]:
    """The key files of a directory, in name order."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(KEY_FILE_SUFFIXES) and not n.startswith("."))
    return [os.path.join(directory, n) for n in names]


def credential_files(environ: Mapping[str, str]) -> List[str]:
    """systemd credentials in the key file format: llmux-keys and llmux-keys.*"""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return []
    pattern = os.path.join(glob.escape(directory), CREDENTIAL_NAME)
    return sorted(glob.glob(pattern) + glob.glob(pattern + ".*"))


def read_keys(
    keys_dir: Optional[str], *, explicit: bool = False, environ: Optional[Mapping[str, str]] = None,
    extra_files: Iterable[str] = (),
) -> Tuple[List[ApiKey], List[ConfigIssue]]:
    """Every key of `keys_dir` (a missing directory is an error only when `explicit`)
    and of the systemd credentials; (keys, warnings). Raises ConfigError listing
    every problem: duplicate ids and duplicate secrets across files too."""
    issues: List[ConfigIssue] = []
    warnings: List[ConfigIssue] = []
    files: List[str] = []
    directory = keys_dir or DEFAULT_KEYS_DIR
    if os.path.isdir(directory):
        try:
            files = key_files(directory)
        except OSError as exc:
            issues.append(ConfigIssue(directory, "", f"cannot list key files: {exc.strerror or exc}"))
    elif explicit or os.path.exists(directory):
        issues.append(ConfigIssue(directory, "", "keys_dir is not a directory; create it (llmuxctl keys add does) "
                                  "or leave keys_dir out"))
    files += credential_files(os.environ if environ is None else environ)
    files += list(extra_files)
    keys: List[ApiKey] = []
    by_id: dict = {}
    by_hash: dict = {}
    for path in files:
        for key in read_key_file(path, issues, warnings):
            if key.id in by_id:
                issues.append(ConfigIssue(path, f"key '{key.id}'", f"id also defined in {by_id[key.id].source}; "
                                          "ids are unique: rename or remove one"))
                continue
            if key.sha256 in by_hash:
                issues.append(ConfigIssue(path, f"key '{key.id}'", f"same secret as key '{by_hash[key.sha256].id}' "
                                          f"in {by_hash[key.sha256].source}; give each key its own secret"))
                continue
            by_id[key.id] = by_hash[key.sha256] = key
            keys.append(key)
    if issues:
        raise ConfigError(issues, warnings)
    return keys, warnings


def keys_dir_of(config: Any) -> Tuple[str, bool]:
    """(keys_dir, given explicitly) of a Config; a relative one is beside the main config file."""
    keys_dir = getattr(config, "keys_dir", None)
    if keys_dir is None:
        return DEFAULT_KEYS_DIR, False
    sources = getattr(config, "sources", None) or []
    if not os.path.isabs(keys_dir) and sources:
        keys_dir = os.path.join(os.path.dirname(os.path.abspath(sources[0])), keys_dir)
    return keys_dir, True


def keys_for_config(config: Any, environ: Optional[Mapping[str, str]] = None) -> Tuple[List[ApiKey], List[ConfigIssue]]:
    """The keys a Config puts in force (its keys_dir and the systemd credentials); ConfigError if any is bad."""
    directory, explicit = keys_dir_of(config)
    return read_keys(directory, explicit=explicit, environ=environ)
