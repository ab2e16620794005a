"""Decoder-only language model whose FFN sublayers are (momentum) MoE layers.

Legend: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from msmoe_dist.config.moe_placement import lm_moe_blocks
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models.base import MoEModel
from msmoe_dist.models.blocks import Block
from msmoe_dist.models.inserted_moe import InsertedMoELayer
from msmoe_dist.models.output import build_head, output_logits, output_loss
from msmoe_dist.models.reference_init import fairseq_init, torch_default_init
from msmoe_dist.moe.experts import draw_base_seed
from msmoe_dist.momentum import MomentumState, MomentumUpdate


@dataclass(frozen=True)
class LMOutput:
    loss: Tensor | None  # token cross-entropy, mean or sum (None without targets); fp32
    aux_loss: Tensor  # sum of the MoE layers' weighted balance/z losses
    logits: Tensor | None  # [B, S, V] only when asked for; log-probabilities with output_layer=adaptive
    stats: list[dict] | None  # per MoE layer, when collect_stats


class MoELanguageModel(MoEModel):
    def __init__(
        self,
        mcfg: ModelConfig,
        moe_cfg: MoEConfig,
        mom_cfg: MomentumConfig,
        vocab_size: int,
        local_experts: range | None = None,
    ):
        """Built on one device; local_experts: the global expert ids this rank holds under expert
        parallelism (only those are allocated), None for every expert. The all-to-all is wired in
        afterwards (msmoe_dist.parallel.apply_expert_parallel)."""
        super().__init__()
        expert_seed = draw_base_seed()  # first, so the rest of the stream does not depend on the EP degree
        self.vocab_size = vocab_size
        self.max_seq_len = mcfg.max_seq_len
        d = mcfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.pos_emb = nn.Embedding(mcfg.max_seq_len, d) if mcfg.position == "learned" else None
        # model.dropout_at=reference: the MomentumSMoE reference has no embedding dropout.
        self.emb_drop = nn.Dropout(mcfg.dropout) if mcfg.dropout_at == "all" else nn.Identity()
        inserted = mcfg.layout == "middle" and mcfg.layer_insert  # StableMoE's extra layer (models/inserted_moe.py)
        moe_blocks = set() if inserted else set(lm_moe_blocks(mcfg.num_layers, mcfg.layout))
        blocks: list[nn.Module] = []
        n_moe = 0
        for i in range(mcfg.num_layers):
            idx = None
            if i in moe_blocks:
                idx, n_moe = n_moe, n_moe + 1
            blocks.append(
                Block(mcfg, moe_cfg, idx, vocab_size=vocab_size, expert_seed=expert_seed, expert_ids=local_experts)
            )
        if inserted:
            layer = InsertedMoELayer(
                mcfg, moe_cfg, 0, vocab_size=vocab_size, expert_seed=expert_seed, expert_ids=local_experts
            )
            blocks.insert(mcfg.num_layers // 2, layer)
            n_moe = 1
        self.blocks = nn.ModuleList(blocks)
        self.momentum = MomentumUpdate(mom_cfg, n_moe)
        # The reference's post-LN blocks end normalised; pre-LN needs a final LayerNorm.
        self.final_norm = nn.LayerNorm(d, eps=mcfg.norm_eps) if mcfg.block_style == "pre_ln" else nn.Identity()
        self.output_layer, self.output_chunk_tokens = mcfg.output_layer, mcfg.output_chunk_tokens
        if mcfg.output_layer == "adaptive" and mcfg.tie_embeddings:
            raise ValueError(
                "model.output_layer=adaptive cannot tie its output layer to the token embedding: "
                "expected model.tie_embeddings=false"
            )
        self.head = build_head(
            mcfg.output_layer, d, vocab_size, mcfg.adaptive_cutoffs, mcfg.adaptive_div_value, mcfg.output_bias
        )
        if mcfg.init == "torch_default":
            torch_default_init(self)
        elif mcfg.init == "fairseq":
            fairseq_init(self)
        else:
            self._init_weights(mcfg.init_std)
        self.embed_scale = math.sqrt(d) if mcfg.embed_scale else 1.0  # fairseq's TransformerDecoder
        if mcfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self, std: float) -> None:
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    @property
    def num_moe_layers(self) -> int:
        return self.momentum.num_moe_layers

    def forward(
        self,
        idx_BS: Tensor,
        targets_BS: Tensor | None = None,
        collect_stats: bool = False,
        return_logits: bool = False,
        reduction: str = "mean",
    ) -> LMOutput:
        B, S = idx_BS.shape
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.max_seq_len}")
        x = self.tok_emb(idx_BS)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(S, device=idx_BS.device))
        x = self.emb_drop(x)
        state = MomentumState()  # fresh for every forward pass: momentum belongs to the tokens
        aux = x.new_zeros((), dtype=torch.float32)
        stats = [] if collect_stats else None
        for block in self.blocks:
            x, state, layer_aux, layer_stats = block(x, state, self.momentum, collect_stats, token_ids=idx_BS)
            if layer_aux is not None:
                aux = aux + layer_aux
            if layer_stats is not None:
                stats.append(layer_stats)
        # No head at all without targets or a request for logits (the routing-fluctuation probe):
        # with a 267k vocabulary it would be the largest tensor of the pass.
        loss = logits_BSV = None
        if targets_BS is not None or return_logits:
            h_ND = self.final_norm(x).reshape(B * S, -1)
            if targets_BS is not None:
                loss = output_loss(
                    self.output_layer, self.head, h_ND, targets_BS.reshape(-1), self.output_chunk_tokens, reduction
                )
            if return_logits:
                logits_BSV = output_logits(self.output_layer, self.head, h_ND).view(B, S, -1)
        return LMOutput(loss=loss, aux_loss=aux, logits=logits_BSV, stats=stats)
