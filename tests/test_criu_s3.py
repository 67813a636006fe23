"""The CRIU round trip through object storage (root, tests/sysd, CRIU, moto_server):
dump -> upload -> the local images are gone -> lazy restore downloads -> answered;
and a corrupted object, which must end in a cold start, not a wrong restore."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest

from llmuxd.checkpoint.store import TransferSettings
from llmuxd.daemon.journal import JournalHandler, transfer_reporter
from llmuxd.eviction import Eviction
from llmuxd.lifecycle import BackendState
from llmuxd.names import unit_name
from sysd.helpers import free_port
from test_criu_systemd import answer, criu_bed, make  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.systemd, pytest.mark.criu, pytest.mark.s3, pytest.mark.slow]

EVICTION = "offload+checkpoint"
SETTINGS = TransferSettings(part_size=8 << 20, progress_interval=0.2)


def tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def journal_reporter(criu_bed):
    """Transfer events as llmuxd logs them, into the test systemd's journald."""
    logger = logging.getLogger(f"llmuxd.test-s3.{id(criu_bed)}")
    logger.setLevel(logging.INFO)
    handler = JournalHandler(str(Path(criu_bed.state_dir) / "run/systemd/journal/socket"))
    logger.addHandler(handler)
    yield transfer_reporter(logger)
    logger.removeHandler(handler)
    handler.close()


async def dump_and_publish(bed, make, store: dict, report) -> tuple:  # noqa: F811
    port = free_port()
    orch, manager, name = await make(bed, EVICTION, port=port, object_store=store,
                                     manager_kw={"store_settings": SETTINGS, "report": report})
    await orch.ensure_awake(name)
    good = await answer(orch, name)
    await orch.sleep(name, Eviction.parse(EVICTION))
    assert orch.state(name) is BackendState.CHECKPOINTED, orch.status(name).reason
    await manager.wait_uploads()  # the upload runs after the sleep, in the background
    assert name not in manager.store.upload_errors, manager.store.upload_errors
    published = manager.store.last_published[name]
    images = manager.catalogue.images_path(name)
    assert published.checksums() == tree(images)
    await orch.close()
    await orch.runtime.close()
    shutil.rmtree(manager.catalogue.model_dir(name))  # this host loses its images
    return name, port, good, published


async def test_dump_upload_wipe_then_lazy_restore_downloads_and_answers(
        criu_bed, make, s3_server, journal_reporter, tmp_path):  # noqa: F811
    store = {"endpoint": s3_server.endpoint, "bucket": s3_server.new_bucket(), "access_key": s3_server.access_key,
             "secret_key": s3_server.secret_key, "prefix": "llmux"}
    name, port, good, published = await dump_and_publish(criu_bed, make, store, journal_reporter)

    orch, manager, _ = await make(criu_bed, EVICTION, name=name, port=port, images=tmp_path / "fresh",
                                  object_store=store, manager_kw={"store_settings": SETTINGS,
                                                                  "report": journal_reporter})
    await orch.adopt()
    assert manager.mark_lazy(orch) == []
    assert await manager.mark_lazy_from_store(orch) == [name]
    await orch.ensure_awake(name)
    assert manager.restore_outcome[name] == "restored", manager.restore_outcome
    assert manager.downloaded[name] == published.generation
    assert criu_bed.unit_property(unit_name(name), "Type") == "forking"  # restored, not cold-started
    assert await answer(orch, name) == good
    local = tree(manager.catalogue.images_path(name))  # (CRIU adds stats-restore on restore)
    assert {k: local.get(k) for k in published.files} == published.checksums()

    # the journal shows both transfers with their numbers
    for kind in ("checkpoint_uploaded", "checkpoint_downloaded"):
        lines = criu_bed.journal(f"LLMUX_EVENT={kind}", f"LLMUX_MODEL={name}")
        assert f"model {name}: checkpoint image" in lines and "MiB/s" in lines, (kind, lines)
    assert criu_bed.journal("LLMUX_EVENT=checkpoint_upload_progress", f"LLMUX_MODEL={name}")


async def test_a_corrupted_object_means_a_cold_start_and_no_local_image(
        criu_bed, make, s3_server, journal_reporter, tmp_path):  # noqa: F811
    bucket = s3_server.new_bucket()
    store = {"endpoint": s3_server.endpoint, "bucket": bucket, "access_key": s3_server.access_key,
             "secret_key": s3_server.secret_key}
    name, port, good, published = await dump_and_publish(criu_bed, make, store, journal_reporter)
    pages = max((n for n in published.files if n.startswith("pages-")), key=lambda n: published.files[n].size)
    key = f"{name}/generations/{published.generation}/{pages}"
    data = bytearray(s3_server.s3().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 3] ^= 0x01
    s3_server.s3().put_object(Bucket=bucket, Key=key, Body=bytes(data))

    orch, manager, _ = await make(criu_bed, EVICTION, name=name, port=port, images=tmp_path / "fresh",
                                  object_store=store, manager_kw={"store_settings": SETTINGS,
                                                                  "report": journal_reporter})
    await orch.adopt()
    assert await manager.mark_lazy_from_store(orch) == [name]
    await orch.ensure_awake(name)
    assert orch.state(name) is BackendState.READY
    outcome = manager.restore_outcome[name]
    assert outcome.startswith("cold-started instead") and "does not match its checksum" in outcome, outcome
    assert f"s3://{bucket}/{key}" in outcome
    assert criu_bed.unit_property(unit_name(name), "Type") == "exec"
    assert await answer(orch, name) == good
    model_dir = manager.catalogue.model_dir(name)
    assert not (model_dir / "images").exists() and not (model_dir / "images.download").exists()
    assert "does not match its checksum" in criu_bed.journal("LLMUX_EVENT=checkpoint_download_failed",
                                                            f"LLMUX_MODEL={name}")
