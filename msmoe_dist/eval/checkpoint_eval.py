"""msmoe-eval's work: rebuild the model saved in a checkpoint and score the corpus splits."""

from __future__ import annotations

import argparse
import time

from msmoe_dist.config.loader import config_from_dict
from msmoe_dist.data import load_corpus
from msmoe_dist.eval.attack_eval import attacked_scores
from msmoe_dist.eval.evaluate import evaluate_lm
from msmoe_dist.train.checkpoint import CheckpointError, resolve_checkpoint
from msmoe_dist.train.trainer import build_model, pick_device
from msmoe_dist.train.weights import load_full_weights

SPLITS = ("valid", "test")


VISION_FLAGS = ("imagenet_val", "imagenet_a", "imagenet_r", "imagenet_c")


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise CheckpointError(f"--splits {args.splits!r}: expected a comma-separated subset of {','.join(SPLITS)}")
    step_dir = resolve_checkpoint(args.checkpoint)
    weights, saved = load_full_weights(step_dir)  # every expert, whatever EP degree it was saved at
    cfg = config_from_dict(saved["config"], source=str(step_dir / "complete.json"))
    if args.data_path:
        cfg.data.path = args.data_path
    vision_flags = [f"--{f.replace('_', '-')}" for f in VISION_FLAGS if getattr(args, f, None)]
    if cfg.model.kind == "vit":
        if getattr(args, "attack", False):
            raise CheckpointError(f"{step_dir} holds a V-MoE image classifier: --attack is the language-model word "
                                  "attack; expected --imagenet-a/--imagenet-r/--imagenet-c for robustness")
        from msmoe_dist.eval.vision_eval import evaluate_vision_checkpoint

        return evaluate_vision_checkpoint(args, cfg, weights, saved, step_dir)
    if vision_flags:
        raise CheckpointError(f"{step_dir} holds a language model: {', '.join(vision_flags)} apply to V-MoE "
                              "checkpoints (model.kind=vit) only")
    corpus = load_corpus(cfg.data, splits=tuple(splits))
    if corpus.vocab.sha256() != saved["vocab_sha256"]:
        raise CheckpointError(
            f"the vocabulary built from {cfg.data.path} differs from the one the checkpoint was trained with "
            "(expected the same training split; pass --data-path to the original corpus)"
        )
    device = pick_device(args.device)
    model = build_model(cfg, saved["vocab_size"]).to(device)
    model.load_state_dict(weights)
    # Evaluate as the training run did after its last step (0-based step saved["step"] - 1): this is
    # what decides, e.g., which router StableMoE evaluates with.
    model.set_step(max(int(saved["step"]) - 1, 0))
    batch_size = args.batch_size or cfg.data.batch_size
    result = {"checkpoint": str(step_dir), "step": saved["step"]}
    t0 = time.perf_counter()
    for split in splits:
        ev = evaluate_lm(model, getattr(corpus, split), batch_size, cfg.data.seq_len, args.batches, device,
                         "bf16" if cfg.train.dtype == "bf16" else "fp32")
        result.update({f"{split}_ppl": ev["ppl"], f"{split}_loss": ev["loss"], f"{split}_tokens": ev["tokens"]})
        if getattr(args, "attack", False):
            result.update(attacked_scores(model, corpus, split, args, batch_size, cfg.data.seq_len, device,
                                          "bf16" if cfg.train.dtype == "bf16" else "fp32"))
    result["ppl"] = result.get("valid_ppl", result.get(f"{splits[0]}_ppl"))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
