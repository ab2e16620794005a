"""What the training loop needs from a workload: language modelling or image classification.

A task loads its data, builds its model, hands the loop the micro-batches of each step and
evaluates through the engine.  Batches are a pure function of (seed, step, micro-batch, rank),
so a resumed run reads exactly what the uninterrupted one would have read (mid-epoch included).
"""

from __future__ import annotations


import sys

import torch

from msmoe_dist.config.schema import Config


class LMTask:
    rate_key = "tokens_per_s"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load_data(self) -> None:
        from msmoe_dist.data import load_corpus

        self.corpus = load_corpus(self.cfg.data, splits=("train", "valid"))

    @property
    def valid_stream(self):
        return self.corpus.valid

    def model_size(self) -> int:
        """The vocabulary size (model.vocab_size, or the data's)."""
        from msmoe_dist.train.trainer import resolve_vocab_size

        return resolve_vocab_size(self.cfg, len(self.corpus.vocab))

    @staticmethod
    def build_model(cfg: Config, vocab_size: int, dispatcher=None):
        from msmoe_dist.train.trainer import build_model

        return build_model(cfg, vocab_size, dispatcher)

    def seal_extra(self, size: int) -> dict:
        return {"vocab_size": size, "vocab_sha256": self.corpus.vocab.sha256()}

    def start(self, start_step: int, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def micro_batches(self, step: int) -> tuple[list, int]:
        """The step's micro-batches for this rank, and how many units (tokens) they hold on all ranks."""
        from msmoe_dist.data import training_batch

        cfg, G = self.cfg, self.cfg.train.grad_accum_steps
        micro = [training_batch(cfg.data, self.corpus.train, step * G + m, cfg.train.seed, self.rank, self.world)
                 for m in range(G)]
        return micro, cfg.data.batch_size * cfg.data.seq_len * G * self.world

    def evaluate(self, engine) -> dict:
        d = self.cfg.data
        ev = engine.evaluate(self.corpus.valid, d.batch_size, d.seq_len, self.cfg.train.eval_batches)
        return {"val.loss": ev["loss"], "val.ppl": ev["ppl"]}

    def extra_scalars(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class VisionTask:
    """V-MoE on an ImageNet-layout folder (generated coloured shapes, or ImageNet itself)."""

    rate_key = "images_per_s"
    valid_stream = None

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.loader = None
        self.unreadable = self.reported = 0

    def load_data(self) -> None:
        from pathlib import Path

        from msmoe_dist.data.images import ImageFolderDataset, eval_transform, train_transform
        from msmoe_dist.data.synthetic_images import ensure_synthetic_images

        d, v = self.cfg.data, self.cfg.vision
        root = ensure_synthetic_images(d.path, v) if d.kind == "synthetic_images" else Path(d.path)
        self.train_set = ImageFolderDataset(Path(root) / "train", v.num_classes, train_transform(v))
        self.val_set = ImageFolderDataset(Path(root) / "val", v.num_classes, eval_transform(v),
                                          class_to_idx=self.train_set.class_to_idx)

    def model_size(self) -> int:
        return self.cfg.vision.num_classes

    @staticmethod
    def build_model(cfg: Config, num_classes: int, dispatcher=None):
        from msmoe_dist.models import VisionMoE

        return VisionMoE(cfg.model, cfg.moe, cfg.momentum, cfg.vision, dispatcher=dispatcher)

    def seal_extra(self, size: int) -> dict:
        return {"num_classes": size, "classes": list(self.train_set.classes)}

    def start(self, start_step: int, rank: int, world: int) -> None:
        from msmoe_dist.data.images import train_loader

        self.rank, self.world = rank, world
        G = self.cfg.train.grad_accum_steps
        self.loader = iter(train_loader(self.train_set, self.cfg.data.batch_size, self.cfg.train.seed,
                                        start_step * G, rank, world, self.cfg.vision.num_workers))

    def micro_batches(self, step: int) -> tuple[list, int]:
        from msmoe_dist.data.images import mixup

        v, G = self.cfg.vision, self.cfg.train.grad_accum_steps
        micro, images = [], 0
        for m in range(G):
            batch = next(self.loader)
            self.unreadable += batch.num_unreadable
            for i in batch.unreadable_indices[:max(0, 20 - self.reported)]:
                self.reported += 1
                print(f"msmoe-train: rank {self.rank}: skipped unreadable image {self.train_set.path(int(i))}"
                      + (" (further ones are only counted: data.unreadable_images)" if self.reported == 20 else ""),
                      file=sys.stderr)
            x, y = batch.images, batch.labels
            if v.mixup_alpha > 0:
                gen = torch.Generator().manual_seed(hash((self.cfg.train.seed, step * G + m, self.rank)) % 2**63)
                x, y = mixup(x, y, v.num_classes, v.mixup_alpha, gen)
            micro.append((x, y))
            images += x.shape[0]
        return micro, images * self.world  # an estimate across ranks (unreadable images differ per rank)

    def evaluate(self, engine, dataset=None, max_batches: int | None = None) -> dict:
        """Top-1/top-5 and loss over the validation folder (each image once across ranks)."""
        from msmoe_dist.eval.vision_eval import evaluate_images

        ev = evaluate_images(engine, dataset or self.val_set, self.cfg.data.batch_size,
                             self.cfg.train.eval_batches if max_batches is None else max_batches,
                             self.cfg.vision.num_workers)
        return {"val.loss": ev["loss"], "val.top1": ev["top1"], "val.top5": ev["top5"]}

    def extra_scalars(self) -> dict:
        return {"data.unreadable_images": self.unreadable}

    def close(self) -> None:
        self.loader = None


def make_task(cfg: Config):
    return VisionTask(cfg) if cfg.model.kind == "vit" else LMTask(cfg)


__all__ = ["LMTask", "VisionTask", "make_task"]
