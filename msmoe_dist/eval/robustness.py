"""Robustness arithmetic for ImageNet-A, ImageNet-R and ImageNet-C: class-subset masks, top-k
counts, corruption errors and mCE.  Model-agnostic: everything here takes logits and labels, or
error rates, never a model or a loader.

Shapes: B images in a batch, C classes the classifier predicts (1000 for ImageNet-1k), S classes of
a 200-class subset, F class folders of an ImageFolder-style dataset directory.

ImageNet-A and ImageNet-R hold images of 200 of the 1000 classes.  A 1000-way classifier is scored
on them by keeping only those 200 logits (the official mask: hendrycks/natural-adv-examples and
hendrycks/imagenet-r ``eval.py``) and taking the argmax over them.  ``LabelSubset`` keeps the
subset's wnids in mask order (ascending logit index) and maps a dataset folder's class numbers to
mask positions.  Because the 1000-class list is sorted by wnid, ImageFolder's numbering (sorted
folder names) already equals the mask position when the folder holds all 200 classes; the explicit
map also covers folders holding fewer.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019, arXiv:1903.12261), for a classifier f, corruption c
and severity s = 1..5 with top-1 error E^f_{s,c}:

    CE_c          = sum_s E^f_{s,c} / sum_s E^AlexNet_{s,c}
    relative CE_c = sum_s (E^f_{s,c} - E^f_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean)
    mCE           = mean of CE_c over the 15 benchmark corruptions (likewise relative mCE)

The shipped AlexNet numbers are per-corruption means over the five severities, so with all five
severities present the ratio of sums is the ratio of means.  With some severities missing there is
no honest denominator (AlexNet's per-severity errors are not shipped), so ``mce`` still computes
mean-over-present / AlexNet-mean but marks the corruption incomplete and the whole result
``partial``.  The estimate is biased: errors grow with severity, so dropping high severities
flatters the model.

User mistakes (an unknown wnid, a missing ImageNet-C root, an error outside [0, 1]) raise
``RobustnessError``, a ``DataError``, so the command line reports one line and exits 2.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from msmoe_dist.data.errors import DataError

BENCHMARK_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# Held out by the paper for validation; reported separately, never part of mCE.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
KNOWN_CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)
# The download comes as noise/blur/weather/digital/extra archives; extracting each into its own
# folder gives root/<category>/<corruption>/..., which discovery accepts too.
CATEGORY_FOLDERS = ("noise", "blur", "weather", "digital", "extra")

SUBSET_FILES = {"imagenet_a": "imagenet_a_wnids.txt", "imagenet_r": "imagenet_r_wnids.txt"}
ALEXNET_FILE = "alexnet_imagenet_c_errors.json"
_DATA_PACKAGE = "msmoe_dist.eval.robustness_data"
_WNID = re.compile(r"^n\d{8}$")
_LAYOUT = "root/<corruption>/<severity 1-5>/<wnid>/*.JPEG"


class RobustnessError(DataError):
    """A user-facing robustness-evaluation problem; the message is one line."""


def _data_text(filename: str) -> str:
    return resources.files(_DATA_PACKAGE).joinpath(filename).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- ImageNet-A / -R


def load_wnids(name: str) -> list[str]:
    """The 200 wnids of ``"imagenet_a"`` or ``"imagenet_r"``, in ascending 1000-class logit order."""
    if name not in SUBSET_FILES:
        raise RobustnessError(f"unknown class subset {name!r}; expected one of {', '.join(SUBSET_FILES)}")
    wnids = [line.strip() for line in _data_text(SUBSET_FILES[name]).splitlines()]
    wnids = [w for w in wnids if w and not w.startswith("#")]
    bad = [w for w in wnids if not _WNID.match(w)]
    if bad or len(set(wnids)) != len(wnids):
        raise RobustnessError(
            f"shipped wnid list {SUBSET_FILES[name]} is damaged (malformed or repeated "
            f"entries, e.g. {(bad or wnids)[0]!r}); reinstall msmoe_dist"
        )
    return wnids


def subset_mask(subset_wnids: Iterable[str], all_wnids: Sequence[str]) -> torch.Tensor:
    """LongTensor [S] of the logit indices of ``subset_wnids`` in ``all_wnids``, ascending.

    ``all_wnids`` is the classifier's class list in logit order (for ImageNet-1k the 1000 wnids sorted).
    """
    index = {w: i for i, w in enumerate(all_wnids)}
    if len(index) != len(all_wnids):
        raise RobustnessError(f"the {len(all_wnids)}-class wnid list repeats entries; expected unique wnids")
    subset = list(subset_wnids)
    if not subset:
        raise RobustnessError("the class subset is empty; expected at least one wnid")
    if len(set(subset)) != len(subset):
        dup = next(w for w in subset if subset.count(w) > 1)
        raise RobustnessError(f"the class subset repeats wnid {dup}; expected unique wnids")
    unknown = [w for w in subset if w not in index]
    if unknown:
        raise RobustnessError(
            f"{len(unknown)} wnid(s) of the subset are not among the classifier's "
            f"{len(all_wnids)} classes (first: {unknown[0]}); expected a subset of its class list"
        )
    return torch.tensor(sorted(index[w] for w in subset), dtype=torch.long)


@dataclass(frozen=True)
class LabelSubset:
    """A 200-class subset of a 1000-way classifier: its wnids and logit indices, both in mask order."""

    name: str
    wnids: tuple[str, ...]
    index_S: torch.Tensor  # [S] long, ascending logit indices into the classifier's C classes
    num_classes: int  # C

    @classmethod
    def from_wnids(cls, name: str, subset_wnids: Iterable[str], all_wnids: Sequence[str]) -> LabelSubset:
        index_S = subset_mask(subset_wnids, all_wnids)
        return cls(name, tuple(all_wnids[i] for i in index_S.tolist()), index_S, len(all_wnids))

    @classmethod
    def from_name(cls, name: str, all_wnids: Sequence[str]) -> LabelSubset:
        """``"imagenet_a"`` or ``"imagenet_r"`` against the classifier's class list ``all_wnids``."""
        return cls.from_wnids(name, load_wnids(name), all_wnids)

    def restrict(self, logits_BC: torch.Tensor) -> torch.Tensor:
        """logits [B, C] -> [B, S]: the subset's columns, in mask order."""
        if logits_BC.dim() != 2 or logits_BC.shape[1] != self.num_classes:
            raise RobustnessError(
                f"{self.name}: logits of shape {tuple(logits_BC.shape)}; expected [batch, {self.num_classes}]"
            )
        return logits_BC.index_select(1, self.index_S.to(logits_BC.device))

    def folder_label_map(self, folder_wnids: Sequence[str]) -> torch.Tensor:
        """LongTensor [F]: entry f is the mask position of the dataset's class folder f.

        ``folder_wnids`` is the dataset's class list in its label order (ImageFolder's ``classes``);
        convert a batch with ``label_map_F[labels_B]``.
        """
        position = {w: i for i, w in enumerate(self.wnids)}
        unknown = [w for w in folder_wnids if w not in position]
        if unknown:
            raise RobustnessError(
                f"{self.name}: {len(unknown)} class folder(s) are not {self.name} classes "
                f"(first: {unknown[0]!r}); expected folders named by the subset's wnids"
            )
        return torch.tensor([position[w] for w in folder_wnids], dtype=torch.long)


# ----------------------------------------------------------------------------- accuracy


def topk_correct(logits_BC: torch.Tensor, labels_B: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, int]:
    """{"top1": n, "top5": n, ...}: how many rows have their label among the k largest logits.

    Counts rather than rates, so batches add up exactly.  Ties among logits are broken by
    ``torch.topk``'s order.
    """
    if logits_BC.dim() != 2 or labels_B.dim() != 1 or labels_B.shape[0] != logits_BC.shape[0]:
        raise RobustnessError(
            f"logits {tuple(logits_BC.shape)} and labels {tuple(labels_B.shape)}; expected [batch, classes] and [batch]"
        )
    if not ks or any(int(k) < 1 or int(k) > logits_BC.shape[1] for k in ks):
        raise RobustnessError(
            f"top-k values {tuple(ks)} for {logits_BC.shape[1]} classes; expected each k in 1..{logits_BC.shape[1]}"
        )
    max_k = max(int(k) for k in ks)
    pred_BK = logits_BC.topk(max_k, dim=1).indices
    hit_BK = pred_BK.eq(labels_B.to(pred_BK.device).unsqueeze(1))
    # One host sync per k (the .item()); fine at evaluation batch sizes.
    return {f"top{int(k)}": int(hit_BK[:, : int(k)].any(dim=1).sum().item()) for k in ks}


def accuracy_summary(correct: Mapping[str, int], num_images: int) -> dict:
    """JSON-ready accuracies from summed ``topk_correct`` counts: num_images, topK_acc, top1_error."""
    if num_images <= 0:
        raise RobustnessError(f"accuracy over {num_images} images; expected at least one image")
    out: dict = {"num_images": int(num_images)}
    for key, n in correct.items():
        out[f"{key}_acc"] = n / num_images
    if "top1" in correct:
        out["top1_error"] = 1.0 - correct["top1"] / num_images
    return out


# ----------------------------------------------------------------------------- ImageNet-C layout


def discover_imagenet_c(root: str | Path, corruptions: Iterable[str] | None = None) -> dict[str, dict[int, Path]]:
    """{corruption: {severity: folder}} for the layout root/<corruption>/<severity 1-5>/<wnid>/*.JPEG.

    Also accepts one level of category folders (root/noise/gaussian_noise/...).  Corruptions come out
    in benchmark order, then the extras.  Decisions:

    - a missing root, a corruption folder without severity folders, a sub-folder of a corruption
      that is not a severity 1-5, or a severity folder without class folders is an error;
    - a top-level folder that is not a known corruption is skipped with a warning (a leftover or
      an unrelated corruption set should not block the rest; ``mce`` names the missing benchmark
      corruptions and marks the result partial, so a misspelt folder cannot go unnoticed);
    - ``corruptions`` restricts discovery; there an unknown or absent name is an error.
    Missing severities are not an error here: ``mce`` flags them.
    """
    root = Path(root)
    if not root.is_dir():
        raise RobustnessError(f"ImageNet-C root {root} is not a directory; expected {_LAYOUT}")
    found: dict[str, Path] = {}
    unknown: list[str] = []

    def add(folder: Path) -> None:
        if folder.name in found:
            raise RobustnessError(
                f"ImageNet-C corruption {folder.name} appears twice ({found[folder.name]} and "
                f"{folder}); expected one folder per corruption"
            )
        found[folder.name] = folder

    for entry in _subdirs(root):
        if entry.name in KNOWN_CORRUPTIONS:
            add(entry)
        elif entry.name in CATEGORY_FOLDERS:
            for sub in _subdirs(entry):
                if sub.name in KNOWN_CORRUPTIONS:
                    add(sub)
                else:
                    unknown.append(f"{entry.name}/{sub.name}")
        else:
            unknown.append(entry.name)
    if unknown:
        warnings.warn(
            f"ImageNet-C: skipping {len(unknown)} folder(s) under {root} that are not known corruptions: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}",
            stacklevel=2,
        )
    if corruptions is not None:
        wanted = list(corruptions)
        bad = [c for c in wanted if c not in KNOWN_CORRUPTIONS]
        if bad:
            raise RobustnessError(
                f"unknown ImageNet-C corruption {bad[0]!r}; expected one of {', '.join(KNOWN_CORRUPTIONS)}"
            )
        absent = [c for c in wanted if c not in found]
        if absent:
            raise RobustnessError(f"ImageNet-C corruption {absent[0]} not found under {root}; expected {_LAYOUT}")
        found = {c: found[c] for c in wanted}
    if not found:
        raise RobustnessError(
            f"no ImageNet-C corruption folders under {root}; expected {_LAYOUT}, e.g. {root / 'gaussian_noise' / '1'}"
        )
    return {c: _severity_folders(found[c]) for c in KNOWN_CORRUPTIONS if c in found}


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _severity_folders(corruption_dir: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for sub in _subdirs(corruption_dir):
        if sub.name not in {str(s) for s in SEVERITIES}:
            raise RobustnessError(f"{sub} is not a severity folder; expected {_LAYOUT} with severities 1-5")
        if not any(p.is_dir() for p in sub.iterdir()):
            raise RobustnessError(f"{sub} has no class folders; expected {_LAYOUT}")
        out[int(sub.name)] = sub
    if not out:
        raise RobustnessError(f"{corruption_dir} has no severity folders; expected {_LAYOUT}")
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- mCE


def load_alexnet_reference() -> dict:
    """The shipped AlexNet reference: errors per corruption, clean error, and their sources."""
    return json.loads(_data_text(ALEXNET_FILE))


def load_alexnet_errors() -> dict[str, float]:
    """AlexNet's ImageNet-C top-1 error per corruption, averaged over severities 1-5 (19 corruptions)."""
    return dict(load_alexnet_reference()["errors"])


def _check_error(value: object, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RobustnessError(f"{what} = {value!r} is not a number; expected a top-1 error in [0, 1]") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise RobustnessError(f"{what} = {value!r}; expected a top-1 error in [0, 1] (a fraction, not a percentage)")
    return v


def _severity(key: object, corruption: str) -> int:
    s = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else None
    if s not in SEVERITIES:
        raise RobustnessError(f"errors[{corruption!r}] has severity {key!r}; expected severities 1-5")
    return s


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mce(
    errors: Mapping[str, Mapping[int | str, float]],
    alexnet: Mapping[str, float] | None = None,
    *,
    clean_error: float | None = None,
    alexnet_clean_error: float | None = None,
) -> dict:
    """CE per corruption, mCE, unnormalised mean error and (given ``clean_error``) relative mCE.

    ``errors[corruption][severity]`` is the model's top-1 error in [0, 1]; severity keys may be ints
    or digit strings (a JSON round trip).  ``alexnet`` maps corruption -> AlexNet's error averaged
    over severities 1-5 (default: the shipped table); ``alexnet_clean_error`` defaults to the
    shipped 0.43478.  Aggregates over the 15 benchmark corruptions present; the result is
    ``partial`` when any of them is missing or lacks a severity.  JSON-serialisable.
    """
    reference = load_alexnet_reference() if alexnet is None or alexnet_clean_error is None else None
    alexnet = dict(reference["errors"]) if alexnet is None else dict(alexnet)
    if alexnet_clean_error is None:
        alexnet_clean_error = float(reference["clean_error"])
    if not errors:
        raise RobustnessError("no ImageNet-C errors given; expected errors[corruption][severity]")
    if clean_error is not None:
        clean_error = _check_error(clean_error, "clean_error")

    per_corruption: dict[str, dict] = {}
    order = [c for c in BENCHMARK_CORRUPTIONS if c in errors] + [c for c in errors if c not in BENCHMARK_CORRUPTIONS]
    for c in order:
        if c not in alexnet:
            raise RobustnessError(
                f"no AlexNet reference error for corruption {c!r}; expected one of {', '.join(alexnet)}"
            )
        if not errors[c]:
            raise RobustnessError(f"errors[{c!r}] is empty; expected top-1 errors for severities 1-5")
        by_sev: dict[int, float] = {}
        for key, value in errors[c].items():
            s = _severity(key, c)
            if s in by_sev:
                raise RobustnessError(f"errors[{c!r}] gives severity {s} twice; expected one error per severity")
            by_sev[s] = _check_error(value, f"errors[{c!r}][{key!r}]")
        by_sev = dict(sorted(by_sev.items()))
        mean_error = _mean(list(by_sev.values()))
        row = {
            "errors": {str(s): e for s, e in by_sev.items()},
            "mean_error": mean_error,
            # = sum_s E / sum_s E^AlexNet when all five severities are present (the reference is their mean)
            "ce": mean_error / alexnet[c],
            "relative_ce": None,
            "complete": len(by_sev) == len(SEVERITIES),
            "benchmark": c in BENCHMARK_CORRUPTIONS,
        }
        if clean_error is not None:
            if alexnet[c] <= alexnet_clean_error:
                raise RobustnessError(
                    f"AlexNet error on {c} ({alexnet[c]}) is not above its clean error "
                    f"({alexnet_clean_error}); relative CE is undefined"
                )
            row["relative_ce"] = (mean_error - clean_error) / (alexnet[c] - alexnet_clean_error)
        per_corruption[c] = row

    bench = [per_corruption[c] for c in BENCHMARK_CORRUPTIONS if c in per_corruption]
    extra = [r for r in per_corruption.values() if not r["benchmark"]]
    missing = [c for c in BENCHMARK_CORRUPTIONS if c not in per_corruption]
    incomplete = [c for c, r in per_corruption.items() if not r["complete"]]
    relative = [r["relative_ce"] for r in bench] if clean_error is not None else []
    return {
        "per_corruption": per_corruption,
        "mce": _mean([r["ce"] for r in bench]),
        "mean_error": _mean([r["mean_error"] for r in bench]),
        "relative_mce": _mean(relative),
        "num_benchmark": len(bench),
        "extra_mce": _mean([r["ce"] for r in extra]),
        "extra_mean_error": _mean([r["mean_error"] for r in extra]),
        "missing": missing,
        "incomplete": incomplete,
        "partial": bool(missing) or any(c in BENCHMARK_CORRUPTIONS for c in incomplete),
        "clean_error": clean_error,
        "alexnet_clean_error": alexnet_clean_error if clean_error is not None else None,
    }


# ----------------------------------------------------------------------------- text table


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100.0 * x:.{digits}f}"


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]


def _imagenet_c_table(res: Mapping) -> list[str]:
    with_rel = res.get("clean_error") is not None
    head = ["corruption"] + [f"s{s}" for s in SEVERITIES] + ["mean err", "CE"] + (["rel CE"] if with_rel else [])
    rows = [head]
    for c, r in res["per_corruption"].items():
        errs = [_pct(r["errors"].get(str(s))) for s in SEVERITIES]
        row = [c + ("" if r["complete"] else " *")] + errs + [_pct(r["mean_error"]), _pct(r["ce"])]
        rows.append(row + ([_pct(r["relative_ce"])] if with_rel else []))
    n = res["num_benchmark"]
    tag = f"{n}/{len(BENCHMARK_CORRUPTIONS)}" + (", partial" if res["partial"] else "")
    summary = [[f"mCE ({tag})", _pct(res["mce"], 2)], [f"mean error ({tag})", _pct(res["mean_error"], 2)]]
    if with_rel:
        summary.append([f"relative mCE ({tag})", _pct(res["relative_mce"], 2)])
    if res.get("extra_mce") is not None:
        summary.append(["extra corruptions mCE", _pct(res["extra_mce"], 2)])
    lines = _align(rows) + [""] + _align(summary)
    if res["incomplete"]:
        lines.append(
            "* severities missing: CE divides the mean over the present severities by AlexNet's "
            "5-severity mean (biased: optimistic when high severities are missing)"
        )
    if res["missing"]:
        lines.append(f"missing benchmark corruptions: {', '.join(res['missing'])}")
    return lines


def format_table(results: Mapping) -> str:
    """Aligned text of an ``mce`` result, or of {dataset: ``accuracy_summary`` | ``mce`` result}."""
    if "per_corruption" in results:
        return "\n".join(_imagenet_c_table(results))
    acc_rows = [["dataset", "images", "top-1 acc", "top-5 acc", "top-1 err"]]
    blocks: list[list[str]] = []
    for name, res in results.items():
        if isinstance(res, Mapping) and "per_corruption" in res:
            blocks.append([f"{name}:"] + _imagenet_c_table(res))
        elif isinstance(res, Mapping) and "num_images" in res:
            acc_rows.append(
                [
                    name,
                    f"{res['num_images']:,}",
                    _pct(res.get("top1_acc"), 2),
                    _pct(res.get("top5_acc"), 2),
                    _pct(res.get("top1_error"), 2),
                ]
            )
        else:
            raise ValueError(f"format_table: {name!r} is neither an accuracy_summary nor an mce result")
    if len(acc_rows) > 1:
        blocks.insert(0, _align(acc_rows))
    return "\n\n".join("\n".join(b) for b in blocks)
