"""Checkpoint images in S3-compatible object storage (``checkpoint.object_store``).

`ObjectStore` is what the checkpoint manager uses: `publish_later()` after a
dump (a background task: the switch does not wait for the upload), `fetch()`
before a restore on a host that lacks the image, `published()` at start to
find models that can restore lazily, `check()` for the start-up report.
Transfers run on daemon threads (botocore blocks), never on the event loop;
cancelling the awaiting task stops the thread at its next read.

- `layout`: key names and the store manifest
- `credentials`: config, systemd credentials, AWS environment
- `client`: botocore client, error translation
- `transfer`: multipart upload, ranged-resume download, checksums
- `progress`: bytes/total/rate reports for the journal
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from llmuxd.checkpoint.store.client import (
    ObjectStoreError,
    TransferCancelled,
    endpoint_url,
    make_client,
    scrub,
    translate,
)
from llmuxd.checkpoint.store.credentials import MissingCredentials, resolve_credentials
from llmuxd.checkpoint.store.layout import Layout, StoreManifest, normalise_prefix
from llmuxd.checkpoint.store.progress import Reporter, TransferEvent, log_transfer
from llmuxd.checkpoint.store.transfer import (
    ChecksumMismatch,
    Session,
    Stop,
    TransferSettings,
    download_image,
    read_manifest,
    upload_image,
)

__all__ = ["ChecksumMismatch", "ObjectStore", "ObjectStoreError", "StoreManifest", "TransferEvent",
           "TransferSettings"]

log = logging.getLogger("llmuxd.checkpoint.store")
T = TypeVar("T")

#: seconds a closing daemon waits for uploads to notice they were cancelled
CLOSE_WAIT = 5.0
#: seconds the start-up check of the bucket may take
CHECK_TIMEOUT = 20.0


async def in_thread(fn: Callable[[], T], stop: threading.Event | None = None) -> T:
    """Run blocking `fn` on a daemon thread (one that never holds up the
    interpreter's exit, unlike the default executor's); cancelling the caller
    sets `stop`, which the transfer checks between reads."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, daemon=True, name="llmux-s3-transfer").start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads it now
        raise


class ObjectStore:
    """One bucket/prefix of `checkpoint.object_store`; uploads one image per model at a time."""

    def __init__(self, config: Any, *, settings: TransferSettings | None = None, report: Reporter | None = None,
                 env: dict[str, str] | None = None):
        self.config = config
        self.settings = settings or TransferSettings()
        self.report: Reporter = report or log_transfer
        self._env = env
        self._client: Any = None
        self._secrets: tuple[str, ...] = ()
        self._client_lock = threading.Lock()
        #: model -> (upload task, its stop event)
        self._uploads: dict[str, tuple[asyncio.Task, threading.Event]] = {}
        #: model -> generations whose deletion failed, deleted after its next publish
        self._orphans: dict[str, set[str]] = {}
        #: model -> what its last background upload published / why it failed
        self.last_published: dict[str, StoreManifest] = {}
        self.upload_errors: dict[str, str] = {}

    # -- naming -------------------------------------------------------------

    @property
    def where(self) -> str:
        """How messages name the store: bucket 'b' at http://host:port."""
        return f"bucket '{self.config.bucket}' at {endpoint_url(self.config.endpoint)}"

    def url(self, model: str | None = None) -> str:
        base = normalise_prefix(self.config.prefix or "")
        return f"s3://{self.config.bucket}/{base}{model + '/' if model else ''}"

    def layout(self, model: str) -> Layout:
        return Layout(self.config.bucket, self.config.prefix or "", model)

    # -- the client (built on first use, in a worker thread) -----------------

    def _session(self, model: str, stop: threading.Event | None = None) -> Session:
        with self._client_lock:
            if self._client is None:
                try:
                    credentials = resolve_credentials(self.config, self._env)
                except MissingCredentials as exc:
                    raise ObjectStoreError(f"object store {self.where}: {exc}") from None
                self._secrets = credentials.secrets()
                self._client = make_client(self.config, credentials, timeouts=self.settings.timeouts,
                                           connections=self.settings.concurrency + 2)
        return Session(self._client, self.layout(model), self.where, self.settings, self._secrets, self.report,
                       Stop(stop))

    # -- operations -----------------------------------------------------------

    async def check(self, timeout: float = CHECK_TIMEOUT) -> str | None:
        """None when the bucket answers with these credentials within `timeout`,
        else one line saying why not."""
        def head() -> None:
            s = self._session("-")
            try:
                s.client.head_bucket(Bucket=self.config.bucket)
            except Exception as exc:  # noqa: BLE001
                raise translate(exc, where=self.where, operation="check the bucket", secrets=self._secrets) from None
        try:
            await asyncio.wait_for(in_thread(head), timeout)
        except ObjectStoreError as exc:
            return str(exc)
        except asyncio.TimeoutError:
            return f"object store {self.where}: no answer within {timeout:.0f}s; check the endpoint and the network"
        return None

    async def published(self, model: str) -> StoreManifest | None:
        """The manifest of `model`'s published image, None when there is none."""
        stop = threading.Event()
        return await in_thread(lambda: read_manifest(self._session(model, stop)), stop)

    async def publish(self, model: str, images: Path, identity: dict[str, Any], checksums: dict[str, str],
                      stop: threading.Event | None = None) -> StoreManifest:
        """Upload `images` as `model`'s new generation (waits for it)."""
        stop = stop or threading.Event()
        orphans = self._orphans.setdefault(model, set())

        def upload() -> StoreManifest:
            return upload_image(self._session(model, stop), images, identity, checksums, orphans)
        return await in_thread(upload, stop)

    def publish_later(self, model: str, images: Path, identity: dict[str, Any],
                      checksums: dict[str, str]) -> asyncio.Task:
        """Upload in the background; a newer image of the same model cancels this one
        (the newer upload starts when the older has stopped)."""
        previous = self._uploads.get(model)
        self.cancel_upload(model)
        stop = threading.Event()

        async def run() -> StoreManifest | None:
            if previous is not None:
                await asyncio.gather(previous[0], return_exceptions=True)
            try:
                manifest = await self.publish(model, images, identity, checksums, stop)
                self.last_published[model] = manifest
                self.upload_errors.pop(model, None)
                return manifest
            except (TransferCancelled, asyncio.CancelledError):
                self.upload_errors[model] = "cancelled (a newer image or shutdown)"
                log.info("model %s: upload of its checkpoint image to %s stopped (cancelled); the previous "
                         "image stays published", model, self.url(model))
            except ObjectStoreError as exc:
                self.upload_errors[model] = str(exc)
                log.warning("model %s: checkpoint image not uploaded: %s; the previous image stays published",
                            model, exc)
            except Exception as exc:  # noqa: BLE001 - a background task must say what went wrong
                self.upload_errors[model] = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
                log.error("model %s: checkpoint image upload failed: %s", model, self.upload_errors[model])
            finally:
                if self._uploads.get(model, (None,))[0] is task:
                    del self._uploads[model]
            return None

        task = asyncio.get_running_loop().create_task(run(), name=f"llmux-upload-{model}")
        self._uploads[model] = (task, stop)
        return task

    def uploading(self, model: str) -> bool:
        return model in self._uploads

    def cancel_upload(self, model: str) -> None:
        """Ask `model`'s upload to stop (its image is about to change or go); does not wait."""
        entry = self._uploads.get(model)
        if entry is not None:
            entry[1].set()

    async def wait_uploads(self) -> None:
        """Wait for every background upload (the `llmuxd checkpoint` tool waits before it exits)."""
        tasks = [task for task, _ in self._uploads.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def fetch(self, model: str, model_dir: Path) -> tuple[StoreManifest, Path]:
        """Download `model`'s published image into `model_dir/images.download/`, verified."""
        stop = threading.Event()
        return await in_thread(lambda: download_image(self._session(model, stop), model_dir), stop)

    async def close(self) -> None:
        """Stop the uploads (the previous generations stay published) and wait a little."""
        for model in list(self._uploads):
            self.cancel_upload(model)
        tasks = [task for task, _ in self._uploads.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT)
