"""Image classification data: ImageNet-layout folders, augmentation, distributed resumable order.

A split is a folder ``<split>/<class>/*.JPEG`` (ImageNet: ``train/n01440764/...``); class
folders named by ImageNet wnids get their canonical ImageNet-1K index (``imagenet_classes``),
any other names are numbered in sorted order.

Samples are addressed by a key ``(index, aug_seed)``.  ``__getitem__`` seeds a private copy of
torch's RNG from ``aug_seed`` before the augmentation, so an augmented image is a pure function
of its key: the same in the main process and in any DataLoader worker, and again after a resume.
The training order is a pure function of the micro-batch index (``train_sample_keys``): the
stream is the concatenation of epochs, each a permutation of the images seeded by (seed, epoch);
global micro-batch g is stream positions [g*B*W, (g+1)*B*W) and rank r reads its r-th slice of B.
A run resumed at micro-batch g0 therefore neither repeats nor skips an image, and within an epoch
no two ranks read the same image.

Normalisation follows V-MoE / big_vision (``value_range(-1, 1)``): pixels are scaled from [0, 1]
to [-1, 1] (mean 0.5, std 0.5 per channel), not the torchvision ImageNet mean/std, because the
models here reproduce V-MoE.

A file PIL cannot decode (truncated, not an image) is never fatal: the dataset returns ``None``
for it and ``collate_skip_unreadable`` drops it and counts it, so a batch may hold fewer than B
images.  Shapes: images [N, 3, S, S] float32, labels/indices [N] int64; soft targets [N, C].
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ImageDataError  # eval/ and tests import it from here too
from .imagenet_classes import class_to_index

if TYPE_CHECKING:
    from msmoe_dist.config.schema import VisionConfig

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
NORM_MEAN = (0.5, 0.5, 0.5)  # V-MoE's [-1, 1] scaling, see the module docstring
NORM_STD = (0.5, 0.5, 0.5)
LAYOUT_HINT = "expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
_U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- dataset


def _scan(root: Path) -> tuple[list[str], list[list[str]]]:
    """Sorted class folder names and, per class, the sorted image file names in it."""
    if not root.exists():
        raise ImageDataError(f"image folder {root} does not exist; {LAYOUT_HINT}")
    if not root.is_dir():
        raise ImageDataError(f"image folder {root} is not a directory; {LAYOUT_HINT}")
    with os.scandir(root) as entries:
        listing = [(e.name, e.is_dir()) for e in entries if not e.name.startswith(".")]
    classes = sorted(name for name, is_dir in listing if is_dir)
    if not classes:
        loose = sum(1 for name, is_dir in listing if not is_dir and name.lower().endswith(IMAGE_EXTENSIONS))
        found = f"found {loose} images directly in it but " if loose else ""
        raise ImageDataError(
            f"no class folders in {root}: {found}expected {root}/<wnid>/*.JPEG (one folder per class; {LAYOUT_HINT})"
        )
    files = []
    for name in classes:
        with os.scandir(root / name) as entries:
            images = sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
        if not images:
            raise ImageDataError(
                f"empty class: {root / name} has no .JPEG/.jpg/.png images; expected "
                f"{root}/<class>/*.JPEG with at least one image per class folder"
            )
        files.append(images)
    return classes, files


def _decode(path: str):
    """The image as an RGB PIL image, or None when it cannot be read or decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # grayscale, CMYK, palette -> RGB; forces the full decode here
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return None  # a bad file costs one sample, never the run


def _to_float_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


class ImageFolderDataset(Dataset):
    """``root/<class>/*.{JPEG,jpg,png}`` in sorted order; item ``(index, aug_seed)``.

    ``__getitem__`` returns ``(image [3, H, W] float, label, index)``, or ``(None, label, index)``
    when the file cannot be decoded.  File names are held in one numpy byte array rather than a
    list of Python strings, so forked DataLoader workers do not copy them page by page through
    reference counting (ImageNet train: 1.28M names); ``samples`` builds the list on demand.
    """

    def __init__(
        self, root, num_classes: int, transform: Callable | None = None, class_to_idx: dict[str, int] | None = None
    ):
        """``class_to_idx``: the training split's mapping, so that a validation folder holding only some
        of the (non-wnid) classes keeps the training labels; its folders must all be in it."""
        self.root = Path(root)
        self.transform = transform
        self.classes, files = _scan(self.root)
        if class_to_idx is not None:
            unknown = [c for c in self.classes if c not in class_to_idx]
            if unknown:
                raise ImageDataError(
                    f"{self.root}: class folder {unknown[0]!r} is not a training class; expected "
                    "the same class folders as the training split"
                )
            self.class_to_idx = {c: class_to_idx[c] for c in self.classes}
        else:
            try:
                self.class_to_idx = class_to_index(self.classes, num_classes)
            except ImageDataError as exc:
                raise ImageDataError(f"{self.root}: {exc}") from None
        rel = [os.fsencode(os.path.join(c, f)) for c, names in zip(self.classes, files) for f in names]
        self._rel_paths = np.array(rel, dtype=np.bytes_)
        self._labels = np.array(
            [self.class_to_idx[c] for c, names in zip(self.classes, files) for _ in names], dtype=np.int64
        )
        # Shape of every transformed image when known (our transforms carry it): lets the collate
        # build an empty [0, 3, S, S] batch when every image in it is unreadable.
        self.image_shape: tuple[int, ...] | None = getattr(transform, "output_shape", None)

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._rel_paths[index]))

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(self.path(i), int(label)) for i, label in enumerate(self._labels)]

    @property
    def targets(self) -> list[int]:
        return self._labels.tolist()

    def __getitem__(self, key) -> tuple[torch.Tensor | None, int, int]:
        index, aug_seed = (key, key) if isinstance(key, (int, np.integer)) else key
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images in {self.root}")
        label = int(self._labels[index])
        img = _decode(self.path(index))
        if img is None:
            return None, label, index
        if self.transform is None:
            return _to_float_tensor(img), label, index
        # A private RNG stream: the augmentation depends on the key only, and the caller's global
        # RNG (dropout, when num_workers=0 runs this in the training process) is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(aug_seed) & _U64)
            out = self.transform(img)
        return out, label, index


# ----------------------------------------------------------------------------- transforms


class ImageTransform:
    """A torchvision pipeline PIL image -> normalised float tensor, and the shape it produces."""

    def __init__(self, steps: Callable, image_size: int):
        self.steps = steps
        self.output_shape = (3, image_size, image_size)

    def __call__(self, img) -> torch.Tensor:
        return self.steps(img)

    def __repr__(self) -> str:
        return f"ImageTransform({self.steps!r})"


def _torchvision_transforms():
    try:
        from torchvision import transforms
    except ImportError as exc:  # torchvision is the optional [vision] extra
        raise ImageDataError(
            "images need torchvision, the optional [vision] extra: expected it installed "
            "(pip install -e '.[dev,vision]')"
        ) from exc
    return transforms


def _eval_geometry(transforms, vcfg: VisionConfig) -> list:
    return [transforms.Resize(round(vcfg.image_size / vcfg.eval_crop_ratio)), transforms.CenterCrop(vcfg.image_size)]


def _to_normalised_tensor(transforms) -> list:
    return [transforms.ToTensor(), transforms.Normalize(NORM_MEAN, NORM_STD)]


def train_transform(vcfg: VisionConfig) -> ImageTransform:
    """Inception crop (scale 0.08-1) + flip, or the eval geometry; then RandAugment if enabled."""
    T = _torchvision_transforms()
    if vcfg.random_resized_crop:
        steps = [T.RandomResizedCrop(vcfg.image_size, scale=(0.08, 1.0)), T.RandomHorizontalFlip()]
    else:
        steps = _eval_geometry(T, vcfg)
    if vcfg.randaugment_ops > 0:
        steps.append(T.RandAugment(num_ops=vcfg.randaugment_ops, magnitude=vcfg.randaugment_magnitude))
    return ImageTransform(T.Compose(steps + _to_normalised_tensor(T)), vcfg.image_size)


def eval_transform(vcfg: VisionConfig) -> ImageTransform:
    """Resize the short side to image_size / eval_crop_ratio, centre-crop image_size."""
    T = _torchvision_transforms()
    return ImageTransform(T.Compose(_eval_geometry(T, vcfg) + _to_normalised_tensor(T)), vcfg.image_size)


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class ImageBatch:
    """The readable images of one micro-batch; ``num_unreadable`` were dropped from it."""

    images: torch.Tensor  # [N, 3, S, S] float32
    labels: torch.Tensor  # [N] int64 logit index
    indices: torch.Tensor  # [N] int64 dataset index
    num_unreadable: int = 0
    unreadable_indices: tuple[int, ...] = ()  # dataset indices of the dropped files (dataset.path(i))

    def pin_memory(self) -> ImageBatch:  # called by DataLoader(pin_memory=True)
        return ImageBatch(
            self.images.pin_memory(),
            self.labels.pin_memory(),
            self.indices.pin_memory(),
            self.num_unreadable,
            self.unreadable_indices,
        )

    def to(self, device, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.indices.to(device, non_blocking=non_blocking),
            self.num_unreadable,
            self.unreadable_indices,
        )


def collate_skip_unreadable(batch: list, image_shape: tuple[int, ...] | None = None) -> ImageBatch:
    """Stack the decoded items, drop the ``None`` ones and count them.

    ``image_shape`` ([3, S, S]) sizes the empty batch when nothing was readable; without it that
    batch is [0, 3, 0, 0].
    """
    good = [item for item in batch if item[0] is not None]
    bad = tuple(int(item[2]) for item in batch if item[0] is None)
    if good:
        shapes = {tuple(item[0].shape) for item in good}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different shapes {sorted(shapes)} in one batch; use a transform that "
                "crops to a fixed size (train_transform/eval_transform)"
            )
        images = torch.stack([item[0] for item in good])
    else:
        images = torch.zeros((0, *(image_shape or (3, 0, 0))))
    labels = torch.tensor([int(item[1]) for item in good], dtype=torch.int64)
    indices = torch.tensor([int(item[2]) for item in good], dtype=torch.int64)
    return ImageBatch(images, labels, indices, len(bad), bad)


# ----------------------------------------------------------------------------- training order


def _check_layout(num_samples: int, batch_size: int, rank: int, world: int) -> None:
    if num_samples < 1 or batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"need num_samples >= 1, batch_size >= 1, 0 <= rank < world, got num_samples={num_samples}, "
            f"batch_size={batch_size}, rank={rank}, world={world}"
        )


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    # ~20 ms for ImageNet's 1.28M images; cached because consecutive micro-batches share an epoch
    # (two entries: a micro-batch may straddle an epoch boundary).  NumPy does not promise the same
    # stream across versions, so resume with the same NumPy to get the same order.
    perm = np.random.default_rng([seed & _U64, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrap-around arithmetic, no warnings for arrays)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _aug_seeds(seed: int, positions: np.ndarray) -> np.ndarray:
    key = int.from_bytes(hashlib.blake2b(f"msmoe-aug:{seed}".encode(), digest_size=8).digest(), "little")
    z = positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
    return (_mix64(z) >> np.uint64(1)).astype(np.int64)  # 63 bits: a valid torch seed and int64


def train_sample_keys(
    num_samples: int, batch_size: int, micro_index: int, seed: int, rank: int, world: int
) -> list[tuple[int, int]]:
    """The ``(index, aug_seed)`` keys rank ``rank`` reads at global micro-batch ``micro_index``.

    Stream position p holds image perm_{p // N}[p % N], perm_e a permutation of range(N) seeded by
    (seed, e); rank r of W at micro-batch g reads positions [(g*W + r)*B, (g*W + r + 1)*B).  The
    aug seed hashes (seed, p): it does not depend on the rank layout.
    """
    _check_layout(num_samples, batch_size, rank, world)
    if micro_index < 0:
        raise ValueError(f"micro_index must be >= 0, got {micro_index}")
    start = (micro_index * world + rank) * batch_size
    positions = np.arange(start, start + batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_samples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        indices[sel] = _epoch_permutation(num_samples, int(seed), epoch)[offsets[sel]]
    return list(zip(indices.tolist(), _aug_seeds(seed, positions).tolist()))


class _TrainKeySampler:
    """Infinite batch sampler: the key lists of micro-batches start_micro, start_micro + 1, ..."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_micro: int, rank: int, world: int):
        _check_layout(num_samples, batch_size, rank, world)
        self.args = (num_samples, batch_size, seed, start_micro, rank, world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        num_samples, batch_size, seed, micro, rank, world = self.args
        while True:
            yield train_sample_keys(num_samples, batch_size, micro, seed, rank, world)
            micro += 1


def _image_shape(dataset) -> tuple[int, ...] | None:
    while not hasattr(dataset, "image_shape") and hasattr(dataset, "dataset"):  # torch.utils.data.Subset
        dataset = dataset.dataset
    return getattr(dataset, "image_shape", None)


def _data_loader(
    dataset: ImageFolderDataset,
    batch_sampler,
    num_workers: int,
    pin_memory: bool | None,
    timeout_s: float,
    prefetch_factor: int,
) -> DataLoader:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate_skip_unreadable, image_shape=_image_shape(dataset)),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        timeout=timeout_s if workers else 0,  # a hung worker (dead NFS mount) raises instead of blocking forever
        prefetch_factor=prefetch_factor if workers else None,
        # Workers' base seed comes from this generator, not from the global RNG: creating a loader
        # must not shift the training process's dropout stream.  (Augmentation ignores it anyway.)
        generator=torch.Generator().manual_seed(0),
    )


class TrainLoader:
    """Iterator of ``ImageBatch`` for micro-batches start_micro, start_micro + 1, ... (endless).

    ``micro_index`` is the global micro-batch index of the next batch.  ``close()`` (or leaving a
    ``with`` block, or dropping the last reference) stops the worker processes.
    """

    def __init__(self, loader: DataLoader, start_micro: int):
        self.loader = loader
        self.micro_index = start_micro
        self._it: Any = iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> ImageBatch:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        self.micro_index += 1
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # multi-process iterator: join workers now, not at GC
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_loader(
    dataset: ImageFolderDataset,
    batch_size: int,
    seed: int,
    start_micro: int,
    rank: int,
    world: int,
    num_workers: int,
    *,
    pin_memory: bool | None = None,
    timeout_s: float = 300.0,
    prefetch_factor: int = 2,
) -> TrainLoader:
    """Endless training batches of this rank from global micro-batch ``start_micro`` on.

    Resume with ``start_micro = step * grad_accum``.  ``pin_memory=None`` pins when CUDA exists.
    """
    sampler = _TrainKeySampler(len(dataset), batch_size, seed, start_micro, rank, world)
    return TrainLoader(_data_loader(dataset, sampler, num_workers, pin_memory, timeout_s, prefetch_factor), start_micro)


# ----------------------------------------------------------------------------- evaluation order


def eval_rounds(num_samples: int, batch_size: int, world: int) -> int:
    """Batches the busiest rank evaluates: every rank runs this many forwards (padding with dummies)."""
    _check_layout(num_samples, batch_size, 0, world)
    return math.ceil(math.ceil(num_samples / batch_size) / world)


class _EvalKeySampler:
    """Batches r, r + W, r + 2W, ... of the images in dataset order; the last may be short."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int):
        _check_layout(num_samples, batch_size, rank, world)
        self.num_samples, self.batch_size, self.rank, self.world = num_samples, batch_size, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, math.ceil(self.num_samples / self.batch_size), self.world))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.rank, math.ceil(self.num_samples / self.batch_size), self.world):
            # Plain int keys (the dataset uses aug_seed = index): they also pass through torch's Subset.
            yield list(range(b * self.batch_size, min(self.num_samples, (b + 1) * self.batch_size)))


def eval_loader(
    dataset: ImageFolderDataset,
    batch_size: int,
    rank: int,
    world: int,
    num_workers: int,
    *,
    pin_memory: bool | None = None,
    timeout_s: float = 300.0,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Each image exactly once across the ``world`` ranks, in dataset order; ``len()`` = this rank's batches.

    ``dataset`` may also be a ``torch.utils.data.Subset`` of an ImageFolderDataset.
    """
    sampler = _EvalKeySampler(len(dataset), batch_size, rank, world)
    return _data_loader(dataset, sampler, num_workers, pin_memory, timeout_s, prefetch_factor)


# ----------------------------------------------------------------------------- mixup


def mixup(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with its partner in the flipped batch: x_i' = lam x_i + (1 - lam) x_{N-1-i}.

    lam ~ Beta(alpha, alpha), one per batch, drawn with NumPy from a seed taken from ``generator``
    (torch's Beta sampler cannot take a generator).  Returns the mixed images and soft targets
    [N, num_classes] (rows sum to 1).  ``alpha <= 0``: images unchanged, one-hot targets, no draw.
    """
    dtype = images.dtype if images.is_floating_point() else torch.float32
    targets = torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)
    if alpha <= 0:
        return images, targets
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam * images + (1.0 - lam) * images.flip(0), lam * targets + (1.0 - lam) * targets.flip(0)
