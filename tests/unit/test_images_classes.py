"""The shipped ImageNet-1K class list and the folder-name -> logit mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from msmoe_dist.data.imagenet_classes import IMAGENET_CLASS_NAMES, IMAGENET_WNIDS, class_to_index
from msmoe_dist.data.images import ImageDataError

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "imagenet-sample"


def test_wnid_list_is_the_standard_order():
    assert len(IMAGENET_WNIDS) == len(set(IMAGENET_WNIDS)) == len(IMAGENET_CLASS_NAMES) == 1000
    assert IMAGENET_WNIDS == sorted(IMAGENET_WNIDS)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in IMAGENET_WNIDS)
    assert (IMAGENET_WNIDS[0], IMAGENET_CLASS_NAMES[0].split(",")[0]) == ("n01440764", "tench")
    assert (IMAGENET_WNIDS[999], IMAGENET_CLASS_NAMES[999].split(",")[0]) == ("n15075141", "toilet tissue")


def test_sample_files_agree_with_the_list():
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample images not found at {SAMPLE} (shared test data beside the checkout)")
    files = sorted(SAMPLE.glob("*.JPEG"))
    assert len(files) == 48
    for f in files:
        wnid, label = f.stem.split("_", 1)
        assert wnid in IMAGENET_WNIDS, f.name
        common_name = IMAGENET_CLASS_NAMES[IMAGENET_WNIDS.index(wnid)].split(",")[0]
        assert common_name.lower() == label.replace("_", " ").lower(), f.name


def test_wnid_folders_keep_canonical_indices_even_when_partial():
    subset = ["n15075141", "n01440764", "n02123045"]  # unsorted, a partial val/ for instance
    assert class_to_index(subset, 1000) == {"n01440764": 0, "n02123045": 281, "n15075141": 999}


def test_other_names_are_numbered_in_sorted_order():
    assert class_to_index(["dog", "cat", "n01440764"], 5) == {"cat": 0, "dog": 1, "n01440764": 2}


def test_classes_that_do_not_fit_are_refused():
    with pytest.raises(ImageDataError, match="n15075141.*num_classes=10"):
        class_to_index(["n01440764", "n15075141"], 10)
    with pytest.raises(ImageDataError, match="3 class folders.*num_classes=2"):
        class_to_index(["a", "b", "c"], 2)
    with pytest.raises(ImageDataError, match="no class folders"):
        class_to_index([], 10)
