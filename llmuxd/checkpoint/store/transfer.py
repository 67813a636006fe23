"""Upload and download of one image set (blocking; the store runs them in threads).

Upload: every file goes under a new generation's keys, big ones as multipart
uploads of bounded parts streamed from disk, each part retried on its own;
then the store manifest (sizes and SHA-256 of every file) is written, which
publishes the generation; then the previous generation is deleted. Download:
each file is streamed to `<file>.part` while hashed; a broken read resumes
with a ranged GET where it stopped; a file is renamed to its name only when
its size and SHA-256 match the manifest. Nothing holds more than one read
buffer of an image in memory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmuxd.checkpoint.catalogue import MANIFEST
from llmuxd.checkpoint.store.client import ObjectStoreError, Timeouts, TransferCancelled, translate
from llmuxd.checkpoint.store.layout import FileEntry, Layout, StoreManifest, new_generation, safe_relpath
from llmuxd.checkpoint.store.progress import DOWNLOAD, UPLOAD, ProgressMeter, Reporter

log = logging.getLogger("llmuxd.checkpoint.store")

MiB = 1 << 20
#: S3's limits: at most 10,000 parts, each but the last at least 5 MiB
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * MiB
DOWNLOAD_DIR = "images.download"
GENERATION_MARKER = ".generation"
PART_SUFFIX = ".part"
#: generations nobody published, older than this, are left-overs of crashed uploads
STALE_GENERATION_AGE = 2 * 86400.0
#: how often the manifest may change under a download before it gives up
DOWNLOAD_ROUNDS = 3


@dataclass(frozen=True)
class TransferSettings:
    """How transfers run. The defaults suit tens of GiB over a WAN link."""

    part_size: int = 64 * MiB
    concurrency: int = 4
    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    chunk: int = 1 * MiB
    progress_interval: float = 10.0
    timeouts: Timeouts = field(default_factory=Timeouts)

    def part_size_for(self, size: int) -> int:
        return max(self.part_size, MIN_PART_SIZE, math.ceil(size / MAX_PARTS))


class ChecksumMismatch(ObjectStoreError):
    """A downloaded object differs from what the manifest says: corrupted, not retried."""


class Stop:
    """Cancellation seen by every worker: the caller's event, or a failed sibling."""

    def __init__(self, outer: threading.Event | None = None):
        self.outer = outer or threading.Event()
        self.failed = threading.Event()

    def is_set(self) -> bool:
        return self.outer.is_set() or self.failed.is_set()

    def check(self) -> None:
        if self.is_set():
            raise TransferCancelled()

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.is_set() and time.monotonic() < end:
            self.outer.wait(min(0.05, max(0.0, end - time.monotonic())))
        self.check()


@dataclass
class Session:
    """What every step of one transfer needs."""

    client: Any
    layout: Layout
    where: str  # "bucket 'b' at http://127.0.0.1:9000"
    settings: TransferSettings
    secrets: tuple[str, ...]
    report: Reporter
    stop: Stop

    def error(self, exc: BaseException, operation: str) -> ObjectStoreError:
        return translate(exc, where=self.where, operation=operation, secrets=self.secrets)

    def attempt(self, operation: str, fn: Callable[[], Any], attempts: int | None = None) -> Any:
        """`fn()` with retries on network trouble and 5xx; others raise at once."""
        attempts = attempts or self.settings.attempts
        delay = self.settings.backoff
        for number in range(1, attempts + 1):
            self.stop.check()
            try:
                return fn()
            except TransferCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - translated, then retried or raised
                if self.stop.is_set():
                    raise TransferCancelled() from None
                error = self.error(exc, operation)
                if not error.retryable or number == attempts:
                    raise error from None
                log.warning("%s (attempt %d of %d); retrying in %.1fs", error, number, attempts, delay)
                self.stop.sleep(delay)
                delay = min(delay * 2, self.settings.max_backoff)
        raise AssertionError("unreachable")  # pragma: no cover


def run_parallel(jobs: list[Callable[[], None]], workers: int, stop: Stop) -> None:
    """Run `jobs` on up to `workers` daemon threads (never keeping the process
    alive at exit); the first failure stops the rest and is raised."""
    pending: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
    for job in jobs:
        pending.put(job)
    errors: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)
                stop.failed.set()
                return

    threads = [threading.Thread(target=worker, daemon=True, name="llmux-s3") for _ in range(min(workers, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first = next((e for e in errors if not isinstance(e, TransferCancelled)), errors[0])
        raise first
    stop.check()


class FileSlice:
    """`length` bytes of a file from `offset`, as a seekable body botocore can
    hash, send and rewind for a retry; reads stop when the transfer is cancelled."""

    def __init__(self, path: Path, offset: int, length: int, stop: Stop):
        self._f = open(path, "rb")
        self._offset, self._length, self._pos, self._stop = offset, length, 0, stop
        self._f.seek(offset)

    def read(self, size: int = -1) -> bytes:
        self._stop.check()
        left = self._length - self._pos
        if size is None or size < 0 or size > left:
            size = left
        data = self._f.read(size) if size > 0 else b""
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        self._f.seek(self._offset + self._pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._length - self._pos

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "FileSlice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_file(path: Path, chunk: int = MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def image_entries(images: Path, checksums: dict[str, str], extra: tuple[str, ...] = ()) -> dict[str, FileEntry]:
    """Size and SHA-256 of the files of an image set: those its catalogue manifest
    lists (checksummed when the set was committed), plus `extra` (the manifest
    itself), hashed now. Files CRIU adds later (stats-restore) are not part of it."""
    entries = {}
    for rel in sorted(set(checksums) | set(extra)):
        path = images / rel
        entries[rel] = FileEntry(path.stat().st_size, checksums.get(rel) or sha256_file(path))
    return entries


# -- reading the manifest -----------------------------------------------------

def read_manifest(s: Session) -> StoreManifest | None:
    """The published manifest, None when the model has none."""
    def get() -> bytes:
        return s.client.get_object(Bucket=s.layout.bucket, Key=s.layout.manifest_key)["Body"].read()

    try:
        raw = s.attempt(f"read {s.layout.manifest_key}", get)
    except ObjectStoreError as exc:
        if exc.missing:
            return None
        raise
    try:
        manifest = StoreManifest.from_json(raw)
    except ValueError as exc:
        raise ObjectStoreError(f"object store {s.where}: {s.layout.url(s.layout.manifest_key)} is unreadable ({exc}); "
                               "delete it, the next checkpoint publishes a new one") from None
    if manifest.model != s.layout.model:
        raise ObjectStoreError(f"object store {s.where}: {s.layout.url(s.layout.manifest_key)} is of model "
                               f"'{manifest.model}', not '{s.layout.model}'; check checkpoint.object_store.prefix")
    return manifest


# -- upload -------------------------------------------------------------------

def upload_image(s: Session, images: Path, identity: dict[str, Any], checksums: dict[str, str],
                 orphans: set[str], extra: tuple[str, ...] = (MANIFEST,)) -> StoreManifest:
    """Publish the image set in `images` as a new generation and return its manifest.

    On failure the previous generation stays published; raises ObjectStoreError
    or TransferCancelled after trying to delete what was uploaded. `orphans`
    holds the generations whose deletion failed (the server was gone); they are
    deleted after the next publish, and the set is updated in place."""
    entries = image_entries(images, checksums, extra)
    previous = read_manifest(s)
    if previous is not None and previous.checksums() == {k: e.sha256 for k, e in entries.items()}:
        log.info("model %s: the image in %s is published already (generation %s)", s.layout.model,
                 s.layout.url(), previous.generation)
        return previous
    generation = new_generation()
    manifest = StoreManifest(model=s.layout.model, generation=generation, files=entries, **identity)
    meter = ProgressMeter(s.report, UPLOAD, s.layout.model, s.layout.url(s.layout.generation_prefix(generation)),
                          s.client.meta.endpoint_url, generation, manifest.size_bytes, len(entries),
                          interval=s.settings.progress_interval)
    meter.started()
    multipart: dict[str, str] = {}
    try:
        jobs: list[Callable[[], None]] = []
        completions: list[Callable[[], None]] = []
        for rel, entry in entries.items():
            key = s.layout.file_key(generation, rel)
            if entry.size <= s.settings.part_size:
                jobs.append(_put_job(s, images / rel, key, entry.size, meter))
            else:
                upload_id = s.attempt(f"start the upload of {rel}", lambda key=key: s.client.create_multipart_upload(
                    Bucket=s.layout.bucket, Key=key)["UploadId"])
                multipart[key] = upload_id
                part_jobs, complete = _multipart_jobs(s, images / rel, key, upload_id, entry.size, meter)
                jobs += part_jobs
                completions.append(complete)
        run_parallel(jobs, s.settings.concurrency, s.stop)
        for complete in completions:
            complete()
        multipart.clear()
        s.stop.check()  # the last moment a cancelled upload can still not publish
        body = manifest.to_json().encode()
        s.attempt(f"publish {s.layout.manifest_key}", lambda: s.client.put_object(
            Bucket=s.layout.bucket, Key=s.layout.manifest_key, Body=body, ContentType="application/json"))
    except BaseException as exc:
        error = str(exc) if not isinstance(exc, TransferCancelled) else "cancelled"
        meter.failed(error)
        orphans.update(delete_generations(s, {generation}, multipart=multipart))
        raise
    meter.finished()
    drop = set(orphans) | stale_generations(s, keep=generation)
    if previous is not None:
        drop.add(previous.generation)
    drop.discard(generation)
    orphans.clear()
    orphans.update(delete_generations(s, drop))
    return manifest


def _put_job(s: Session, path: Path, key: str, size: int, meter: ProgressMeter) -> Callable[[], None]:
    def job() -> None:
        def put() -> None:
            with FileSlice(path, 0, size, s.stop) as body:
                s.client.put_object(Bucket=s.layout.bucket, Key=key, Body=body, ContentLength=size)
        s.attempt(f"upload {key}", put)
        meter.add(size)
    return job


def _multipart_jobs(s: Session, path: Path, key: str, upload_id: str, size: int,
                    meter: ProgressMeter) -> tuple[list[Callable[[], None]], Callable[[], None]]:
    part_size = s.settings.part_size_for(size)
    etags: dict[int, str] = {}
    jobs = []
    for number, offset in enumerate(range(0, size, part_size), start=1):
        length = min(part_size, size - offset)

        def job(number: int = number, offset: int = offset, length: int = length) -> None:
            def put() -> str:
                with FileSlice(path, offset, length, s.stop) as body:
                    return s.client.upload_part(Bucket=s.layout.bucket, Key=key, UploadId=upload_id,
                                                PartNumber=number, Body=body, ContentLength=length)["ETag"]
            etags[number] = s.attempt(f"upload part {number} of {key}", put)
            meter.add(length)
        jobs.append(job)

    def complete() -> None:
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        s.attempt(f"complete the upload of {key}", lambda: s.client.complete_multipart_upload(
            Bucket=s.layout.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
    return jobs, complete


def stale_generations(s: Session, keep: str, now: float | None = None) -> set[str]:
    """Unpublished generations older than STALE_GENERATION_AGE (crashed uploads)."""
    now = time.time() if now is None else now
    stale = set()
    for generation in list_generations(s):
        try:
            made = time.mktime(time.strptime(generation.split("-", 1)[0], "%Y%m%dT%H%M%SZ")) - time.timezone
        except ValueError:
            continue
        if generation != keep and now - made > STALE_GENERATION_AGE:
            stale.add(generation)
    return stale


def list_generations(s: Session) -> set[str]:
    found: set[str] = set()
    try:
        paginator = s.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=s.layout.bucket, Prefix=s.layout.generations_prefix, Delimiter="/"):
            for entry in page.get("CommonPrefixes", []):
                generation = s.layout.generation_of(entry["Prefix"])
                if generation:
                    found.add(generation)
    except Exception as exc:  # noqa: BLE001 - housekeeping only
        log.warning("%s", s.error(exc, "list generations"))
    return found


def delete_generations(s: Session, generations: set[str], *, multipart: dict[str, str] | None = None) -> set[str]:
    """Delete every object (and abort every multipart upload) of `generations`;
    one attempt each, this is clean-up. Returns the generations left behind."""
    left = set()
    for generation in sorted(generations):
        prefix = s.layout.generation_prefix(generation)
        try:
            uploads = dict(multipart or {})
            for page in s.client.get_paginator("list_multipart_uploads").paginate(Bucket=s.layout.bucket,
                                                                                   Prefix=prefix):
                for upload in page.get("Uploads", []):
                    uploads.setdefault(upload["Key"], upload["UploadId"])
            for key, upload_id in uploads.items():
                if key.startswith(prefix):
                    try:
                        s.client.abort_multipart_upload(Bucket=s.layout.bucket, Key=key, UploadId=upload_id)
                    except Exception as exc:  # noqa: BLE001
                        if not s.error(exc, "abort").missing:
                            raise
            for page in s.client.get_paginator("list_objects_v2").paginate(Bucket=s.layout.bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    s.client.delete_objects(Bucket=s.layout.bucket, Delete={"Objects": keys, "Quiet": True})
        except Exception as exc:  # noqa: BLE001 - remembered and tried again after the next publish
            log.warning("could not delete generation %s of model %s (%s); it is deleted after the next upload",
                        generation, s.layout.model, s.error(exc, "delete"))
            left.add(generation)
    return left


# -- download -----------------------------------------------------------------

def download_image(s: Session, model_dir: Path) -> tuple[StoreManifest, Path]:
    """Download the published generation into `model_dir/images.download/` and
    verify every file; returns the manifest and that directory (the caller moves
    it into place). A broken download keeps its `.part` files for the next try
    (same generation); a checksum mismatch deletes the directory."""
    seen: set[str] = set()
    for _round in range(DOWNLOAD_ROUNDS):
        manifest = read_manifest(s)
        if manifest is None:
            raise ObjectStoreError(f"object store {s.where}: there is no checkpoint image of model "
                                   f"'{s.layout.model}' under {s.layout.url()}", missing=True)
        bad = [name for name in manifest.files if not safe_relpath(name)]
        if bad:
            raise ObjectStoreError(f"object store {s.where}: {s.layout.url(s.layout.manifest_key)} names files "
                                   f"outside the image ({bad[0]!r}); not downloaded")
        target = _prepare(model_dir / DOWNLOAD_DIR, manifest.generation)
        meter = ProgressMeter(s.report, DOWNLOAD, s.layout.model,
                              s.layout.url(s.layout.generation_prefix(manifest.generation)),
                              s.client.meta.endpoint_url, manifest.generation, manifest.size_bytes,
                              len(manifest.files), interval=s.settings.progress_interval)
        meter.started()
        jobs = [_get_job(s, manifest, name, entry, target, meter) for name, entry in sorted(manifest.files.items())]
        try:
            run_parallel(jobs, s.settings.concurrency, s.stop)
        except ChecksumMismatch as exc:
            meter.failed(str(exc))
            shutil.rmtree(target, ignore_errors=True)
            raise
        except ObjectStoreError as exc:
            meter.failed(str(exc))
            if exc.missing and manifest.generation not in seen:
                seen.add(manifest.generation)  # replaced by a newer upload meanwhile: read the manifest again
                continue
            raise
        except BaseException as exc:
            meter.failed("cancelled" if isinstance(exc, TransferCancelled) else str(exc))
            raise
        (target / GENERATION_MARKER).unlink(missing_ok=True)
        meter.finished()
        return manifest, target
    raise ObjectStoreError(f"object store {s.where}: the image of model '{s.layout.model}' kept changing "
                           "while it was downloaded; try again", retryable=True)


def _prepare(target: Path, generation: str) -> Path:
    """`target` for `generation`: kept (to resume) when it holds the same generation."""
    marker = target / GENERATION_MARKER
    try:
        same = marker.read_text().strip() == generation
    except OSError:
        same = False
    if not same:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, mode=0o700)
        marker.write_text(generation + "\n")
    return target


def _get_job(s: Session, manifest: StoreManifest, name: str, entry: FileEntry, target: Path,
             meter: ProgressMeter) -> Callable[[], None]:
    key = s.layout.file_key(manifest.generation, name)

    def job() -> None:
        final = target / name
        if final.is_file() and final.stat().st_size == entry.size:
            meter.add(entry.size)  # verified by an earlier try: only verified files get their name
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + PART_SUFFIX)
        digest = hashlib.sha256()
        offset = 0
        if part.exists():
            if part.stat().st_size > entry.size:
                part.unlink()
            else:
                with open(part, "rb") as f:  # resume: the hash must cover what is there
                    for block in iter(lambda: f.read(s.settings.chunk), b""):
                        digest.update(block)
                        offset += len(block)
                meter.add(offset)
        state = {"offset": offset}

        def fetch() -> None:
            start = state["offset"]
            if start >= entry.size and entry.size > 0:
                return
            ranged = {"Range": f"bytes={start}-"} if start else {}
            body = s.client.get_object(Bucket=s.layout.bucket, Key=key, **ranged)["Body"]
            try:
                with open(part, "ab") as f:
                    for block in body.iter_chunks(s.settings.chunk):
                        s.stop.check()
                        f.write(block)
                        digest.update(block)
                        state["offset"] += len(block)
                        meter.add(len(block))
                        if state["offset"] > entry.size:
                            break
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                body.close()
            if state["offset"] < entry.size:
                raise ConnectionError(f"the read of {key} ended at byte {state['offset']} of {entry.size}")

        s.attempt(f"download {key}", fetch)
        if state["offset"] != entry.size or digest.hexdigest() != entry.sha256:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"object store {s.where}: {s.layout.url(key)} does not match its checksum in "
                f"{s.layout.url(s.layout.manifest_key)} (got {state['offset']} bytes with sha256 "
                f"{digest.hexdigest()[:16]}..., expected {entry.size} bytes with sha256 {entry.sha256[:16]}...); "
                "the object is corrupted, the image is not used")
        part.touch()  # an empty file has no .part yet
        os.replace(part, final)

    return job
