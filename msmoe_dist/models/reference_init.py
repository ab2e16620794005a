"""Reference initialisations: model.init=torch_default (the MomentumSMoE reference, below),
model.init=vmoe (the V-MoE fork, `vmoe_init`) and model.init=fairseq (StableMoE, `fairseq_init`).

torch_default: PyTorch's default initialisers, as the MomentumSMoE reference has them.

The reference (rachtsy/MomentumSMoE) never re-initialises its modules, so each keeps what PyTorch (or
fastmoe) gives it at construction:
  nn.Embedding (in_emb)                       N(0, 1)
  nn.Linear (out_emb, the gate, attention,    weight kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
            the dense FFN)                    bias U(+-1/sqrt(fan_in))
  nn.LayerNorm                                weight 1, bias 0
  experts (custom_layers.py FMoELinear,       weight [E, out, in] kaiming_uniform(a=sqrt(5)): torch takes
           lines 385-390)                     fan_in = out * in for a 3-d tensor, so U(+-1/sqrt(D*F));
                                              bias 0
Here each such module is reset to exactly that. The router of moe.router=topk is a raw [E, D] weight
(plus moe.gate_bias), initialised like the nn.Linear it stands for. The StableMoE router keeps its own
(reference) initialisation, and learnable momentum scalars their configured values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from msmoe_dist.models.attention import SelfAttention
from msmoe_dist.models.blocks import DenseFFN
from msmoe_dist.moe import Experts
from msmoe_dist.moe.router import Router


@torch.no_grad()
def torch_default_init(model: nn.Module) -> None:
    """Re-initialise every layer of ``model`` with PyTorch's default (fastmoe's for the experts), in module order."""
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d)):
            mod.reset_parameters()
        elif isinstance(mod, Router):
            nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5))
            if mod.bias is not None:
                bound = 1.0 / math.sqrt(mod.weight.shape[1])
                nn.init.uniform_(mod.bias, -bound, bound)
        elif isinstance(mod, Experts):
            bound = 1.0 / math.sqrt(mod.d_model * mod.ffn_dim)
            for i, e in enumerate(mod.expert_ids):  # each expert from its own generator: EP-independent
                gen = mod.expert_generator(e)
                mod.w1[i].uniform_(-bound, bound, generator=gen)
                mod.w2[i].uniform_(-bound, bound, generator=gen)
            nn.init.zeros_(mod.b1)
            nn.init.zeros_(mod.b2)


def _lecun_normal_(t: torch.Tensor, fan_in: int) -> None:
    """flax's default kernel init, variance_scaling(1, fan_in, truncated_normal): N(0, 1/fan_in) truncated
    at two standard deviations, its std corrected for the truncation (jax divides by 0.87962566103423978)."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _xavier_uniform_(t: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(t, -bound, bound)


@torch.no_grad()
def vmoe_init(model: nn.Module) -> None:
    """model.init=vmoe: the flax initialisers of the V-MoE fork (rachtsy/vmoe), for a VisionMoE.

      patch embedding nn.Conv       LeCun normal (fan_in = 3 p^2), bias 0       vit_moe.py VisionTransformerMoe
      class token / positions       0 / N(0, 0.02)                              (AddPositionEmbs posemb_init)
      attention q, k, v, out        xavier-uniform per [d, d] kernel, bias 0    EncoderBlock (kernel_init)
      MLPs and experts              xavier-uniform, biases N(0, 1e-6)           models_vit.py MlpBlock
      experts                       one draw shared by all experts              common.py: split_rngs = False
      router                        LeCun normal, no bias                       routing.py nn.Dense(use_bias=False)
      pre-logits                    LeCun normal, bias 0                        nn.Dense defaults
      LayerNorm                     1, 0
    The head (zero kernel, bias 0 or -log K) is left to the model. flax kernels are [in, out]; ours are
    [out, in] for nn.Linear and [E, in, out] for the experts: the fans are the same.
    """
    d = model.pos_emb.shape[-1]
    conv = model.patch_proj
    _lecun_normal_(conv.weight, conv.weight[0].numel())
    nn.init.zeros_(conv.bias)
    if model.cls_token is not None:
        nn.init.zeros_(model.cls_token)
    nn.init.normal_(model.pos_emb, std=0.02)
    if isinstance(model.pre_logits, nn.Sequential):
        _lecun_normal_(model.pre_logits[0].weight, d)
        nn.init.zeros_(model.pre_logits[0].bias)
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.reset_parameters()
        elif isinstance(mod, SelfAttention):
            for w in mod.qkv.weight.view(3, d, d):  # q, k, v: each its own [d, d] kernel
                _xavier_uniform_(w, d, d)
            _xavier_uniform_(mod.proj.weight, d, d)
            for b in (mod.qkv.bias, mod.proj.bias):
                if b is not None:
                    nn.init.zeros_(b)
        elif isinstance(mod, DenseFFN):
            for lin in (mod.fc1, mod.fc2):
                _xavier_uniform_(lin.weight, lin.in_features, lin.out_features)
                nn.init.normal_(lin.bias, std=1e-6)
        elif isinstance(mod, Router):
            _lecun_normal_(mod.weight, mod.weight.shape[1])
        elif isinstance(mod, Experts):
            D, F = mod.d_model, mod.ffn_dim
            gen = mod.expert_generator(0)  # split_rngs=False: every expert starts from one draw (every rank's)
            b1, b2 = math.sqrt(6.0 / (D + F)), math.sqrt(6.0 / (F + D))
            w1, w2 = torch.empty_like(mod.w1[0]), torch.empty_like(mod.w2[0])
            w1.uniform_(-b1, b1, generator=gen)
            w2.uniform_(-b2, b2, generator=gen)
            bias1, bias2 = torch.empty_like(mod.b1[0]), torch.empty_like(mod.b2[0])
            bias1.normal_(0.0, 1e-6, generator=gen)
            bias2.normal_(0.0, 1e-6, generator=gen)
            for t, value in ((mod.w1, w1), (mod.w2, w2), (mod.b1, bias1), (mod.b2, bias2)):
                t[:] = value


@torch.no_grad()
def fairseq_init(model: nn.Module) -> None:
    """model.init=fairseq: fairseq's initialisation of a transformer LM, as the StableMoE reference runs it
    (Hunter-DDM/stablemoe):

      token embedding (tied output)   N(0, d^-1/2)                 fairseq/models/transformer.py Embedding()
      learned positions               N(0, d^-1/2)                 fairseq/modules/positional_embedding.py
      q, k, v projections             xavier-uniform, gain 1/sqrt(2), biases PyTorch's default
                                                                   fairseq/modules/multihead_attention.py
      attention output                xavier-uniform, bias 0         reset_parameters
      dense FFN fc1/fc2, experts      PyTorch's nn.Linear default    transformer_layer.py, moe_layer.py
      experts' second layer weight    0                            moe_layer.py MoESublayer (ff2.weight.zero_())
      LayerNorm                       1, 0
    The StableMoE router keeps its own (reference) initialisation.
    """
    torch_default_init(model)  # PyTorch's defaults first (the layers fairseq leaves alone), then fairseq's own
    d = model.tok_emb.weight.shape[1]
    nn.init.normal_(model.tok_emb.weight, std=d**-0.5)
    if model.pos_emb is not None:
        nn.init.normal_(model.pos_emb.weight, std=d**-0.5)
    for mod in model.modules():
        if isinstance(mod, SelfAttention):
            for w in mod.qkv.weight.view(3, d, d):
                nn.init.xavier_uniform_(w, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(mod.proj.weight)
            if mod.proj.bias is not None:
                nn.init.zeros_(mod.proj.bias)
        elif isinstance(mod, Experts):
            # MoESublayer's ff1/ff2 are nn.Linear(D, F) / nn.Linear(F, D): fan_in D and F respectively
            b1, b2 = 1 / math.sqrt(mod.d_model), 1 / math.sqrt(mod.ffn_dim)
            for i, e in enumerate(mod.expert_ids):  # each expert from its own generator: EP-independent
                gen = mod.expert_generator(e)
                mod.w1[i].uniform_(-b1, b1, generator=gen)
                mod.b1[i].uniform_(-b1, b1, generator=gen)
                mod.b2[i].uniform_(-b2, b2, generator=gen)
            nn.init.zeros_(mod.w2)
