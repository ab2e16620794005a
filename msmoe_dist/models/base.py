"""What every msmoe_dist model offers beyond nn.Module: its MoE layers, and the step they route at."""

from __future__ import annotations

from torch import nn

from msmoe_dist.models.blocks import CHECKPOINT_MODES, Block
from msmoe_dist.models.inserted_moe import InsertedMoELayer
from msmoe_dist.moe import MoELayer


class MoEModel(nn.Module):
    """A stack of `Block`s in `self.blocks`, some of them MoE blocks (and, with model.layer_insert, one
    `InsertedMoELayer`)."""

    blocks: nn.ModuleList

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in block order."""
        return [block.moe for block in self.blocks if isinstance(block, (Block, InsertedMoELayer)) and block.is_moe]

    def set_step(self, step: int) -> None:
        """Tells the MoE layers (StableMoE's two stages) the 0-based optimiser step about to be taken; the
        engine calls it before every step. Evaluation behaves as the last step set."""
        for layer in self.moe_layers():
            layer.set_step(step)

    def set_activation_checkpointing(self, mode: str) -> None:
        """train.activation_checkpointing: none, block or selective (msmoe_dist.models.blocks); takes effect
        in training forwards with gradients on, under either engine."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(
                f"unknown activation checkpointing {mode!r}; expected one of {', '.join(CHECKPOINT_MODES)}"
            )
        for block in self.blocks:
            if isinstance(block, Block):  # an InsertedMoELayer (no attention, no dense FFN) is not recomputed
                block.checkpointing = mode
