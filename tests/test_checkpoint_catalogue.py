"""The image catalogue: manifests, verification, quota, cleanup, bad input."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from llmuxd.checkpoint.catalogue import (
    MANIFEST,
    ImageCatalogue,
    Manifest,
    checked_image_path,
    dir_size,
    config_fields,
    config_hash,
)
from llmuxd.checkpoint.errors import CheckpointError, ImageRejected


def model_config(**overrides):
    base = dict(model_path="/models/a", command=["vllm", "serve"], extra_args=[], env={}, host="127.0.0.1",
                port=18001, sleep_mode=True, tensor_parallel_size=1, gpus=[])
    base.update(overrides)
    return SimpleNamespace(**base)


def store(cat: ImageCatalogue, model: str, mc, files: dict[str, bytes], created: float | None = None) -> Manifest:
    staging = cat.stage(model)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    manifest = Manifest(model=model, model_path=mc.model_path, config_hash=config_hash(mc),
                        config=config_fields(mc), eviction="discard+checkpoint")
    if created is not None:
        manifest.created = created
    return cat.commit(model, staging, manifest)


def test_commit_writes_manifest_with_checksums_and_size(tmp_path):
    cat = ImageCatalogue(tmp_path)
    mc = model_config()
    m = store(cat, "a", mc, {"pages-1.img": b"x" * 1000, "core-1.img": b"y"})
    assert m.size_bytes == 1001
    assert set(m.checksums) == {"pages-1.img", "core-1.img"}
    on_disk = json.loads((tmp_path / "a" / "images" / MANIFEST).read_text())
    assert on_disk["model"] == "a" and on_disk["eviction"] == "discard+checkpoint"
    assert not (tmp_path / "a" / "images.new").exists()
    assert cat.verify("a", mc).model == "a"


@pytest.mark.parametrize(
    "change, says",
    [
        (dict(model_path="/models/b"), "model_path: image has '/models/a', config has '/models/b'"),
        (dict(port=18002), "port: image has 18001, config has 18002"),
        (dict(extra_args=["--max-model-len", "4096"]), "extra_args"),
    ],
)
def test_restore_refuses_an_image_made_with_other_settings(tmp_path, change, says):
    cat = ImageCatalogue(tmp_path)
    store(cat, "a", model_config(), {"core-1.img": b"c"})
    with pytest.raises(ImageRejected) as info:
        cat.verify("a", model_config(**change))
    assert says in str(info.value)


def test_manifest_of_another_model_is_refused(tmp_path):
    cat = ImageCatalogue(tmp_path)
    store(cat, "b", model_config(), {"core-1.img": b"c"})
    with pytest.raises(ImageRejected, match="is of model 'b', not 'a'"):
        cat.verify("a", model_config(), tmp_path / "b" / "images")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_image_is_refused(tmp_path, damage):
    cat = ImageCatalogue(tmp_path)
    store(cat, "a", model_config(), {"pages-1.img": b"p" * 4096, "core-1.img": b"c"})
    page = tmp_path / "a" / "images" / "pages-1.img"
    if damage == "truncate":
        os.truncate(page, 100)
    elif damage == "flip":
        page.write_bytes(b"q" + b"p" * 4095)
    else:
        page.unlink()
    with pytest.raises(ImageRejected, match="pages-1.img"):
        cat.verify("a", model_config())
    # without checksums (the cheap check at startup) only the manifest is read
    if damage != "delete":
        assert cat.verify("a", model_config(), checksums=False)


def test_missing_or_unreadable_manifest(tmp_path):
    cat = ImageCatalogue(tmp_path)
    with pytest.raises(ImageRejected, match="has no image set"):
        cat.verify("a", model_config())
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "a" / "images" / MANIFEST).write_text("{not json")
    with pytest.raises(ImageRejected, match="no readable manifest"):
        cat.verify("a", model_config())


@pytest.mark.parametrize("name", ["../etc", "a/../../b", "..", "/abs"])
def test_path_traversal_in_model_names_is_refused(tmp_path, name):
    with pytest.raises(CheckpointError):
        ImageCatalogue(tmp_path).model_dir(name)


@pytest.mark.parametrize("path", ["relative/images", "/var/lib/llmux/../../etc", "/a/b/../c"])
def test_path_traversal_in_checkpoint_path_is_refused(path):
    with pytest.raises(CheckpointError, match="absolute path without '..'"):
        checked_image_path(path, "a")
    assert str(checked_image_path("/srv/images/a", "a")) == "/srv/images/a"


def test_unwritable_images_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cat = ImageCatalogue(blocker)
    with pytest.raises(CheckpointError, match="cannot write images to .*make images_dir writable"):
        cat.stage("a")


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    cat = ImageCatalogue(tmp_path)
    staging = cat.stage("a")
    (staging / "core-1.img").write_bytes(b"c")
    real_replace = os.replace

    def enospc(src, dst):
        if str(dst).endswith(MANIFEST):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", enospc)
    mc = model_config()
    with pytest.raises(CheckpointError, match="No space left on device; free disk space"):
        cat.commit("a", staging, Manifest(model="a", model_path="/m", config_hash=config_hash(mc),
                                          config=config_fields(mc), eviction="discard+checkpoint"))
    assert not staging.exists()
    assert not cat.has_image("a")


def test_quota_removes_oldest_sets_but_not_kept_ones(tmp_path):
    mc = model_config()
    for i, name in enumerate(["old", "mid", "new"]):
        store(ImageCatalogue(tmp_path), name, mc, {"pages-1.img": b"x" * 1000}, created=1000.0 + i)
    one_set = dir_size(tmp_path / "old")
    cat = ImageCatalogue(tmp_path, quota_gib=(2 * one_set + 10) / (1 << 30))  # room for two sets
    assert cat.gc(keep={"old"}) == ["mid"]
    assert cat.models() == ["new", "old"]


def test_images_of_removed_models_are_cleaned(tmp_path):
    cat = ImageCatalogue(tmp_path)
    for name in ("a", "b", "c"):
        store(cat, name, model_config(), {"core-1.img": b"c"})
    assert cat.clean_removed(["a", "c"]) == ["b"]
    assert cat.models() == ["a", "c"]
