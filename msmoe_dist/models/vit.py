"""V-MoE: a Vision Transformer whose MLP is a (momentum) MoE layer in some blocks.

Riquelme et al. 2021 (arXiv 2106.05974): patch embedding, a class token (or global average
pooling), pre-LN blocks with bidirectional attention, MoE MLPs in every k-th block or the last n.
The momentum state of MomentumV-MoE/AdamV-MoE/Robust flows through the MoE blocks and passes
through the dense ones unchanged, exactly as in the language model (msmoe_dist.models.blocks).

Legend: B batch, C channels, H/W image height/width, N tokens (patches + class token), D model dim,
K classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msmoe_dist.config.moe_placement import vit_moe_blocks
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig, VisionConfig
from msmoe_dist.models.base import MoEModel
from msmoe_dist.models.blocks import Block
from msmoe_dist.models.reference_init import vmoe_init
from msmoe_dist.moe.experts import draw_base_seed
from msmoe_dist.momentum import MomentumState, MomentumUpdate


@dataclass(frozen=True)
class VisionOutput:
    loss: Tensor | None  # cross-entropy against hard labels [B] or soft targets [B, K] (mixup)
    aux_loss: Tensor  # sum of the MoE layers' weighted balance/z losses
    logits: Tensor  # [B, K]
    stats: list[dict] | None  # per MoE layer, when collect_stats


def classification_loss(
    logits_BK: Tensor, targets: Tensor, reduction: str = "mean", kind: str = "softmax_ce"
) -> Tensor:
    """Cross-entropy in fp32; ``targets`` are class ids [B] or probability rows [B, K] (mixup).

    kind=sigmoid_ce (vision.loss): V-MoE's sigmoid_xent (vmoe/train/trainer.py get_loss_fn), per image the
    sum over the K classes of binary cross-entropy with logits against the one-hot or mixed targets."""
    logits_BK = logits_BK.float()
    if kind == "sigmoid_ce":
        if targets.dim() == 1:
            targets = F.one_hot(targets, logits_BK.shape[-1])
        bce_B = F.binary_cross_entropy_with_logits(logits_BK, targets.float(), reduction="none").sum(dim=-1)
        return bce_B.sum() if reduction == "sum" else bce_B.mean()
    if targets.dim() == 2:
        nll_B = -(targets.float() * F.log_softmax(logits_BK, dim=-1)).sum(dim=-1)
        return nll_B.sum() if reduction == "sum" else nll_B.mean()
    return F.cross_entropy(logits_BK, targets, reduction=reduction)


class VisionMoE(MoEModel):
    def __init__(
        self,
        mcfg: ModelConfig,
        moe_cfg: MoEConfig,
        mom_cfg: MomentumConfig,
        vcfg: VisionConfig,
        local_experts: range | None = None,
    ):
        """Built on one device; local_experts: the global expert ids this rank holds under expert
        parallelism (only those are allocated), None for every expert. The all-to-all is wired in
        afterwards (msmoe_dist.parallel.apply_expert_parallel)."""
        super().__init__()
        expert_seed = draw_base_seed()  # first, so the rest of the stream does not depend on the EP degree
        d, p = mcfg.d_model, vcfg.patch_size
        self.image_size, self.num_classes = vcfg.image_size, vcfg.num_classes
        self.pooling = vcfg.pooling
        self.patch_proj = nn.Conv2d(3, d, kernel_size=p, stride=p)
        num_tokens = (vcfg.image_size // p) ** 2 + (1 if vcfg.pooling == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if vcfg.pooling == "cls" else None
        self.pos_emb = nn.Parameter(torch.zeros(1, num_tokens, d))
        self.emb_drop = nn.Dropout(mcfg.dropout) if mcfg.dropout_at == "all" else nn.Identity()
        self.loss_kind = vcfg.loss
        self.moe_blocks = vit_moe_blocks(mcfg.num_layers, vcfg.moe_layout, vcfg.moe_every, vcfg.moe_last)
        blocks = []
        for i in range(mcfg.num_layers):
            idx = self.moe_blocks.index(i) if i in self.moe_blocks else None
            blocks.append(
                Block(
                    mcfg,
                    moe_cfg,
                    idx,
                    causal=False,
                    dense_activation=moe_cfg.activation,
                    expert_seed=expert_seed,
                    expert_ids=local_experts,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.momentum = MomentumUpdate(mom_cfg, len(self.moe_blocks))
        self.final_norm = nn.LayerNorm(d, eps=mcfg.norm_eps)
        # vision.pre_logits: V-MoE's representation layer, tanh(Dense(d)) between the pooled token and the head.
        self.pre_logits = nn.Sequential(nn.Linear(d, d), nn.Tanh()) if vcfg.pre_logits else nn.Identity()
        self.head = nn.Linear(d, vcfg.num_classes)
        if mcfg.init == "vmoe":
            vmoe_init(self)  # the V-MoE fork's flax initialisers (the zero head below stays)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self._init_weights(mcfg.init_std)
        if vcfg.head_bias == "neg_log_classes":  # V-MoE: head_bias_init = -log(num_classes)
            nn.init.constant_(self.head.bias, -math.log(vcfg.num_classes))

    def _init_weights(self, std: float) -> None:
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.normal_(self.pos_emb, std=std)
        # ViT convention: a zero head starts every class at the same logit.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def num_moe_layers(self) -> int:
        return self.momentum.num_moe_layers

    def forward(
        self, images_BCHW: Tensor, targets: Tensor | None = None, collect_stats: bool = False, reduction: str = "mean"
    ) -> VisionOutput:
        B, C, H, W = images_BCHW.shape
        if (C, H, W) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape [B, 3, {self.image_size}, {self.image_size}] "
                f"(vision.image_size), got {list(images_BCHW.shape)}"
            )
        x_BND = self.patch_proj(images_BCHW).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(B, -1, -1).to(x_BND.dtype), x_BND], dim=1)
        x_BND = self.emb_drop(x_BND + self.pos_emb.to(x_BND.dtype))
        state = MomentumState()  # fresh for every forward pass: momentum belongs to the tokens
        aux = x_BND.new_zeros((), dtype=torch.float32)
        stats = [] if collect_stats else None
        for block in self.blocks:
            x_BND, state, layer_aux, layer_stats = block(x_BND, state, self.momentum, collect_stats)
            if layer_aux is not None:
                aux = aux + layer_aux
            if layer_stats is not None:
                stats.append(layer_stats)
        x_BND = self.final_norm(x_BND)
        pooled_BD = x_BND[:, 0] if self.cls_token is not None else x_BND.mean(dim=1)
        logits_BK = self.head(self.pre_logits(pooled_BD))
        loss = None if targets is None else classification_loss(logits_BK, targets, reduction, self.loss_kind)
        return VisionOutput(loss=loss, aux_loss=aux, logits=logits_BK, stats=stats)
