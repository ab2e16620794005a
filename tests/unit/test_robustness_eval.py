"""ImageNet-A/-R class masks, top-k counts, ImageNet-C discovery and mCE arithmetic (msmoe_dist.eval.robustness)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from msmoe_dist.eval.robustness import (
    BENCHMARK_CORRUPTIONS,
    LabelSubset,
    RobustnessError,
    discover_imagenet_c,
    format_table,
    load_alexnet_errors,
    load_alexnet_reference,
    load_wnids,
    mce,
    subset_mask,
    topk_correct,
)

IMAGENET_1K_FILE = Path(__file__).resolve().parents[2] / "msmoe_dist" / "data" / "imagenet_wnids.txt"


def _imagenet_1k() -> list[str]:
    if not IMAGENET_1K_FILE.exists():
        pytest.skip(f"{IMAGENET_1K_FILE} (the 1000 sorted ImageNet wnids) is not there yet")
    lines = [ln.strip() for ln in IMAGENET_1K_FILE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _synthetic_1k() -> list[str]:
    """1000 sorted wnid-like names that contain both shipped subsets (no dependency on the real list)."""
    names = set(load_wnids("imagenet_a")) | set(load_wnids("imagenet_r"))
    filler = (f"n0{i:07d}" for i in range(10_000))
    while len(names) < 1000:
        names.add(next(filler))
    return sorted(names)


# ----------------------------------------------------------------------------- shipped lists


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_subset_lists_are_200_unique_wnids_in_logit_order(name):
    wnids = load_wnids(name)
    assert len(wnids) == 200 and len(set(wnids)) == 200
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == sorted(wnids)  # the 1000-class list is sorted, so mask order is wnid order


def test_subset_lists_known_members():
    a, r = set(load_wnids("imagenet_a")), set(load_wnids("imagenet_r"))
    assert {"n01498041", "n12267677", "n07768694"} <= a  # stingray, acorn, pomegranate
    assert {"n01443537", "n12267677", "n02106662"} <= r  # goldfish, acorn, German shepherd
    assert "n01440764" not in a and "n01440764" not in r  # tench is in neither
    assert len(a & r) == 86


@pytest.mark.parametrize(
    "name,index_sum,first,last",
    [
        # hendrycks/natural-adv-examples eval.py indices_in_1k (= timm imagenet_a_indices.txt)
        ("imagenet_a", 102178, [6, 11, 13, 15, 17], [981, 984, 986, 987, 988]),
        # timm/data/_info/imagenet_r_indices.txt
        ("imagenet_r", 86135, [1, 2, 4, 6, 8], [967, 980, 981, 983, 988]),
    ],
)
def test_masks_against_the_real_1000_class_list(name, index_sum, first, last):
    all_wnids = _imagenet_1k()
    assert len(all_wnids) == 1000 and all_wnids == sorted(all_wnids)
    idx = subset_mask(load_wnids(name), all_wnids).tolist()
    assert sum(idx) == index_sum and idx[:5] == first and idx[-5:] == last


def test_alexnet_reference_is_complete_and_sourced():
    ref = load_alexnet_reference()
    errs = load_alexnet_errors()
    assert set(BENCHMARK_CORRUPTIONS) <= set(errs) and len(errs) == 19
    assert errs["gaussian_noise"] == 0.886428 and errs["jpeg_compression"] == 0.6065
    assert all(0.5 < e < 1.0 for e in errs.values())
    assert ref["source"] and ref["clean_error_source"] and ref["clean_error"] == pytest.approx(1 - 0.56522)


# ----------------------------------------------------------------------------- mask and labels


def test_restricted_logits_pick_the_subset_class_over_a_larger_outside_logit():
    all_wnids = _synthetic_1k()
    sub = LabelSubset.from_name("imagenet_a", all_wnids)
    outside = [i for i, w in enumerate(all_wnids) if w not in set(sub.wnids)]
    logits = torch.zeros(200, 1000)
    for pos, wnid in enumerate(sub.wnids):
        logits[pos, all_wnids.index(wnid)] = 5.0  # the right class, only large column inside the subset
        logits[pos, outside[pos]] = 9.0  # a larger logit the mask must drop
    assert sub.restrict(logits).shape == (200, 200)
    assert torch.equal(sub.restrict(logits).argmax(dim=1), torch.arange(200))
    assert not torch.equal(logits.argmax(dim=1), sub.index_S)


def test_mask_is_ascending_logit_indices_whatever_the_subset_order():
    all_wnids = ["n00000001", "n00000002", "n00000003", "n00000004", "n00000005"]
    assert subset_mask(["n00000004", "n00000002"], all_wnids).tolist() == [1, 3]
    sub = LabelSubset.from_wnids("toy", ["n00000004", "n00000002"], all_wnids)
    assert sub.wnids == ("n00000002", "n00000004")
    logits = torch.arange(10.0).reshape(2, 5)
    assert sub.restrict(logits).tolist() == [[1.0, 3.0], [6.0, 8.0]]


def test_folder_label_map_sends_folder_classes_to_mask_positions():
    all_wnids = ["n00000001", "n00000002", "n00000003", "n00000004"]
    sub = LabelSubset.from_wnids("toy", ["n00000002", "n00000003", "n00000004"], all_wnids)
    label_map = sub.folder_label_map(["n00000004", "n00000002"])  # a folder with 2 of the 3 classes
    assert label_map.tolist() == [2, 0]
    assert label_map[torch.tensor([1, 0, 0])].tolist() == [0, 2, 2]
    with pytest.raises(RobustnessError, match="n00000001"):
        sub.folder_label_map(["n00000001"])


def test_mask_errors_are_one_line_value_errors():
    all_wnids = ["n00000001", "n00000002"]
    for bad, pattern in (
        (["n00000009"], "not among the classifier's 2 classes"),
        (["n00000001", "n00000001"], "repeats wnid"),
        ([], "empty"),
    ):
        with pytest.raises(ValueError, match=pattern) as info:
            subset_mask(bad, all_wnids)
        assert isinstance(info.value, RobustnessError) and "\n" not in str(info.value)
    with pytest.raises(RobustnessError, match="unknown class subset"):
        load_wnids("imagenet_x")
    with pytest.raises(RobustnessError, match=r"expected \[batch, 2\]"):
        LabelSubset.from_wnids("toy", ["n00000002"], all_wnids).restrict(torch.zeros(3, 5))


# ----------------------------------------------------------------------------- top-k


def test_topk_correct_by_hand():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.2],  # label 1: rank 1
            [0.8, 0.1, 0.7, 0.0],  # label 2: rank 2
            [0.0, 0.1, 0.2, 0.3],
        ]
    )  # label 0: rank 4
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, ks=(1, 2, 3)) == {"top1": 1, "top2": 2, "top3": 2}
    assert topk_correct(logits, labels, ks=(4,)) == {"top4": 3}
    with pytest.raises(RobustnessError, match="expected each k in 1..4"):
        topk_correct(logits, labels)  # default ks=(1, 5) but only 4 classes
    with pytest.raises(RobustnessError, match="expected"):
        topk_correct(logits, labels[:2])


# ----------------------------------------------------------------------------- mCE

# AlexNet means over severities 1-5 (shipped): gaussian_noise 0.886428, brightness 0.564592; clean 0.43478.
GAUSS = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8, 5: 0.9}  # sum 3.5, mean 0.7
BRIGHT = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}  # sum 1.5, mean 0.3


def test_ce_is_ratio_of_summed_errors_by_hand():
    res = mce({"gaussian_noise": GAUSS, "brightness": BRIGHT}, clean_error=0.2)
    g, b = res["per_corruption"]["gaussian_noise"], res["per_corruption"]["brightness"]
    # CE = sum_s E / sum_s E_AlexNet, AlexNet's sum being 5 x its mean
    assert g["ce"] == pytest.approx(3.5 / (5 * 0.886428)) and g["ce"] == pytest.approx(0.7896861, abs=1e-6)
    assert b["ce"] == pytest.approx(1.5 / (5 * 0.564592)) and b["ce"] == pytest.approx(0.5313571, abs=1e-6)
    assert g["mean_error"] == pytest.approx(0.7) and b["mean_error"] == pytest.approx(0.3)
    # relative CE = sum_s (E - E_clean) / sum_s (E_AlexNet - E_AlexNet_clean)
    assert g["relative_ce"] == pytest.approx((3.5 - 5 * 0.2) / (5 * (0.886428 - 0.43478)))
    assert b["relative_ce"] == pytest.approx((1.5 - 5 * 0.2) / (5 * (0.564592 - 0.43478)))
    assert res["mce"] == pytest.approx((0.7896861 + 0.5313571) / 2, abs=1e-6)
    assert res["mean_error"] == pytest.approx(0.5)
    assert res["relative_mce"] == pytest.approx((g["relative_ce"] + b["relative_ce"]) / 2)
    assert res["num_benchmark"] == 2 and res["partial"] and len(res["missing"]) == 13
    assert list(res["per_corruption"]) == ["gaussian_noise", "brightness"]  # benchmark order


def test_full_benchmark_mce_with_custom_reference():
    alexnet = {c: 0.8 for c in BENCHMARK_CORRUPTIONS}
    # corruption i has error 0.04 * (i + 1) at every severity: CE_i = 0.04 (i + 1) / 0.8 = 0.05 (i + 1)
    errors = {c: {s: 0.04 * (i + 1) for s in range(1, 6)} for i, c in enumerate(BENCHMARK_CORRUPTIONS)}
    res = mce(errors, alexnet, clean_error=0.1, alexnet_clean_error=0.4)
    assert res["mce"] == pytest.approx(0.05 * 8)  # mean of 0.05 * (1..15) = 0.05 * 8
    assert res["mean_error"] == pytest.approx(0.04 * 8)
    assert res["relative_mce"] == pytest.approx((0.04 * 8 - 0.1) / (0.8 - 0.4))
    assert not res["partial"] and res["missing"] == [] and res["incomplete"] == []
    assert res["num_benchmark"] == 15 and res["extra_mce"] is None


def test_shipped_reference_gives_mce_one_for_alexnet_itself():
    alexnet = load_alexnet_errors()
    res = mce({c: {s: alexnet[c] for s in range(1, 6)} for c in alexnet})
    assert res["mce"] == pytest.approx(1.0) and res["extra_mce"] == pytest.approx(1.0)
    assert not res["partial"] and res["relative_mce"] is None


def test_partial_severities_are_computed_on_present_ones_and_flagged():
    errors = {c: {s: 0.5 for s in range(1, 6)} for c in BENCHMARK_CORRUPTIONS}
    errors["gaussian_noise"] = {1: 0.5, 3: 0.7}
    res = mce(errors)
    g = res["per_corruption"]["gaussian_noise"]
    assert not g["complete"] and g["errors"] == {"1": 0.5, "3": 0.7}
    assert g["ce"] == pytest.approx(0.6 / 0.886428)
    assert res["incomplete"] == ["gaussian_noise"] and res["partial"] and res["missing"] == []
    # an incomplete extra corruption is listed but does not make the benchmark partial
    errors["gaussian_noise"] = {s: 0.5 for s in range(1, 6)}
    errors["speckle_noise"] = {2: 0.5}
    res = mce(errors)
    assert res["incomplete"] == ["speckle_noise"] and not res["partial"]
    assert res["extra_mce"] == pytest.approx(0.5 / 0.845388)
    assert "* severities missing" in format_table(res)


def test_mce_input_errors():
    for errors, pattern in (
        ({}, "no ImageNet-C errors"),
        ({"gaussian_noise": {1: 50.0}}, r"in \[0, 1\]"),
        ({"gaussian_noise": {6: 0.5}}, "severities 1-5"),
        ({"gaussian_noise": {}}, "empty"),
        ({"gaussian_noise": {1: 0.5, "1": 0.6}}, "twice"),
        ({"rain": {1: 0.5}}, "no AlexNet reference error for corruption 'rain'"),
    ):
        with pytest.raises(RobustnessError, match=pattern):
            mce(errors)
    with pytest.raises(RobustnessError, match="clean_error"):
        mce({"fog": {1: 0.5}}, clean_error=1.5)


def test_result_is_json_serialisable_and_round_trips():
    res = mce({"gaussian_noise": GAUSS, "brightness": BRIGHT}, clean_error=0.2)
    back = json.loads(json.dumps(res))
    again = mce({c: r["errors"] for c, r in back["per_corruption"].items()}, clean_error=0.2)  # "1".."5" keys
    assert again == back


def test_format_table_is_aligned_and_marks_partial_results():
    res = mce({"gaussian_noise": GAUSS, "brightness": BRIGHT})
    text = format_table(res)
    lines = text.splitlines()
    assert lines[0].split() == ["corruption", "s1", "s2", "s3", "s4", "s5", "mean", "err", "CE"]
    assert len({len(ln) for ln in lines[:3]}) == 1  # header and rows share column widths
    assert "gaussian_noise" in lines[1] and "78.97" not in lines[1] and "79.0" in lines[1]
    assert "mCE (2/15, partial)" in text and "missing benchmark corruptions: shot_noise" in text
    combined = format_table(
        {"imagenet_a": {"num_images": 7500, "top1_acc": 0.1, "top5_acc": 0.3, "top1_error": 0.9}, "imagenet_c": res}
    )
    assert "7,500" in combined and "imagenet_c:" in combined and "mCE" in combined


# ----------------------------------------------------------------------------- ImageNet-C discovery


def _make_tree(root: Path, corruption: str, severities, category: str | None = None) -> None:
    base = root / category if category else root
    for s in severities:
        cls = base / corruption / str(s) / "n01440764"
        cls.mkdir(parents=True)
        (cls / "ILSVRC2012_val_00000293.JPEG").touch()


def test_discover_standard_and_category_layouts(tmp_path):
    _make_tree(tmp_path, "gaussian_noise", range(1, 6))
    _make_tree(tmp_path, "defocus_blur", (1, 2), category="blur")
    _make_tree(tmp_path, "saturate", range(1, 6), category="extra")
    _make_tree(tmp_path, "snow", (5, 3))
    (tmp_path / "README.txt").touch()
    (tmp_path / ".cache").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = discover_imagenet_c(tmp_path)
    assert list(found) == ["gaussian_noise", "defocus_blur", "snow", "saturate"]  # benchmark order, then extras
    assert list(found["gaussian_noise"]) == [1, 2, 3, 4, 5] and list(found["snow"]) == [3, 5]
    assert found["defocus_blur"][2] == tmp_path / "blur" / "defocus_blur" / "2"
    assert list(discover_imagenet_c(tmp_path, corruptions=["snow"])) == ["snow"]


def test_discover_skips_unknown_folders_with_a_warning(tmp_path):
    _make_tree(tmp_path, "fog", (1,))
    (tmp_path / "guassian_noise" / "1").mkdir(parents=True)
    with pytest.warns(UserWarning, match="guassian_noise"):
        assert list(discover_imagenet_c(tmp_path)) == ["fog"]


def test_discover_errors(tmp_path):
    with pytest.raises(RobustnessError, match="is not a directory"):
        discover_imagenet_c(tmp_path / "absent")
    with pytest.raises(RobustnessError, match="no ImageNet-C corruption folders"):
        discover_imagenet_c(tmp_path)
    (tmp_path / "frost").mkdir()
    with pytest.raises(RobustnessError, match="frost has no severity folders"):
        discover_imagenet_c(tmp_path)
    (tmp_path / "frost" / "n01440764").mkdir()  # class folders one level too high
    with pytest.raises(RobustnessError, match="n01440764 is not a severity folder"):
        discover_imagenet_c(tmp_path)
    (tmp_path / "frost" / "n01440764").rmdir()
    (tmp_path / "frost" / "1").mkdir()
    with pytest.raises(RobustnessError, match="has no class folders"):
        discover_imagenet_c(tmp_path)
    (tmp_path / "frost" / "1" / "n01440764").mkdir()
    assert list(discover_imagenet_c(tmp_path)) == ["frost"]
    with pytest.raises(RobustnessError, match="unknown ImageNet-C corruption 'rain'"):
        discover_imagenet_c(tmp_path, corruptions=["rain"])
    with pytest.raises(RobustnessError, match="fog not found"):
        discover_imagenet_c(tmp_path, corruptions=["fog"])
    _make_tree(tmp_path, "frost", (2,), category="weather")
    with pytest.raises(RobustnessError, match="appears twice"):
        discover_imagenet_c(tmp_path)
