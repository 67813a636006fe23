"""Where a model's image lives in the bucket, and the manifest that publishes it.

Keys (``prefix`` is ``checkpoint.object_store.prefix``, read as a folder)::

    <prefix><model>/manifest.json                    the published generation (written last)
    <prefix><model>/generations/<generation>/<file>  one image set, never overwritten

A generation is uploaded under keys of its own; it becomes the model's image
only when ``manifest.json`` (one PUT, atomic in S3) names it with the size and
SHA-256 of every file. Until then readers keep getting the previous one, so an
upload cut short leaves the previous generation whole. Keys outside
``generations/`` are never touched (a bucket shared with llmux 0.7 keeps its
``<model>/images/``).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

STORE_MANIFEST = "manifest.json"
GENERATIONS = "generations/"
FORMAT = 1


def normalise_prefix(prefix: str) -> str:
    """'' stays ''; 'a', '/a/', 'a/' all become 'a/'."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def new_generation(clock: Any = time.time) -> str:
    """Sortable by time, unique across hosts: 20260101T120000Z-1a2b3c4d."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock())) + "-" + secrets.token_hex(4)


@dataclass(frozen=True)
class Layout:
    """The keys of one model's images in one bucket."""

    bucket: str
    prefix: str
    model: str

    @property
    def base(self) -> str:
        return normalise_prefix(self.prefix) + self.model + "/"

    @property
    def manifest_key(self) -> str:
        return self.base + STORE_MANIFEST

    @property
    def generations_prefix(self) -> str:
        return self.base + GENERATIONS

    def generation_prefix(self, generation: str) -> str:
        return self.generations_prefix + generation + "/"

    def file_key(self, generation: str, relpath: str) -> str:
        return self.generation_prefix(generation) + relpath

    def generation_of(self, key: str) -> str | None:
        """The generation a key under generations/ belongs to."""
        if not key.startswith(self.generations_prefix):
            return None
        rest = key[len(self.generations_prefix):]
        return rest.split("/", 1)[0] or None

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key or self.base}"


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass
class StoreManifest:
    """What ``<model>/manifest.json`` says: the published generation and its files."""

    model: str
    generation: str
    files: dict[str, FileEntry]
    #: the image catalogue manifest's identity (llmuxd.checkpoint.catalogue.Manifest)
    config_hash: str = ""
    eviction: str = ""
    created: float = 0.0
    published: float = field(default_factory=time.time)
    host: str = field(default_factory=socket.gethostname)
    format: int = FORMAT

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def checksums(self) -> dict[str, str]:
        return {name: f.sha256 for name, f in self.files.items()}

    def to_json(self) -> str:
        data = asdict(self)
        data["size_bytes"] = self.size_bytes
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "StoreManifest":
        """Raises ValueError when it is not one of ours (or a newer format)."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an llmux store manifest of format {FORMAT}")
        try:
            files = {str(k): FileEntry(int(v["size"]), str(v["sha256"])) for k, v in data["files"].items()}
            return cls(model=str(data["model"]), generation=str(data["generation"]), files=files,
                       config_hash=str(data.get("config_hash", "")), eviction=str(data.get("eviction", "")),
                       created=float(data.get("created", 0.0)), published=float(data.get("published", 0.0)),
                       host=str(data.get("host", "")))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed store manifest: {exc}") from None


def safe_relpath(name: str) -> bool:
    """A file name from a manifest that stays inside the directory it is written to."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and os.sep == "/"
