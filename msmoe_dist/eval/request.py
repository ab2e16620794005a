"""What msmoe-eval was asked to do, as a typed value (the command line builds it; library code reads it)."""

from __future__ import annotations

from dataclasses import dataclass

LM_SPLITS = ("valid", "test")
VISION_SETS = ("imagenet_val", "imagenet_a", "imagenet_r", "imagenet_c")


@dataclass(frozen=True)
class EvalRequest:
    checkpoint: str  # a run directory, its checkpoints/ directory or one step_* directory
    splits: tuple[str, ...] = LM_SPLITS  # language models: the corpus splits to score
    data_path: str | None = None  # read the data from here instead of the checkpoint's data.path
    batches: int = 0  # at most this many batches per split / dataset (0 = all)
    batch_size: int = 0  # 0 = the checkpoint's data.batch_size
    device: str = "auto"
    attack: bool = False  # language models: also score the word-attacked splits
    attack_rate: float = 0.025
    attack_seed: int = 0
    text_path: str | None = None  # --attack on a prepared corpus: where its text lives
    imagenet_val: str | None = None  # V-MoE: the datasets to score
    imagenet_a: str | None = None
    imagenet_r: str | None = None
    imagenet_c: str | None = None
    workers: int = 2  # V-MoE: DataLoader workers

    def vision_flags(self) -> list[str]:
        """The V-MoE dataset flags that were given, as the command line spells them."""
        given = {
            "imagenet_val": self.imagenet_val,
            "imagenet_a": self.imagenet_a,
            "imagenet_r": self.imagenet_r,
            "imagenet_c": self.imagenet_c,
        }
        return [f"--{name.replace('_', '-')}" for name in VISION_SETS if given[name]]
