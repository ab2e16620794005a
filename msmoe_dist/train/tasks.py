"""The task seam: what the training loop needs from a workload (language modelling or image classification).

A task loads its data, says how many outputs its model has, builds the model (on one device), hands
the loop the micro-batches of each step and evaluates through an Evaluator. Batches are a pure
function of (seed, step, micro-batch, rank) in the run's data layout (the world size it started with:
data.batches.data_slot), so a resumed run reads exactly what the uninterrupted one would have read
(mid-epoch included), also at another world size with the same micro-batches per step
(grad_accum_steps x world size) and data.batch_size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from msmoe_dist import logs
from msmoe_dist.config.output_layer import check_cutoffs
from msmoe_dist.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    MoEConfig,
    MomentumConfig,
    TrainConfig,
    VisionConfig,
)
from msmoe_dist.eval.evaluator import Evaluator
from msmoe_dist.models.base import MoEModel
from msmoe_dist.models.build import build_model
from msmoe_dist.train.errors import TrainError

if TYPE_CHECKING:
    from msmoe_dist.data.images import ImageBatch


class Task(Protocol):
    rate_key: str  # the throughput metric: tokens_per_s or images_per_s

    @property
    def probe_stream(self) -> torch.Tensor | None: ...  # token ids the routing-fluctuation probe reads (LM)

    def load_data(self) -> None: ...

    def num_outputs(self) -> int: ...  # the vocabulary size or the class count

    def build_model(self, local_experts: range | None = None) -> MoEModel: ...

    def data_fingerprint(self) -> dict: ...  # stored in checkpoints: which vocabulary/classes the model knows

    def start(self, start_step: int, rank: int, world: int, data_world: int = 0) -> None: ...  # 0: world

    def micro_batches(self, step: int) -> tuple[list, int]: ...  # this rank's, and samples on all ranks

    def evaluate(self, ev: Evaluator) -> dict: ...

    def extra_scalars(self) -> dict: ...

    def close(self) -> None: ...


def resolve_vocab_size(model: ModelConfig, data_vocab: int) -> int:
    """model.vocab_size, or the data's vocabulary size when it is 0."""
    if model.output_layer == "adaptive":  # the config check could not know the data's vocabulary
        try:
            check_cutoffs(model.adaptive_cutoffs, model.vocab_size or data_vocab)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    if model.vocab_size == 0:
        return data_vocab
    if model.vocab_size < data_vocab:
        raise TrainError(
            f"model.vocab_size={model.vocab_size} is smaller than the data's vocabulary ({data_vocab}); "
            "expected 0 (take it from the data) or >= the data's size"
        )
    return model.vocab_size


@dataclass(frozen=True)
class NetworkConfigs:
    """The sections a task builds its model from."""

    model: ModelConfig
    moe: MoEConfig
    momentum: MomentumConfig
    vision: VisionConfig

    def build(self, num_outputs: int, local_experts: range | None = None) -> MoEModel:
        """local_experts: the global expert ids this rank holds (None: all); see models.build.build_model."""
        return build_model(self.model, self.moe, self.momentum, self.vision, num_outputs, local_experts)


class LMTask:
    rate_key = "tokens_per_s"

    def __init__(self, net: NetworkConfigs, data: DataConfig, train: TrainConfig):
        self.net, self.data, self.train = net, data, train

    def load_data(self) -> None:
        from msmoe_dist.data import load_corpus
        from msmoe_dist.data.batches import check_lm_streams

        self.corpus = load_corpus(self.data, splits=("train", "valid"))
        assert self.corpus.train is not None and self.corpus.valid is not None  # the splits asked for
        self.train_ids, self.valid_ids = self.corpus.train, self.corpus.valid
        check_lm_streams(self.train_ids, self.valid_ids, self.data.seq_len)

    @property
    def probe_stream(self) -> torch.Tensor | None:
        return self.valid_ids

    def num_outputs(self) -> int:
        return resolve_vocab_size(self.net.model, len(self.corpus.vocab))

    def build_model(self, local_experts: range | None = None) -> MoEModel:
        return self.net.build(self.num_outputs(), local_experts)

    def data_fingerprint(self) -> dict:
        return {"vocab_size": self.num_outputs(), "vocab_sha256": self.corpus.vocab.sha256()}

    def start(self, start_step: int, rank: int, world: int, data_world: int = 0) -> None:
        self.rank, self.world, self.data_world = rank, world, data_world or world

    def micro_batches(self, step: int) -> tuple[list, int]:
        """The step's micro-batches for this rank, and how many units (tokens) they hold on all ranks."""
        from msmoe_dist.data import training_batch
        from msmoe_dist.data.batches import data_slot

        d, G, D = self.data, self.train.grad_accum_steps, self.data_world
        micro = []
        for m in range(G):
            index, data_rank = data_slot(step, m, G, self.rank, self.world, D)
            micro.append(training_batch(d, self.train_ids, index, self.train.seed, data_rank, D))
        return micro, d.batch_size * d.seq_len * G * self.world

    def evaluate(self, ev: Evaluator) -> dict:
        from msmoe_dist.eval.lm import evaluate_tokens

        d = self.data
        res = evaluate_tokens(ev, self.valid_ids, d.batch_size, d.seq_len, self.train.eval_batches)
        return {"val.loss": res["loss"], "val.ppl": res["ppl"]}

    def extra_scalars(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class VisionTask:
    """V-MoE on an ImageNet-layout folder (generated coloured shapes, or ImageNet itself)."""

    rate_key = "images_per_s"

    @property
    def probe_stream(self) -> torch.Tensor | None:
        return None  # config validation refuses logging.fluct_every with model.kind=vit

    def __init__(self, net: NetworkConfigs, data: DataConfig, train: TrainConfig):
        self.net, self.data, self.train, self.vision = net, data, train, net.vision
        self.loader: Iterator[ImageBatch] | None = None
        self.unreadable = self.reported = 0

    def load_data(self) -> None:
        from msmoe_dist.data.images import ImageFolderDataset, eval_transform, train_transform
        from msmoe_dist.data.synthetic_images import ensure_synthetic_images

        d, v = self.data, self.vision
        root = ensure_synthetic_images(d.path, v) if d.kind == "synthetic_images" else Path(d.path)
        self.train_set = ImageFolderDataset(Path(root) / "train", v.num_classes, train_transform(v))
        self.val_set = ImageFolderDataset(
            Path(root) / "val", v.num_classes, eval_transform(v), class_to_idx=self.train_set.class_to_idx
        )

    def num_outputs(self) -> int:
        return self.vision.num_classes

    def build_model(self, local_experts: range | None = None) -> MoEModel:
        return self.net.build(self.num_outputs(), local_experts)

    def data_fingerprint(self) -> dict:
        return {"num_classes": self.num_outputs(), "classes": list(self.train_set.classes)}

    def start(self, start_step: int, rank: int, world: int, data_world: int = 0) -> None:
        from msmoe_dist.data.images import train_loader

        # The image order is already layout-free: rank r's micro-batch m of step s reads stream positions
        # ((s * G + m) * W + r) * B onwards, a function of the step's forward index m * W + r alone.
        self.rank, self.world, self.data_world = rank, world, data_world or world
        G = self.train.grad_accum_steps
        self.loader = iter(
            train_loader(
                self.train_set,
                self.data.batch_size,
                self.train.seed,
                start_step * G,
                rank,
                world,
                self.vision.num_workers,
            )
        )

    def micro_batches(self, step: int) -> tuple[list, int]:
        from msmoe_dist.data.images import mixup

        v, G = self.vision, self.train.grad_accum_steps
        micro, images = [], 0
        for m in range(G):
            assert self.loader is not None, "start() first"
            batch = next(self.loader)
            self.unreadable += batch.num_unreadable
            for i in batch.unreadable_indices[: max(0, 20 - self.reported)]:
                self.reported += 1
                logs.info(
                    f"msmoe-train: rank {self.rank}: skipped unreadable image {self.train_set.path(int(i))}"
                    + (" (further ones are only counted: data.unreadable_images)" if self.reported == 20 else "")
                )
            x, y = batch.images, batch.labels
            if x.shape[0] == 0:  # its loss would be the mean over no image: NaN, reported as a bad lr
                from msmoe_dist.data.images import ImageDataError

                example = self.train_set.path(int(batch.unreadable_indices[0])) if batch.unreadable_indices else "?"
                raise ImageDataError(
                    f"rank {self.rank}: every image of a training batch was unreadable ({batch.num_unreadable} "
                    f"files, e.g. {example}); expected images PIL can decode under {self.train_set.root}"
                )
            if v.mixup_alpha > 0:  # keyed by the forward's slot in the run's data layout (data.batches.data_slot)
                from msmoe_dist.data.batches import data_slot

                index, data_rank = data_slot(step, m, G, self.rank, self.world, self.data_world)
                gen = torch.Generator().manual_seed(hash((self.train.seed, index, data_rank)) % 2**63)
                x, y = mixup(x, y, v.num_classes, v.mixup_alpha, gen)
            micro.append((x, y))
            images += x.shape[0]
        return micro, images * self.world  # an estimate across ranks (unreadable images differ per rank)

    def evaluate(self, ev: Evaluator, dataset=None, max_batches: int | None = None) -> dict:
        """Top-1/top-5 and loss over the validation folder (each image once across ranks)."""
        from msmoe_dist.eval.vision_eval import evaluate_images

        res = evaluate_images(
            ev,
            dataset or self.val_set,
            self.vision.image_size,
            self.data.batch_size,
            self.train.eval_batches if max_batches is None else max_batches,
            self.vision.num_workers,
        )
        return {"val.loss": res["loss"], "val.top1": res["top1"], "val.top5": res["top5"]}

    def extra_scalars(self) -> dict:
        return {"data.unreadable_images": self.unreadable}

    def close(self) -> None:
        self.loader = None


def make_task(cfg: Config) -> Task:
    """The task of model.kind, handed only the sections it reads."""
    net = NetworkConfigs(cfg.model, cfg.moe, cfg.momentum, cfg.vision)
    return (VisionTask if cfg.model.kind == "vit" else LMTask)(net, cfg.data, cfg.train)


__all__ = ["LMTask", "Task", "VisionTask", "make_task", "resolve_vocab_size"]
