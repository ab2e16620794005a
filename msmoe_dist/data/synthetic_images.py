"""A small, learnable image-classification set in ImageNet layout, so V-MoE runs without downloads.

Class c is a (shape, colour) pair: shape c % 6 of circle, square, triangle, cross, ring, stripes
and colour (7*(c // 6) + c) % 8 of eight hues, which walks all 48 pairs with neighbouring classes
differing in both, so neither shape nor colour alone separates the classes.  Each image has its
own size (48-96 px per side, never square), a dark noisy background with a colour gradient, the
shape at a random position, scale and rotation in a jittered version of its colour, and a few
distractor dots.

Layout: ``<path>/train/cNN_<colour>_<shape>/train_NNNNN.JPEG`` and the same under ``val/``, plus
``meta.json``.  Bytes are a pure function of (seed, counts, GENERATOR_VERSION) for a given
NumPy/Pillow build: every image draws from its own ``numpy.random.default_rng`` seeded by
(seed, split, class, image).  The folder is built in a temporary sibling and renamed into place
with ``meta.json`` written last, so a folder with a matching ``meta.json`` is complete and is
reused; one with our ``meta.json`` but other parameters is replaced; a non-empty folder without
our ``meta.json`` is refused (it is not ours).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ImageDataError

if TYPE_CHECKING:
    from msmoe_dist.config.schema import VisionConfig

GENERATOR_NAME = "msmoe_dist.data.synthetic_images"
GENERATOR_VERSION = 1
META = "meta.json"
SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes")
COLOURS = {
    "red": (220, 45, 45),
    "orange": (240, 145, 30),
    "yellow": (235, 220, 50),
    "green": (50, 185, 70),
    "cyan": (50, 205, 215),
    "blue": (55, 95, 235),
    "purple": (150, 70, 220),
    "white": (240, 240, 240),
}
MAX_CLASSES = len(SHAPES) * len(COLOURS)
_SPLITS = ("train", "val")
_MIN_SIDE, _MAX_SIDE = 48, 96


def class_names(num_classes: int) -> list[str]:
    """Folder names of the first ``num_classes`` classes, e.g. ``c00_red_circle``."""
    colours = list(COLOURS)
    return [
        f"c{c:02d}_{colours[(7 * (c // len(SHAPES)) + c) % len(colours)]}_{SHAPES[c % len(SHAPES)]}"
        for c in range(num_classes)
    ]


def _params(vcfg: VisionConfig) -> dict:
    counts = {
        "synthetic_classes": (vcfg.synthetic_classes, 2, MAX_CLASSES),
        "synthetic_train_per_class": (vcfg.synthetic_train_per_class, 1, None),
        "synthetic_val_per_class": (vcfg.synthetic_val_per_class, 1, None),
    }
    for key, (value, low, high) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            expected = f"an integer in [{low}, {high}]" if high else f"an integer >= {low}"
            raise ImageDataError(f"vision.{key} must be {expected}, got {value!r}")
    return {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": int(vcfg.synthetic_seed),
        "classes": vcfg.synthetic_classes,
        "train_per_class": vcfg.synthetic_train_per_class,
        "val_per_class": vcfg.synthetic_val_per_class,
    }


# ----------------------------------------------------------------------------- drawing


def _rotated(points, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, angle: float, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, round(0.3 * r)))
    elif shape == "square":
        a = 0.8 * r
        draw.polygon(_rotated([(-a, -a), (a, -a), (a, a), (-a, a)], angle, cx, cy), fill=colour)
    elif shape == "triangle":
        corners = [(r * math.cos(t), r * math.sin(t)) for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
        draw.polygon(_rotated(corners, angle, cx, cy), fill=colour)
    elif shape == "cross":
        w = 0.3 * r
        arms = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        draw.polygon(_rotated(arms, angle, cx, cy), fill=colour)
    elif shape == "stripes":
        a = 0.85 * r
        for u0 in (-a, -0.2 * a, 0.6 * a):  # three bars of width 0.4a with gaps of 0.4a
            bar = [(u0, -a), (u0 + 0.4 * a, -a), (u0 + 0.4 * a, a), (u0, a)]
            draw.polygon(_rotated(bar, angle, cx, cy), fill=colour)
    else:
        raise AssertionError(shape)


def _render(rng: np.random.Generator, shape: str, colour: tuple[int, int, int]):
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))
    if w == h:  # never square, so models must cope with aspect ratios as on ImageNet
        h = h + 1 if h < _MAX_SIDE else h - 1
    # Background: a dark, slightly tinted base, a linear gradient in a random direction, pixel noise.
    base = rng.uniform(15, 100) + rng.uniform(-20, 20, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w]
    ramp = (xs * math.cos(theta) + ys * math.sin(theta)) / max(w, h)
    pixels = base + ramp[..., None] * rng.uniform(-40, 40, size=3) + rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # distractor dots of any colour
        x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 4)
        draw.ellipse((x - s, y - s, x + s, y + s), fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    r = rng.uniform(0.2, 0.4) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    jittered = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-25, 26, size=3), 0, 255))
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), jittered)
    return img


def _generate(out: Path, params: dict) -> None:
    names = class_names(params["classes"])
    counts = {"train": params["train_per_class"], "val": params["val_per_class"]}
    for split_id, split in enumerate(_SPLITS):
        for c, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True)
            _, colour_name, shape = name.split("_", 2)
            for i in range(counts[split]):
                rng = np.random.default_rng([params["seed"] & ((1 << 64) - 1), split_id, c, i])
                img = _render(rng, shape, COLOURS[colour_name])
                img.save(folder / f"{split}_{i:05d}.JPEG", format="JPEG", quality=90)
    meta = {**params, "class_names": names}
    (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- cache


def _state(out: Path, params: dict) -> str:
    """'match' (reuse), 'absent' (missing or empty), 'stale' (ours, other parameters); raises if foreign."""
    if out.exists() and not out.is_dir():
        raise ImageDataError(f"synthetic images: {out} is a file, expected a directory (or a path that does not exist)")
    if not out.exists() or not any(out.iterdir()):
        return "absent"
    meta_path = out / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR_NAME:
        found = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise ImageDataError(
            f"synthetic images: {out} is not empty and has no {META} written by {GENERATOR_NAME} "
            f"(found {found}); refusing to overwrite it, expected an empty or new directory"
        )
    return "match" if {k: meta.get(k) for k in params} == params else "stale"


def ensure_synthetic_images(path, vcfg: VisionConfig) -> Path:
    """Make ``path`` hold the synthetic set described by ``vcfg``'s synthetic_* keys; return it.

    Call it on one process per filesystem and let the others wait (a barrier): concurrent calls
    stay correct (the first rename wins) but duplicate the work.
    """
    params = _params(vcfg)
    out = Path(path)
    if _state(out, params) == "match":
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        _generate(tmp, params)
        if _state(out, params) == "stale":  # ours with other parameters: move aside, replace, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "data")
        try:
            os.rename(tmp, out)  # atomic; also replaces an empty directory
        except OSError as exc:
            if _state(out, params) != "match":  # else another process installed the same set first
                raise ImageDataError(
                    f"synthetic images: cannot move the generated set into {out} "
                    f"({exc.strerror or exc}); expected a new or empty directory"
                ) from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return out
