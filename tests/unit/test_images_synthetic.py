"""The synthetic image set: ImageNet layout, determinism, cache reuse, refusing foreign folders."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from PIL import Image

from msmoe_dist.config.schema import VisionConfig
from msmoe_dist.data.images import ImageDataError, ImageFolderDataset
from msmoe_dist.data.synthetic_images import META, class_names, ensure_synthetic_images

pytestmark = pytest.mark.timeout(60)

SMALL = VisionConfig(synthetic_classes=3, synthetic_train_per_class=4, synthetic_val_per_class=2, synthetic_seed=5)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_sizes_and_labels(tmp_path):
    root = ensure_synthetic_images(tmp_path / "syn", SMALL)
    assert root == tmp_path / "syn"
    names = class_names(3)
    assert names == ["c00_red_circle", "c01_orange_square", "c02_yellow_triangle"]
    for split, per_class in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == names
        ds = ImageFolderDataset(root / split, num_classes=3)
        assert len(ds) == 3 * per_class and ds.classes == names
        assert ds.targets == [c for c in range(3) for _ in range(per_class)]
    for path in (root / "train").rglob("*.JPEG"):
        with Image.open(path) as img:
            w, h = img.size
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 48 <= w <= 96 and 48 <= h <= 96 and w != h
    meta = json.loads((root / META).read_text())
    assert meta["classes"] == 3 and meta["seed"] == 5 and meta["class_names"] == names


def test_all_48_classes_are_distinct_pairs():
    names = class_names(48)
    pairs = {tuple(n.split("_")[1:]) for n in names}
    assert len(pairs) == 48
    with pytest.raises(ImageDataError, match="synthetic_classes"):
        ensure_synthetic_images("unused", replace(SMALL, synthetic_classes=49))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _files(ensure_synthetic_images(tmp_path / "a", SMALL))
    b = _files(ensure_synthetic_images(tmp_path / "b", SMALL))
    c = _files(ensure_synthetic_images(tmp_path / "c", replace(SMALL, synthetic_seed=6)))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".JPEG"))


def test_cache_is_reused_and_regenerated_when_parameters_change(tmp_path):
    root = ensure_synthetic_images(tmp_path / "syn", SMALL)
    meta = root / META
    stamp = (meta.stat().st_ino, meta.stat().st_mtime_ns)
    ensure_synthetic_images(root, SMALL)
    assert (meta.stat().st_ino, meta.stat().st_mtime_ns) == stamp  # untouched

    ensure_synthetic_images(root, replace(SMALL, synthetic_classes=2))
    assert json.loads(meta.read_text())["classes"] == 2
    assert sorted(p.name for p in (root / "train").iterdir()) == class_names(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temp or backup folders left


def test_empty_directory_is_filled(tmp_path):
    (tmp_path / "syn").mkdir()
    ensure_synthetic_images(tmp_path / "syn", SMALL)
    assert (tmp_path / "syn" / META).is_file()


def test_foreign_folder_is_refused_and_left_intact(tmp_path):
    user = tmp_path / "imagenet"
    (user / "train").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ImageDataError, match=f"{user}.*refusing to overwrite") as info:
        ensure_synthetic_images(user, SMALL)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet"]

    (user / META).write_text(json.dumps({"generator": "someone else"}))
    with pytest.raises(ImageDataError, match="refusing to overwrite"):
        ensure_synthetic_images(user, SMALL)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ImageDataError, match="is a file"):
        ensure_synthetic_images(a_file, SMALL)
