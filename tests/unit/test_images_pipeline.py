"""Image pipeline: real JPEGs, unreadable files, user errors, distributed resumable order, mixup."""

from __future__ import annotations

import io
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msmoe_dist.config.schema import VisionConfig
from msmoe_dist.data.imagenet_classes import IMAGENET_WNIDS
from msmoe_dist.data.images import (
    ImageDataError,
    ImageFolderDataset,
    collate_skip_unreadable,
    eval_loader,
    eval_rounds,
    eval_transform,
    mixup,
    train_loader,
    train_sample_keys,
    train_transform,
)
from msmoe_dist.data.synthetic_images import ensure_synthetic_images

pytestmark = pytest.mark.timeout(120)

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "imagenet-sample"
VCFG = VisionConfig(
    image_size=32,
    patch_size=8,
    randaugment_ops=2,
    randaugment_magnitude=9,
    synthetic_classes=2,
    synthetic_train_per_class=6,
    synthetic_val_per_class=5,
)


@pytest.fixture
def imagenet_train(tmp_path):
    """The 48 shared sample JPEGs arranged as train/<wnid>/<file> (links keep the shared copy read-only)."""
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample images not found at {SAMPLE} (shared test data beside the checkout)")
    root = tmp_path / "imagenet" / "train"
    for f in sorted(SAMPLE.glob("*.JPEG")):
        (root / f.name.split("_")[0]).mkdir(parents=True)
        (root / f.name.split("_")[0] / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_images(tmp_path_factory.mktemp("syn") / "data", VCFG)


def _jpeg_bytes(seed: int, size=(40, 56)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _one_line_error(match, fn, *args):
    with pytest.raises(ImageDataError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- reading


def test_real_imagenet_jpegs_map_to_canonical_indices(imagenet_train):
    ds = ImageFolderDataset(imagenet_train, num_classes=1000, transform=eval_transform(VCFG))
    assert len(ds) == 48 and len(ds.classes) == 48
    assert all(label == IMAGENET_WNIDS.index(Path(path).parent.name) for path, label in ds.samples)
    assert ds.samples[0] == (str(imagenet_train / "n01440764" / "n01440764_tench.JPEG"), 0)

    seen = []
    for batch in eval_loader(ds, batch_size=16, rank=0, world=1, num_workers=0):
        assert batch.images.shape == (len(batch.labels), 3, 32, 32) and batch.images.dtype == torch.float32
        assert batch.num_unreadable == 0
        assert -1.0 <= batch.images.min() and batch.images.max() <= 1.0  # V-MoE's [-1, 1] scaling
        seen += list(zip(batch.indices.tolist(), batch.labels.tolist()))
    assert seen == [(i, label) for i, (_, label) in enumerate(ds.samples)]


def test_real_jpegs_through_training_augmentation(imagenet_train):
    # Varied sizes and aspect ratios, one grayscale JPEG: all come out [3, 32, 32].
    ds = ImageFolderDataset(imagenet_train, num_classes=1000, transform=train_transform(VCFG))
    modes = []
    for path, _ in ds.samples:
        with Image.open(path) as img:
            modes.append(img.mode)
    grey = modes.index("L")
    image, label, index = ds[(grey, 7)]
    assert image.shape == (3, 32, 32) and index == grey
    with train_loader(ds, batch_size=12, seed=0, start_micro=0, rank=0, world=1, num_workers=0) as loader:
        batch = next(loader)
    assert batch.images.shape == (12, 3, 32, 32) and torch.isfinite(batch.images).all()


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "good.JPEG").write_bytes(_jpeg_bytes(0))
    (root / "a" / "truncated.JPEG").write_bytes(_jpeg_bytes(1)[:600])
    (root / "b" / "notes.JPEG").write_text("not an image")
    (root / "b" / "good.png").write_bytes(_jpeg_bytes(2))  # wrong extension for its content still decodes
    ds = ImageFolderDataset(root, num_classes=2, transform=eval_transform(VCFG))
    assert [Path(p).name for p, _ in ds.samples] == ["good.JPEG", "truncated.JPEG", "good.png", "notes.JPEG"]
    assert ds[(1, 0)][0] is None and ds[(3, 0)][0] is None

    batches = list(eval_loader(ds, batch_size=4, rank=0, world=1, num_workers=0))
    assert len(batches) == 1
    batch = batches[0]
    assert batch.num_unreadable == 2 and batch.unreadable_indices == (1, 3)
    assert batch.indices.tolist() == [0, 2] and batch.labels.tolist() == [0, 1]
    assert batch.images.shape == (2, 3, 32, 32)

    empty = collate_skip_unreadable([ds[(1, 0)], ds[(3, 0)]], image_shape=(3, 32, 32))
    assert empty.images.shape == (0, 3, 32, 32) and empty.labels.shape == (0,) and empty.num_unreadable == 2

    with train_loader(ds, batch_size=4, seed=0, start_micro=0, rank=0, world=1, num_workers=0) as loader:
        counts = [next(loader).num_unreadable for _ in range(3)]
    assert counts == [2, 2, 2]  # every epoch holds the two bad files once


def test_user_errors_name_the_path(tmp_path):
    missing = tmp_path / "imagenet" / "train"
    _one_line_error(
        f"{missing} does not exist; expected train/<wnid>/\\*.JPEG and val", ImageFolderDataset, missing, 1000
    )
    missing.mkdir(parents=True)
    _one_line_error(f"no class folders in {missing}", ImageFolderDataset, missing, 1000)
    (missing / "ILSVRC2012_val_00000001.JPEG").write_bytes(_jpeg_bytes(0))
    _one_line_error("found 1 images directly in it", ImageFolderDataset, missing, 1000)
    (missing / "n01440764").mkdir()
    (missing / "n01440764" / "x.JPEG").write_bytes(_jpeg_bytes(0))
    (missing / "n01443537").mkdir()
    (missing / "n01443537" / "readme.txt").write_text("no images here")
    _one_line_error(f"empty class: {missing / 'n01443537'}", ImageFolderDataset, missing, 1000)
    shutil.rmtree(missing / "n01443537")
    (missing / "n15075141").mkdir()
    (missing / "n15075141" / "y.jpg").write_bytes(_jpeg_bytes(1))
    _one_line_error(f"{missing}: class folder n15075141 is ImageNet-1K class 999", ImageFolderDataset, missing, 10)
    assert len(ImageFolderDataset(missing, 1000)) == 2


# ----------------------------------------------------------------------------- training order


def _stream(num_samples, batch_size, world, seed, num_micro, start=0):
    """Keys in stream order: micro-batch by micro-batch, rank by rank."""
    return [
        key
        for g in range(start, start + num_micro)
        for r in range(world)
        for key in train_sample_keys(num_samples, batch_size, g, seed, r, world)
    ]


def test_every_image_once_per_epoch_and_ranks_disjoint():
    n, b, w = 23, 4, 3  # 12 images per global micro-batch: micro-batches straddle epoch boundaries
    stream = _stream(n, b, w, seed=1, num_micro=10)
    indices = [i for i, _ in stream]
    for epoch in range(len(indices) // n):
        assert sorted(indices[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert indices[:n] != indices[n : 2 * n]  # a fresh permutation every epoch
    # Within an epoch (positions [0, n)) the ranks' slices are disjoint.
    per_rank = [set() for _ in range(w)]
    for pos, index in enumerate(indices[:n]):
        per_rank[(pos // b) % w].add(index)
    assert sum(len(s) for s in per_rank) == n
    assert len({seed for _, seed in stream}) == len(stream)  # one aug seed per stream position
    assert [i for i, _ in _stream(n, b, w, seed=2, num_micro=2)] != indices[: 2 * b * w]


def test_resume_equals_the_tail_of_the_uninterrupted_stream():
    n, b, w = 50, 3, 2
    full = _stream(n, b, w, seed=9, num_micro=40)
    assert _stream(n, b, w, seed=9, num_micro=15, start=25) == full[25 * b * w :]
    # Each rank's view alone, as a resumed rank computes it.
    for r in range(w):
        assert train_sample_keys(n, b, 31, 9, r, w) == full[(31 * w + r) * b : (31 * w + r + 1) * b]


def test_augmentation_is_a_function_of_the_key_not_of_the_worker(synthetic):
    ds = ImageFolderDataset(synthetic / "train", num_classes=2, transform=train_transform(VCFG))
    rng_before = torch.get_rng_state()
    with train_loader(ds, batch_size=5, seed=3, start_micro=0, rank=1, world=2, num_workers=0) as loader:
        serial = [next(loader) for _ in range(3)]
        assert loader.micro_index == 3
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    with train_loader(ds, batch_size=5, seed=3, start_micro=0, rank=1, world=2, num_workers=2) as loader:
        parallel = [next(loader) for _ in range(3)]
    with train_loader(ds, batch_size=5, seed=3, start_micro=2, rank=1, world=2, num_workers=2) as loader:
        resumed = next(loader)
    for a, b in zip(serial, parallel):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
    assert torch.equal(resumed.images, serial[2].images) and torch.equal(resumed.labels, serial[2].labels)
    keys = train_sample_keys(len(ds), 5, 0, 3, 1, 2)
    assert torch.equal(ds[keys[0]][0], serial[0].images[0])
    assert serial[0].images.shape == (5, 3, 32, 32)
    assert not torch.equal(serial[0].images, serial[1].images)


def test_loaders_close_and_can_be_dropped(synthetic):
    ds = ImageFolderDataset(synthetic / "train", num_classes=2, transform=eval_transform(VCFG))
    before = set(multiprocessing.active_children())
    loader = train_loader(ds, batch_size=4, seed=0, start_micro=0, rank=0, world=1, num_workers=2, timeout_s=60)
    next(loader)
    loader.close()
    assert set(multiprocessing.active_children()) <= before  # workers joined by close()
    with pytest.raises(StopIteration):
        next(loader)
    dropped = train_loader(ds, batch_size=4, seed=0, start_micro=0, rank=0, world=1, num_workers=2, timeout_s=60)
    next(dropped)
    del dropped  # the DataLoader iterator's finaliser joins its workers
    assert set(multiprocessing.active_children()) <= before


# ----------------------------------------------------------------------------- evaluation order


@pytest.mark.parametrize("world", [1, 3, 5])
def test_eval_loader_covers_every_image_once(synthetic, world):
    ds = ImageFolderDataset(synthetic / "val", num_classes=2, transform=eval_transform(VCFG))
    assert len(ds) == 10
    per_rank = [[b.indices.tolist() for b in eval_loader(ds, 3, r, world, num_workers=0)] for r in range(world)]
    assert sorted(i for batches in per_rank for batch in batches for i in batch) == list(range(10))
    assert max(len(batches) for batches in per_rank) == eval_rounds(10, 3, world)
    assert [len(eval_loader(ds, 3, r, world, 0)) for r in range(world)] == [len(b) for b in per_rank]
    assert per_rank[0][0] == [0, 1, 2]  # rank r takes batches r, r + W, ... in dataset order


def test_eval_loader_accepts_a_subset(synthetic):
    ds = ImageFolderDataset(synthetic / "val", num_classes=2, transform=eval_transform(VCFG))
    part = torch.utils.data.Subset(ds, range(4))
    batches = list(eval_loader(part, 3, 0, 1, num_workers=0))
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2], [3]]
    assert torch.equal(batches[0].images[1], ds[1][0])


def test_eval_rounds():
    assert eval_rounds(50000, 256, 8) == 25  # 196 batches over 8 ranks
    assert eval_rounds(10, 3, 1) == 4 and eval_rounds(10, 3, 5) == 1 and eval_rounds(1, 8, 4) == 1


# ----------------------------------------------------------------------------- mixup


def test_mixup_soft_targets_and_determinism():
    images = torch.randn(6, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, targets = mixup(images, labels, 10, 0.2, torch.Generator().manual_seed(7))
    again, targets_again = mixup(images, labels, 10, 0.2, torch.Generator().manual_seed(7))
    assert torch.equal(mixed, again) and torch.equal(targets, targets_again)
    assert targets.shape == (6, 10) and torch.allclose(targets.sum(1), torch.ones(6))
    lam = targets[0, 0].item()
    assert 0.0 <= lam <= 1.0 and targets[0, 5].item() == pytest.approx(1 - lam, abs=1e-6)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-5)
    other = [mixup(images, labels, 10, 0.2, torch.Generator().manual_seed(s))[1][0, 0].item() for s in range(8)]
    assert len(set(other)) > 1

    same, one_hot = mixup(images, labels, 10, 0.0, torch.Generator().manual_seed(7))
    assert same is images and torch.equal(one_hot.argmax(1), labels)


def test_validation_folder_keeps_the_training_labels(tmp_path):
    """A val folder holding only some non-wnid classes must not renumber them."""
    from PIL import Image

    from msmoe_dist.data.images import ImageDataError, ImageFolderDataset

    for split, classes in (("train", ["apple", "banana", "cherry"]), ("val", ["banana", "cherry"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / c / "x.png")
    train = ImageFolderDataset(tmp_path / "train", 3)
    val = ImageFolderDataset(tmp_path / "val", 3, class_to_idx=train.class_to_idx)
    assert val.targets == [1, 2]
    assert ImageFolderDataset(tmp_path / "val", 3).targets == [0, 1]  # what sorted numbering alone would give
    (tmp_path / "val" / "durian").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "durian" / "x.png")
    with pytest.raises(ImageDataError, match="durian"):
        ImageFolderDataset(tmp_path / "val", 3, class_to_idx=train.class_to_idx)
