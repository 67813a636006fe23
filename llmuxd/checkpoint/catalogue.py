"""The image catalogue: `<images_dir>/<model>/images/` plus a manifest per image set.

A CRIU image set is only worth restoring when it was made from the model as it
is configured now: restoring a process started with another model path, port or
flag set would serve the wrong thing with no error. So every set carries a
manifest (model, config fields and their hash, eviction, versions, size,
SHA-256 of every file) and `verify()` refuses a set that does not match, naming
what differs. Sets are written to `images.new/` and renamed into place, so a
crash mid-dump never leaves a half set that looks whole.

Layout::

    <images_dir>/<model>/images/        the committed set (CRIU files + manifest.json)
    <images_dir>/<model>/images.new/    a dump in progress
    <images_dir>/<model>/restore.pid    PIDFile= of the restored unit
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from llmuxd.checkpoint.errors import CheckpointError, ImageRejected
from llmuxd.names import validate_model_name

log = logging.getLogger("llmuxd.checkpoint.catalogue")

MANIFEST = "manifest.json"
IMAGES = "images"
STAGING = "images.new"
OLD = "images.old"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20

#: the model settings an image depends on: the restored process was started with them
CONFIG_FIELDS = ("model_path", "command", "extra_args", "env", "host", "port", "sleep_mode",
                 "tensor_parallel_size", "gpus")


def config_fields(model_config: Any) -> dict[str, Any]:
    """The JSON-able settings of `model_config` an image depends on."""
    out: dict[str, Any] = {}
    for name in CONFIG_FIELDS:
        value = getattr(model_config, name, None)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, dict):
            value = dict(sorted(value.items()))
        out[name] = value
    return out


def config_hash(model_config: Any) -> str:
    raw = json.dumps(config_fields(model_config), sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def checked_image_path(path: str, model: str) -> Path:
    """A configured `checkpoint_path`: absolute, no '..' (a path that climbs out of
    where the operator pointed is refused, not resolved)."""
    p = Path(path)
    if not p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            model, "restore",
            f"checkpoint_path {path!r} must be an absolute path without '..'; give the image directory itself",
        )
    return p


@dataclass
class Manifest:
    """What an image set is; stored as manifest.json inside it."""

    model: str
    model_path: str
    config_hash: str
    config: dict[str, Any]
    eviction: str
    created: float = field(default_factory=time.time)
    backend_version: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    criu_version: str | None = None
    #: the dumped tree's root PID (CRIU restores it with this PID)
    pid: int | None = None
    #: [inode, fd] of the journald stream sockets declared external at dump (--inherit-fd on restore)
    external_sockets: list[list[int]] = field(default_factory=list)
    #: the deterministic answer before the dump (post-restore canary)
    canary: str | None = None
    size_bytes: int = 0
    checksums: dict[str, str] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in data.items() if k in known})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class ImageCatalogue:
    """Image sets under `root`, one directory per model, bounded by `quota_gib`."""

    def __init__(self, root: str | os.PathLike[str], quota_gib: float | None = None):
        self.root = Path(root)
        self.quota_bytes = int(quota_gib * (1 << 30)) if quota_gib else None

    # -- paths --------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        """`<root>/<model>`, refusing names that would leave the root."""
        try:
            validate_model_name(model)
        except ValueError as exc:
            raise CheckpointError(model, "checkpoint", str(exc)) from None
        return self.root / model  # the name rule admits no '/' and no '..'

    def images_path(self, model: str) -> Path:
        return self.model_dir(model) / IMAGES

    def pid_file(self, model: str) -> Path:
        return self.model_dir(model) / "restore.pid"

    # -- writing ------------------------------------------------------------

    def stage(self, model: str) -> Path:
        """An empty `images.new/` to dump into; fails with the fix when the disk refuses."""
        staging = self.model_dir(model) / STAGING
        try:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True, mode=0o700)
            probe = staging / ".write-test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(
                model, "checkpoint",
                f"cannot write images to {staging}: {exc.strerror or exc}; make images_dir writable "
                "by root and give it free space",
            ) from None
        return staging

    def commit(self, model: str, staging: Path, manifest: Manifest) -> Manifest:
        """Checksum the staged set, write its manifest atomically, swap it into place."""
        try:
            manifest.checksums = {str(p.relative_to(staging)): _sha256(p) for p in _files(staging)}
            manifest.size_bytes = sum((staging / name).stat().st_size for name in manifest.checksums)
            tmp = staging / (MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, staging / MANIFEST)
            self._swap_in(model, staging)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                model, "checkpoint",
                f"cannot store the image set in {self.model_dir(model)}: {exc.strerror or exc}; free disk "
                "space or lower checkpoint.quota_gib",
            ) from None
        log.info("model %s: image set stored (%.1f MiB, %d files)", model, manifest.size_bytes / (1 << 20),
                 len(manifest.checksums))
        return manifest

    def _swap_in(self, model: str, directory: Path) -> None:
        """Make `directory` the model's image set (renames; the old set goes)."""
        final = self.images_path(model)
        old = self.model_dir(model) / OLD
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(directory, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)

    def install(self, model: str, directory: Path) -> Manifest:
        """Make a downloaded, verified image set (in the model's directory) its image set."""
        manifest = self.read_manifest(directory)
        if manifest is None:
            raise ImageRejected(model, f"the downloaded image in {directory} has no readable manifest.json")
        try:
            self._swap_in(model, directory)
        except OSError as exc:
            raise CheckpointError(model, "restore", f"cannot put the downloaded image in place in "
                                  f"{self.model_dir(model)}: {exc.strerror or exc}") from None
        log.info("model %s: downloaded image set installed (%.1f MiB, %d files)", model,
                 manifest.size_bytes / (1 << 20), len(manifest.checksums))
        return manifest

    def discard_staging(self, model: str) -> None:
        shutil.rmtree(self.model_dir(model) / STAGING, ignore_errors=True)

    def remove(self, model: str) -> None:
        shutil.rmtree(self.model_dir(model), ignore_errors=True)

    # -- reading ------------------------------------------------------------

    @staticmethod
    def read_manifest(images: Path) -> Manifest | None:
        try:
            data = json.loads((images / MANIFEST).read_text())
            return Manifest.from_dict(data) if isinstance(data, dict) else None
        except (OSError, ValueError, TypeError):
            return None

    def load(self, model: str) -> Manifest | None:
        return self.read_manifest(self.images_path(model))

    def has_image(self, model: str) -> bool:
        return self.load(model) is not None

    def verify(self, model: str, model_config: Any, images: Path | None = None,
               *, checksums: bool = True) -> Manifest:
        """The manifest of `images` (default: the model's set) when it may be restored
        for `model_config`; raises ImageRejected saying what differs otherwise."""
        images = images or self.images_path(model)
        manifest = self.read_manifest(images)
        if manifest is None:
            reason = "has no image set" if not images.exists() else "has no readable manifest.json"
            raise ImageRejected(model, f"{images} {reason}; checkpoint the model again ('llmuxd checkpoint {model}')")
        if manifest.model != model:
            raise ImageRejected(model, f"the image set in {images} is of model '{manifest.model}', not '{model}'; "
                                       "point checkpoint_path at this model's images")
        current = config_fields(model_config)
        if manifest.config_hash != config_hash(model_config):
            diffs = [f"{k}: image has {manifest.config.get(k)!r}, config has {v!r}"
                     for k, v in current.items() if manifest.config.get(k) != v]
            what = "; ".join(diffs) or "settings changed"
            raise ImageRejected(model, f"the image set in {images} was made with other settings ({what}); "
                                       "it will be replaced by the next checkpoint")
        if checksums:
            for name, expected in manifest.checksums.items():
                path = images / name
                if not path.is_file():
                    raise ImageRejected(model, f"image file {path} is missing; the set is incomplete and will be replaced")
                if _sha256(path) != expected:
                    raise ImageRejected(model, f"image file {path} does not match its checksum (truncated or "
                                               "corrupted); the set will be replaced")
        return manifest

    # -- housekeeping -------------------------------------------------------

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def clean_removed(self, configured: Iterable[str]) -> list[str]:
        """Delete the image sets of models no longer configured (called on reload)."""
        keep = set(configured)
        removed = [m for m in self.models() if m not in keep]
        for model in removed:
            shutil.rmtree(self.root / model, ignore_errors=True)
            log.info("removed the checkpoint images of '%s' (no longer configured)", model)
        return removed

    def gc(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete the oldest image sets until the total fits `quota_gib`; `keep`
        (the sets that back checkpointed models right now) go last, never."""
        if self.quota_bytes is None:
            return []
        keep_set = set(keep)
        sets = []
        for model in self.models():
            path = self.root / model
            manifest = self.read_manifest(path / IMAGES)
            sets.append((manifest.created if manifest else 0.0, model, dir_size(path)))
        total = sum(size for _, _, size in sets)
        removed = []
        for _created, model, size in sorted(sets):
            if total <= self.quota_bytes:
                break
            if model in keep_set:
                continue
            shutil.rmtree(self.root / model, ignore_errors=True)
            total -= size
            removed.append(model)
            log.warning("removed the checkpoint images of '%s' to stay within quota_gib", model)
        return removed
