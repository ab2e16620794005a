"""Image-classification evaluation: top-1/top-5 on ImageNet-1K val, ImageNet-A/-R (200-class masks)
and ImageNet-C (per-corruption error and mCE against AlexNet), for training-time evaluation through an
engine and for msmoe-eval on a checkpoint in one process.

Legend: B images, C classes of the classifier, S classes of a subset (ImageNet-A/R: 200).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from msmoe_dist.checkpoint import CheckpointMeta
from msmoe_dist.eval.evaluator import Evaluator, LocalEvaluator
from msmoe_dist.eval.request import EvalRequest
from msmoe_dist.eval.robustness import LabelSubset, discover_imagenet_c, format_table, mce, topk_correct


@torch.no_grad()
def evaluate_images(
    engine: Evaluator,
    dataset,
    image_size: int,
    batch_size: int,
    max_batches: int,
    num_workers: int,
    subset: LabelSubset | None = None,
) -> dict:
    """Loss, top-1 and top-5 accuracy of ``engine``'s model on ``dataset`` (an ImageFolderDataset).

    Every rank runs the same number of forwards (a rank out of batches runs an uncounted dummy
    one): all ranks of an expert-parallel group must join every all-to-all. ``subset`` restricts
    the logits to a class subset (ImageNet-A/R) and scores labels by their position in it.
    """
    from torch.utils.data import Subset

    from msmoe_dist.data.images import eval_loader, eval_rounds

    if max_batches:
        dataset = Subset(dataset, range(min(len(dataset), max_batches * batch_size)))
    rank, world = engine.rank, engine.world_size
    rounds = eval_rounds(len(dataset), batch_size, world)
    label_map = None
    nll = top1 = top5 = count = unreadable = 0.0
    with engine.evaluating():
        batches = iter(eval_loader(dataset, batch_size, rank, world, num_workers))
        for _ in range(rounds):
            batch = next(batches, None)
            if batch is not None:
                unreadable += batch.num_unreadable
            if batch is None or batch.images.shape[0] == 0:
                engine.eval_forward(torch.zeros(1, 3, image_size, image_size))
                continue
            logits_BC = engine.eval_forward(batch.images).logits.float()
            labels_B = batch.labels.to(logits_BC.device)
            if subset is not None:
                if label_map is None:
                    label_map = _subset_label_map(subset, logits_BC.shape[1]).to(logits_BC.device)
                logits_BC, labels_B = subset.restrict(logits_BC), label_map[labels_B]
            nll += float(torch.nn.functional.cross_entropy(logits_BC, labels_B, reduction="sum"))
            hits = topk_correct(logits_BC, labels_B, (1, min(5, logits_BC.shape[1])))
            top1, top5 = top1 + hits["top1"], top5 + hits[f"top{min(5, logits_BC.shape[1])}"]
            count += labels_B.numel()
    nll, top1, top5, count, unreadable = engine.all_sum([nll, top1, top5, count, unreadable])
    n = max(count, 1.0)
    return {"loss": nll / n, "top1": top1 / n, "top5": top5 / n, "images": int(count), "unreadable": int(unreadable)}


def _subset_label_map(subset: LabelSubset, num_classes: int) -> torch.Tensor:
    """Dataset labels are canonical 1000-class indices; map each to its column in the restricted logits."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[subset.index_S] = torch.arange(len(subset.wnids))
    return table


def summary(ev: dict) -> dict:
    """JSON row of one dataset: accuracy_summary's names plus loss and unreadable images."""
    return {
        "num_images": ev["images"],
        "top1_acc": ev["top1"],
        "top5_acc": ev["top5"],
        "top1_error": 1.0 - ev["top1"],
        "loss": ev["loss"],
        "unreadable": ev["unreadable"],
    }


def evaluate_vision_checkpoint(req: EvalRequest, cfg, weights: dict, meta: CheckpointMeta, step_dir: Path) -> dict:
    """msmoe-eval for a V-MoE checkpoint: val (the run's own, or --imagenet-val), then A, R and C if given."""
    from msmoe_dist.data.imagenet_classes import IMAGENET_WNIDS
    from msmoe_dist.data.images import ImageDataError, ImageFolderDataset, eval_transform
    from msmoe_dist.models.build import build_model
    from msmoe_dist.parallel.runtime import pick_device

    device = pick_device(req.device)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, cfg.vision.num_classes).to(device)
    model.load_state_dict(weights)
    ev = LocalEvaluator(model, device, "bf16" if cfg.train.dtype == "bf16" else "fp32")
    v, bs = cfg.vision, req.batch_size or cfg.data.batch_size
    transform = eval_transform(v)

    def score(root, subset=None, class_to_idx=None) -> dict:
        data = ImageFolderDataset(root, v.num_classes, transform, class_to_idx=class_to_idx)
        return evaluate_images(ev, data, v.image_size, bs, req.batches, req.workers, subset)

    # Folders named by other than ImageNet wnids are numbered as in training (the run's sorted classes).
    trained = list(meta.data.get("classes") or [])
    own_labels = None if set(trained) <= set(IMAGENET_WNIDS) else {c: i for i, c in enumerate(sorted(trained))}

    result: dict = {"checkpoint": str(step_dir), "step": meta.step}
    t0 = time.perf_counter()
    val_root = req.imagenet_val or _run_val_folder(cfg)
    if val_root:
        result["val"] = summary(score(val_root, class_to_idx=own_labels))
    subsets = [("imagenet_a", req.imagenet_a), ("imagenet_r", req.imagenet_r)]
    if any(root for _, root in subsets) or req.imagenet_c:
        if v.num_classes != 1000 or not set(trained) <= set(IMAGENET_WNIDS):
            raise ImageDataError(
                f"{step_dir}: ImageNet-A/R/C scoring needs a 1000-way model trained on ImageNet "
                f"wnid folders; this one has vision.num_classes={v.num_classes} and classes "
                f"{', '.join(trained[:3])}..."
            )
    for name, root in subsets:
        if root:
            result[name] = summary(score(root, LabelSubset.from_name(name, IMAGENET_WNIDS)))
    if req.imagenet_c:
        folders = discover_imagenet_c(req.imagenet_c)
        errors: dict[str, Mapping[int | str, float]] = {
            c: {s: 1.0 - score(path)["top1"] for s, path in sevs.items()} for c, sevs in folders.items()
        }
        clean = result["val"]["top1_error"] if "val" in result else None
        result["imagenet_c"] = mce(errors, clean_error=clean)
    if len(result) == 2:
        raise ImageDataError(
            f"nothing to evaluate: {cfg.data.path}/val does not exist; expected --imagenet-val DIR "
            "(and/or --imagenet-a/--imagenet-r/--imagenet-c)"
        )
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _run_val_folder(cfg) -> str | None:
    """The training run's own validation folder (generated images are regenerated if missing)."""
    if cfg.data.kind == "synthetic_images":
        from msmoe_dist.data.synthetic_images import ensure_synthetic_images

        return str(Path(ensure_synthetic_images(cfg.data.path, cfg.vision)) / "val")
    val = Path(cfg.data.path) / "val"
    return str(val) if val.is_dir() else None


def vision_table(result: dict) -> str:
    rows = {k: result[k] for k in ("val", "imagenet_a", "imagenet_r", "imagenet_c") if k in result}
    return format_table(rows) if rows else "(no dataset scored)"
