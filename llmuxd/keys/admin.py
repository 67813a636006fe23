"""Writing key files: what `llmuxctl keys add` and `keys revoke` do to keys_dir.

A file is written whole under a hidden temporary name in the same directory
and renamed over the target, so llmuxd (reloading at any moment) reads the old
file or the new one, never half of one. Key files are mode 0640, owner root,
group llmux when that group exists (the daemon runs as root; the group lets
an operator group read them without making them world-readable).
"""

from __future__ import annotations

import grp
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import yaml

from llmuxd.keys.files import FIELDS, KeyFieldError, _read_yaml, _entries, key_files, key_from_mapping
from llmuxd.keys.model import KEY_ID_PATTERN, KEY_ID_RULE, ApiKey, generate_secret, hash_secret

#: the group that may read key files
KEYS_GROUP = "llmux"
FILE_MODE = 0o640
DIR_MODE = 0o750


class KeyAdminError(ValueError):
    """What `keys add` / `keys revoke` refused, in one line."""


@dataclass(frozen=True)
class Written:
    """A key written: where, the secret (shown once), and how the file is owned."""

    key: ApiKey
    secret: str
    path: str
    ownership: str


def _group_id() -> Optional[int]:
    try:
        return grp.getgrnam(KEYS_GROUP).gr_gid
    except KeyError:
        return None


def ownership_note() -> str:
    """How key files will be owned here, in words (the group may be missing)."""
    gid = _group_id()
    if gid is None:
        return (f"group '{KEYS_GROUP}' does not exist here, so the file keeps this user's group "
                f"(mode {FILE_MODE:04o}: owner read-write, group read); the package creates the group")
    if os.geteuid() != 0:
        return f"not root: the file is this user's, group '{KEYS_GROUP}' where allowed, mode {FILE_MODE:04o}"
    return f"root:{KEYS_GROUP}, mode {FILE_MODE:04o}"


def write_atomically(path: str, text: str) -> None:
    """`text` as `path`, mode 0640, group llmux when it exists, replaced in one rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
        gid = _group_id()
        if gid is not None:
            try:
                os.fchown(fd, 0 if os.geteuid() == 0 else -1, gid)
            except PermissionError:
                pass  # not root and not in the group: the file stays this user's
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _ensure_directory(directory: str) -> None:
    if os.path.isdir(directory):
        return
    os.makedirs(directory, mode=DIR_MODE)
    gid = _group_id()
    if gid is not None and os.geteuid() == 0:
        os.chown(directory, 0, gid)


def _entries_by_file(directory: str) -> Dict[str, List[Any]]:
    """The raw entries of every key file (files that do not parse are skipped here;
    `keys list` and the daemon report them)."""
    found: Dict[str, List[Any]] = {}
    if not os.path.isdir(directory):
        return found
    for path in key_files(directory):
        try:
            found[path] = _entries(_read_yaml(path), path)
        except Exception:  # noqa: BLE001 - a broken file is reported elsewhere
            continue
    return found


def _where(directory: str, key_id: str) -> Optional[str]:
    for path, entries in _entries_by_file(directory).items():
        if any(isinstance(e, dict) and e.get("id") == key_id for e in entries):
            return path
    return None


def add_key(directory: str, key_id: str, fields: Dict[str, Any]) -> Written:
    """Generate a secret for a new key `key_id` and write `<directory>/<id>.yaml`.
    `fields` are the key file's fields besides id and sha256 (None: left out)."""
    if not KEY_ID_PATTERN.match(key_id):
        raise KeyAdminError(f"{key_id!r} is not a valid key name; a name is {KEY_ID_RULE}")
    existing = _where(directory, key_id)
    path = os.path.join(directory, f"{key_id}.yaml")
    if existing is not None or os.path.exists(path):
        raise KeyAdminError(f"key '{key_id}' exists already in {existing or path}; revoke it first "
                            f"(llmuxctl keys revoke {key_id}) or choose another name")
    secret = generate_secret()
    data = {"id": key_id, "sha256": hash_secret(secret)}
    data.update({k: v for k, v in fields.items() if v is not None and k in FIELDS})
    try:
        key = key_from_mapping(data, path)
    except KeyFieldError as exc:
        raise KeyAdminError(f"key '{key_id}': {exc}") from None
    _ensure_directory(directory)
    header = ("# written by llmuxctl keys add; the secret is not stored, only its sha256\n"
              "# takes effect on: systemctl reload llmuxd (embedded: kill -HUP the daemon)\n")
    write_atomically(path, header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return Written(key, secret, path, ownership_note())


def revoke_key(directory: str, key_id: str) -> str:
    """Remove key `key_id` from its file (the file itself when it held only that
    key); the file's path. Other keys of a shared file are written back (its
    comments are not kept)."""
    path = _where(directory, key_id)
    if path is None:
        raise KeyAdminError(f"no key '{key_id}' in {directory}; llmuxctl keys list shows the keys there")
    entries = _entries(_read_yaml(path), path)
    rest = [e for e in entries if not (isinstance(e, dict) and e.get("id") == key_id)]
    if not rest:
        os.unlink(path)
    else:
        write_atomically(path, yaml.safe_dump({"keys": rest}, sort_keys=False, default_flow_style=None))
    return path
