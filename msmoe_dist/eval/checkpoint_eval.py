"""msmoe-eval's work: rebuild the model saved in a checkpoint and score it.

The model is built in one process with every expert (whatever EP degree it was trained at), put in
the state the training run evaluated in after its last step (StableMoE's stage), and scored through
a LocalEvaluator by the same functions training-time evaluation uses.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from msmoe_dist.checkpoint import CheckpointError, load_full_weights, resolve_checkpoint
from msmoe_dist.config.loader import config_from_dict
from msmoe_dist.config.schema import DataConfig
from msmoe_dist.data import Corpus, load_corpus
from msmoe_dist.eval.attack_eval import attacked_scores, attacked_text_scores
from msmoe_dist.eval.evaluator import LocalEvaluator
from msmoe_dist.eval.lm import evaluate_tokens
from msmoe_dist.eval.request import LM_SPLITS, EvalRequest
from msmoe_dist.models.build import build_model
from msmoe_dist.parallel.runtime import pick_device


def load_eval_streams(req: EvalRequest, data: DataConfig) -> tuple[Corpus, dict[str, torch.Tensor]]:
    """The tokenizer of the checkpoint's corpus and the token streams to score, by name.

    --data-path FILE: one text file, encoded with the tokenizer of the corpus the model was trained on
    (its data.path; a generated corpus is generated again if it is gone), scored as ``file``.
    --data-path DIR: a corpus directory holding the same training split: a prepared directory for a
    checkpoint trained on prepared data, otherwise text files (a copy of a generated corpus included:
    it is read, never generated into).
    """
    path = Path(req.data_path) if req.data_path else None
    if path is not None and path.is_file():
        corpus = load_corpus(data, splits=())
        tokenizer: Any = corpus.tokenizer
        return corpus, {"file": torch.from_numpy(tokenizer.encode_file(path))}
    if path is not None:
        if not path.is_dir():
            raise CheckpointError(f"--data-path {path} does not exist, expected a corpus directory or a text file")
        data = dataclasses.replace(data, path=str(path), kind="prepared" if data.kind == "prepared" else "text")
    corpus = load_corpus(data, splits=tuple(req.splits))
    return corpus, {split: corpus.split(split) for split in req.splits}


def evaluate_checkpoint(req: EvalRequest) -> dict:
    bad = [s for s in req.splits if s not in LM_SPLITS]
    if bad or not req.splits:
        raise CheckpointError(
            f"--splits {','.join(req.splits)!r}: expected a comma-separated subset of {','.join(LM_SPLITS)}"
        )
    step_dir = resolve_checkpoint(req.checkpoint)
    weights, meta = load_full_weights(step_dir)  # every expert, whatever EP degree it was saved at
    cfg = config_from_dict(meta.config, source=str(step_dir / "complete.json"))
    if req.data_path and cfg.model.kind == "vit":
        cfg.data.path = req.data_path
    if cfg.model.kind == "vit":
        if req.attack:
            raise CheckpointError(
                f"{step_dir} holds a V-MoE image classifier: --attack is the language-model word "
                "attack; expected --imagenet-a/--imagenet-r/--imagenet-c for robustness"
            )
        from msmoe_dist.eval.vision_eval import evaluate_vision_checkpoint

        return evaluate_vision_checkpoint(req, cfg, weights, meta, step_dir)
    if req.vision_flags():
        raise CheckpointError(
            f"{step_dir} holds a language model: {', '.join(req.vision_flags())} apply to V-MoE "
            "checkpoints (model.kind=vit) only"
        )
    corpus, streams = load_eval_streams(req, cfg.data)
    if corpus.vocab.sha256() != meta.data.get("vocab_sha256"):
        raise CheckpointError(
            f"the vocabulary built from {cfg.data.path} differs from the one the checkpoint was trained with "
            "(expected the same training split; pass --data-path to the original corpus)"
        )
    device = pick_device(req.device)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, meta.data["vocab_size"]).to(device)
    model.load_state_dict(weights)
    # Evaluate as the training run did after its last step (0-based step meta.step - 1): this is
    # what decides, e.g., which router StableMoE evaluates with.
    model.set_step(max(meta.step - 1, 0))
    ev = LocalEvaluator(model, device, "bf16" if cfg.train.dtype == "bf16" else "fp32")
    batch_size = req.batch_size or cfg.data.batch_size
    result: dict = {"checkpoint": str(step_dir), "step": meta.step}
    t0 = time.perf_counter()
    for split, stream in streams.items():
        res = evaluate_tokens(ev, stream, batch_size, cfg.data.seq_len, req.batches)
        result.update({f"{split}_ppl": res["ppl"], f"{split}_loss": res["loss"], f"{split}_tokens": res["tokens"]})
        if req.attack and split == "file":
            text = Path(str(req.data_path))
            result.update(
                attacked_text_scores(ev, corpus.tokenizer, text, stream, "file", req, batch_size, cfg.data.seq_len)
            )
        elif req.attack:
            result.update(attacked_scores(ev, corpus, split, req, batch_size, cfg.data.seq_len))
    if "file" in streams:
        result["file"] = str(req.data_path)
    result["ppl"] = result.get("valid_ppl", result.get(f"{next(iter(streams))}_ppl"))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
