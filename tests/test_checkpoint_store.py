"""Checkpoint images in object storage, against a real S3-compatible server
(moto_server on 127.0.0.1, SigV4 checked; tests/s3_server.py). No root: the
image sets are made by the catalogue from test files; the CRIU round trip is
in tests/test_criu_s3.py."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest

from llmuxd.checkpoint.catalogue import ImageCatalogue, Manifest, config_fields, config_hash
from llmuxd.checkpoint.errors import CheckpointError, ImageRejected
from llmuxd.checkpoint.manager import CheckpointManager
from llmuxd.checkpoint.store import ChecksumMismatch, ObjectStore, ObjectStoreError, TransferSettings
from llmuxd.checkpoint.store.client import Timeouts
from llmuxd.checkpoint.store.credentials import MissingCredentials, resolve_credentials
from llmuxd.checkpoint.store.layout import StoreManifest
from llmuxd.config import Config
from llmuxd.lifecycle import BackendState
from llmuxd.orchestrator import Orchestrator
from llmuxd.runtime.subprocess import SubprocessRuntime

pytestmark = pytest.mark.s3

MiB = 1 << 20
MODEL = "qwen-7b"
FAST = TransferSettings(part_size=5 * MiB, concurrency=2, attempts=3, backoff=0.05, progress_interval=0.0,
                        timeouts=Timeouts(connect=2.0, read=3.0))


def config_for(images: Path, store: dict | None, **model: object) -> Config:
    data: dict = {"models": {MODEL: {"model_path": "/models/qwen", "eviction": "discard+checkpoint", **model}},
                  "checkpoint": {"images_dir": str(images)}}
    if store is not None:
        data["checkpoint"]["object_store"] = store
    return Config.from_dict(data)


def store_config(server, bucket: str, endpoint: str | None = None, **over: str) -> dict:
    return {"endpoint": endpoint or server.endpoint, "bucket": bucket, "access_key": server.access_key,
            "secret_key": server.secret_key, "prefix": "hosts/a", **over}


def make_image(config: Config, files: dict[str, int | bytes]) -> tuple[ImageCatalogue, Manifest]:
    """A committed image set of random files (sizes) or given bytes."""
    catalogue = ImageCatalogue(config.checkpoint.images_dir)
    staging = catalogue.stage(MODEL)
    for name, content in files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(content) if isinstance(content, int) else content)
    mc = config.models[MODEL]
    manifest = Manifest(model=MODEL, model_path=mc.model_path, config_hash=config_hash(mc), config=config_fields(mc),
                        eviction="discard+checkpoint", canary="Paris")
    return catalogue, catalogue.commit(MODEL, staging, manifest)


def identity(manifest: Manifest) -> dict:
    return {"config_hash": manifest.config_hash, "eviction": manifest.eviction, "created": manifest.created}


async def publish(store: ObjectStore, catalogue: ImageCatalogue, manifest: Manifest) -> StoreManifest:
    return await store.publish(MODEL, catalogue.images_path(MODEL), identity(manifest), dict(manifest.checksums))


def tree(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory`."""
    if not directory.exists():
        return {}
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


IMAGE = {"pages-1.img": 12 * MiB + 123, "core-1.img": 4096, "fdinfo/fd-3.img": 10, "empty.img": b""}


@pytest.fixture
def bucket(s3_server):
    return s3_server.new_bucket()


async def test_publish_uploads_every_file_then_a_fresh_host_downloads_the_same_image(s3_server, bucket, tmp_path):
    config = config_for(tmp_path / "host-a", store_config(s3_server, bucket))
    catalogue, manifest = make_image(config, IMAGE)
    store = ObjectStore(config.checkpoint.object_store, settings=FAST)
    published = await publish(store, catalogue, manifest)

    keys = s3_server.keys(bucket)
    base = f"hosts/a/{MODEL}/"
    gen = f"{base}generations/{published.generation}/"
    assert set(keys) == {base + "manifest.json"} | {gen + name for name in tree(catalogue.images_path(MODEL))}
    assert keys[gen + "pages-1.img"]["ETag"].strip('"').endswith("-3")  # a multipart upload of 3 parts
    body = s3_server.s3().get_object(Bucket=bucket, Key=base + "manifest.json")["Body"].read()
    remote = StoreManifest.from_json(body)
    assert remote.checksums() == tree(catalogue.images_path(MODEL))
    assert (remote.config_hash, remote.eviction) == (manifest.config_hash, "discard+checkpoint")

    # another host: an empty images_dir
    other = ImageCatalogue(tmp_path / "host-b")
    fetched, directory = await store.fetch(MODEL, other.model_dir(MODEL))
    assert fetched.generation == published.generation
    other.install(MODEL, directory)
    assert tree(other.images_path(MODEL)) == tree(catalogue.images_path(MODEL))
    assert other.verify(MODEL, config.models[MODEL]).canary == "Paris"
    assert sorted(p.name for p in other.model_dir(MODEL).iterdir()) == ["images"]


async def test_a_new_image_replaces_the_published_generation_and_leaves_nothing_behind(s3_server, bucket, tmp_path):
    config = config_for(tmp_path / "images", store_config(s3_server, bucket))
    store = ObjectStore(config.checkpoint.object_store, settings=FAST)
    first = await publish(store, *make_image(config, IMAGE))
    catalogue, manifest = make_image(config, {"pages-1.img": 7 * MiB, "core-1.img": 100})
    second = await publish(store, catalogue, manifest)
    assert second.generation != first.generation
    keys = set(s3_server.keys(bucket))
    old = [k for k in keys if f"/generations/{first.generation}/" in k]
    assert old == [], old
    assert len(keys) == 3 + 1  # two files, the catalogue's manifest.json, the store manifest
    assert s3_server.pending_uploads(bucket) == []
    # publishing the same image again uploads nothing
    assert (await publish(store, catalogue, manifest)).generation == second.generation


async def test_a_corrupted_object_is_refused_and_the_images_dir_is_untouched(s3_server, bucket, tmp_path, caplog):
    config = config_for(tmp_path / "host-a", store_config(s3_server, bucket))
    catalogue, manifest = make_image(config, IMAGE)
    published = await publish(ObjectStore(config.checkpoint.object_store, settings=FAST), catalogue, manifest)
    key = f"hosts/a/{MODEL}/generations/{published.generation}/pages-1.img"
    data = bytearray(s3_server.s3().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same size
    s3_server.s3().put_object(Bucket=bucket, Key=key, Body=bytes(data))

    # a host without the image: the manager downloads before restoring
    config_b = config_for(tmp_path / "host-b", store_config(s3_server, bucket))
    orch = Orchestrator(config_b, SubprocessRuntime())
    manager = CheckpointManager(config_b, store_settings=FAST).install(orch)
    model_dir = manager.catalogue.model_dir(MODEL)
    with pytest.raises(ImageRejected) as err:
        await manager.ensure_local_image(orch, orch._get(MODEL))
    message = str(err.value)
    assert "\n" not in message
    assert f"s3://{bucket}/{key} does not match its checksum" in message, message
    assert "corrupted" in message
    assert tree(model_dir) == {}  # no image, no half download
    assert not manager.catalogue.has_image(MODEL)


async def test_a_server_that_stops_answering_mid_upload_leaves_the_previous_generation(s3_server, bucket, tmp_path):
    config = config_for(tmp_path / "images", store_config(s3_server, bucket))
    good_catalogue, good = make_image(config, IMAGE)
    good_files = tree(good_catalogue.images_path(MODEL))
    first = await publish(ObjectStore(config.checkpoint.object_store, settings=FAST), good_catalogue, good)

    catalogue, manifest = make_image(config, {"pages-1.img": 30 * MiB, "core-1.img": 100})
    paused = threading.Event()

    def pause_after_first_part(event) -> None:
        if event.state == "progress" and event.done > 0 and not paused.is_set():
            s3_server.pause()
            paused.set()

    settings = TransferSettings(part_size=5 * MiB, concurrency=1, attempts=2, backoff=0.05, progress_interval=0.0,
                                timeouts=Timeouts(connect=1.0, read=1.0))
    store = ObjectStore(config.checkpoint.object_store, settings=settings, report=pause_after_first_part)
    try:
        with pytest.raises(ObjectStoreError) as err:
            await publish(store, catalogue, manifest)
    finally:
        s3_server.resume()
    assert paused.is_set()
    assert bucket in str(err.value) and s3_server.endpoint in str(err.value)

    # the previous generation is still the published one, and whole
    assert (await store.published(MODEL)).generation == first.generation
    fresh = ImageCatalogue(tmp_path / "fresh")
    _, directory = await ObjectStore(config.checkpoint.object_store, settings=FAST).fetch(MODEL, fresh.model_dir(MODEL))
    fresh.install(MODEL, directory)
    assert tree(fresh.images_path(MODEL)) == good_files

    # the next upload also clears what the broken one left
    third = await publish(store, catalogue, manifest)
    generations = {k.split("/generations/")[1].split("/")[0] for k in s3_server.keys(bucket) if "/generations/" in k}
    assert generations == {third.generation}
    assert s3_server.pending_uploads(bucket) == []


async def test_a_broken_download_resumes_where_it_stopped(s3_server, bucket, tmp_path, fault_proxy):
    config = config_for(tmp_path / "images", store_config(s3_server, bucket))
    catalogue, manifest = make_image(config, IMAGE)
    await publish(ObjectStore(config.checkpoint.object_store, settings=FAST), catalogue, manifest)
    via_proxy = config_for(tmp_path / "images", store_config(s3_server, bucket, endpoint=fault_proxy.endpoint))
    store = ObjectStore(via_proxy.checkpoint.object_store, settings=FAST)
    fault_proxy.cut("down", after_bytes=3 * MiB)  # only pages-1.img is that big
    fresh = ImageCatalogue(tmp_path / "fresh")
    _, directory = await store.fetch(MODEL, fresh.model_dir(MODEL))
    fresh.install(MODEL, directory)
    assert tree(fresh.images_path(MODEL)) == tree(catalogue.images_path(MODEL))
    assert fault_proxy.cuts == 1
    assert len(fault_proxy.range_requests) == 1, fault_proxy.range_requests
    header = fault_proxy.range_requests[0].lower()
    assert header.startswith("range: bytes=") and int(header.split("=")[1].rstrip("-")) > 0, header
    # resumed, not started again: about one image crossed the wire
    size = sum(p.stat().st_size for p in catalogue.images_path(MODEL).rglob("*") if p.is_file())
    assert fault_proxy.bytes["down"] < size + 2 * MiB, fault_proxy.bytes


async def test_a_broken_part_upload_is_retried(s3_server, bucket, tmp_path, fault_proxy, caplog):
    config = config_for(tmp_path / "images", store_config(s3_server, bucket, endpoint=fault_proxy.endpoint))
    catalogue, manifest = make_image(config, IMAGE)
    fault_proxy.cut("up", after_bytes=2 * MiB)
    caplog.set_level(logging.WARNING, "llmuxd.checkpoint.store")
    published = await publish(ObjectStore(config.checkpoint.object_store, settings=FAST), catalogue, manifest)
    assert fault_proxy.cuts == 1
    assert "retrying" in caplog.text
    fresh = ImageCatalogue(tmp_path / "fresh")
    direct = config_for(tmp_path / "images", store_config(s3_server, bucket))
    fetched, directory = await ObjectStore(direct.checkpoint.object_store, settings=FAST).fetch(
        MODEL, fresh.model_dir(MODEL))
    assert fetched.generation == published.generation
    fresh.install(MODEL, directory)
    assert tree(fresh.images_path(MODEL)) == tree(catalogue.images_path(MODEL))


@pytest.mark.parametrize("which", ["wrong secret", "unknown access key"])
async def test_wrong_credentials_are_one_line_naming_bucket_and_endpoint_without_the_secret(
        s3_server, bucket, tmp_path, caplog, which):
    secret = "Sup3rSecretValue/For+Tests" if which == "wrong secret" else s3_server.secret_key
    access = s3_server.access_key if which == "wrong secret" else "AKIAUNKNOWNUNKNOWN00"
    config = config_for(tmp_path / "images", store_config(s3_server, bucket, access_key=access, secret_key=secret))
    catalogue, manifest = make_image(config, IMAGE)
    caplog.set_level(logging.DEBUG)  # botocore's own debug lines too
    store = ObjectStore(config.checkpoint.object_store, settings=FAST)
    manager = CheckpointManager(config, store_settings=FAST)
    with pytest.raises(ObjectStoreError) as err:
        await publish(store, catalogue, manifest)
    problems = await manager.preflight()
    messages = [str(err.value), *problems]
    for message in messages:
        assert "\n" not in message
        assert f"bucket '{bucket}'" in message and s3_server.endpoint in message, message
        assert secret not in message
    assert "credentials were refused" in str(err.value)
    assert "LoadCredential=s3-secret-key" in str(err.value)  # says how to fix it
    assert secret not in caplog.text and secret not in repr(config)
    assert not s3_server.keys(bucket)


def test_credentials_come_from_the_config_then_systemd_credentials_then_the_environment(tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "s3-access-key").write_text("AK-from-systemd\n")
    (creds / "s3-secret-key").write_text("SK-from-systemd\n")
    env = {"AWS_ACCESS_KEY_ID": "AK-env", "AWS_SECRET_ACCESS_KEY": "SK-env"}
    store = config_for(tmp_path, {"endpoint": "http://127.0.0.1:1", "bucket": "b"}).checkpoint.object_store
    configured = config_for(tmp_path, {"endpoint": "http://127.0.0.1:1", "bucket": "b", "access_key": "AK-config",
                                       "secret_key": "SK-config"}).checkpoint.object_store
    cases = [
        (configured, {**env, "CREDENTIALS_DIRECTORY": str(creds)}, ("AK-config", "SK-config", "config")),
        (store, {**env, "CREDENTIALS_DIRECTORY": str(creds)}, ("AK-from-systemd", "SK-from-systemd",
                                                                "systemd credential")),
        (store, env, ("AK-env", "SK-env", "environment")),
    ]
    for config, environ, (access, secret, source) in cases:
        got = resolve_credentials(config, environ)
        assert (got.access_key, got.secret_key, got.source) == (access, secret, source)
        assert secret not in repr(got)
    with pytest.raises(MissingCredentials) as err:
        resolve_credentials(store, {})
    assert str(err.value).startswith("no access key and no secret key for the object store")
    assert "LoadCredential=s3-access-key" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


async def test_systemd_credentials_authenticate_against_the_server(s3_server, bucket, tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "s3-access-key").write_text(s3_server.access_key + "\n")
    (creds / "s3-secret-key").write_text(s3_server.secret_key + "\n")
    config = config_for(tmp_path / "images", {"endpoint": s3_server.endpoint, "bucket": bucket})
    store = ObjectStore(config.checkpoint.object_store, settings=FAST, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert await store.check() is None
    without = ObjectStore(config.checkpoint.object_store, settings=FAST, env={})
    problem = await without.check()
    assert problem and "no access key and no secret key" in problem and "LoadCredential=s3-access-key" in problem


async def test_progress_reports_bytes_total_and_rate(s3_server, bucket, tmp_path):
    from llmuxd.daemon.journal import JournalHandler, transfer_reporter

    config = config_for(tmp_path / "images", store_config(s3_server, bucket))
    catalogue, manifest = make_image(config, IMAGE)
    events = []
    store = ObjectStore(config.checkpoint.object_store, settings=FAST, report=events.append)
    await publish(store, catalogue, manifest)
    total = sum(p.stat().st_size for p in catalogue.images_path(MODEL).rglob("*") if p.is_file())
    states = [e.state for e in events]
    assert states[0] == "started" and states[-1] == "finished" and "progress" in states, states
    middle = [e for e in events if e.state == "progress"]
    assert any(0 < e.done < total for e in middle)
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert events[-1].done == events[-1].total == total and events[-1].rate > 0
    assert "of 12.0 MiB" in middle[0].message() or "%" in middle[0].message()

    # as the daemon logs them: journal fields a person can query
    records = []
    handler = JournalHandler("/nonexistent")
    logger = logging.getLogger("test.transfer")
    logger.setLevel(logging.INFO)
    logger.addHandler(capture := logging.Handler())
    capture.emit = records.append  # type: ignore[method-assign]
    try:
        transfer_reporter(logger)(events[-1])
    finally:
        logger.removeHandler(capture)
    fields = handler.fields_for(records[0])
    assert fields["LLMUX_EVENT"] == "checkpoint_uploaded" and fields["LLMUX_MODEL"] == MODEL
    assert (fields["LLMUX_BYTES"], fields["LLMUX_TOTAL_BYTES"]) == (total, total)
    assert fields["LLMUX_RATE_BPS"] > 0 and fields["LLMUX_GENERATION"] == events[-1].generation


async def test_a_host_without_the_image_starts_the_model_checkpointed(s3_server, bucket, tmp_path):
    store = store_config(s3_server, bucket)
    config = config_for(tmp_path / "host-a", store)
    catalogue, manifest = make_image(config, IMAGE)
    await publish(ObjectStore(config.checkpoint.object_store, settings=FAST), catalogue, manifest)

    async def host_b(images: Path, **model: object) -> tuple[Orchestrator, CheckpointManager, list[str]]:
        config_b = config_for(images, store, **model)
        orch = Orchestrator(config_b, SubprocessRuntime())
        manager = CheckpointManager(config_b, store_settings=FAST).install(orch)
        assert manager.mark_lazy(orch) == []  # nothing on this host's disk
        return orch, manager, await manager.mark_lazy_from_store(orch)

    # other settings than the image was made with: cold start
    orch, _, marked = await host_b(tmp_path / "host-b", extra_args=["--max-model-len", "4096"])
    assert marked == [] and orch.state(MODEL) is BackendState.NOT_STARTED
    # the same settings: checkpointed, and the first wake's restore downloads the image
    orch, manager, marked = await host_b(tmp_path / "host-c")
    assert marked == [MODEL] and orch.state(MODEL) is BackendState.CHECKPOINTED
    assert await manager.ensure_local_image(orch, orch._get(MODEL)) is True
    assert tree(manager.catalogue.images_path(MODEL)) == tree(catalogue.images_path(MODEL))
    assert manager.downloaded[MODEL] == (await manager.store.published(MODEL)).generation
    assert await manager.ensure_local_image(orch, orch._get(MODEL)) is False  # here now: no second download


async def test_a_newer_image_cancels_the_running_upload(s3_server, bucket, tmp_path):
    config = config_for(tmp_path / "images", store_config(s3_server, bucket))
    settings = TransferSettings(part_size=5 * MiB, concurrency=1, attempts=2, backoff=0.05, progress_interval=0.0)
    store = ObjectStore(config.checkpoint.object_store, settings=settings)
    catalogue, first = make_image(config, {"pages-1.img": 40 * MiB})
    # (the first upload reads from a copy: the catalogue replaces images/ on the next commit)
    copy = tmp_path / "first-copy"
    os.system(f"cp -a {catalogue.images_path(MODEL)} {copy}")
    task1 = store.publish_later(MODEL, copy, identity(first), dict(first.checksums))
    await asyncio.sleep(0.2)
    catalogue, second = make_image(config, {"pages-1.img": 6 * MiB})
    task2 = store.publish_later(MODEL, catalogue.images_path(MODEL), identity(second), dict(second.checksums))
    assert await task1 is None
    published = await task2
    assert published is not None and published.checksums() == tree(catalogue.images_path(MODEL))
    assert (await store.published(MODEL)).generation == published.generation
    assert {k for k in s3_server.keys(bucket) if "/generations/" in k} == {
        f"hosts/a/{MODEL}/generations/{published.generation}/{name}" for name in published.files}
    assert s3_server.pending_uploads(bucket) == []


async def test_no_published_image_is_a_clear_error(s3_server, bucket, tmp_path):
    config = config_for(tmp_path / "images", store_config(s3_server, bucket))
    store = ObjectStore(config.checkpoint.object_store, settings=FAST)
    assert await store.published(MODEL) is None
    with pytest.raises(ObjectStoreError) as err:
        await store.fetch(MODEL, tmp_path / "images" / MODEL)
    assert f"no checkpoint image of model '{MODEL}' under s3://{bucket}/hosts/a/{MODEL}/" in str(err.value)
    assert not isinstance(err.value, ChecksumMismatch) and not isinstance(err.value, CheckpointError)

