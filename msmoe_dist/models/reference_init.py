"""model.init=torch_default: PyTorch's default initialisers, as the MomentumSMoE reference has them.

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
            nn.init.uniform_(mod.w1, -bound, bound)
            nn.init.uniform_(mod.w2, -bound, bound)
            nn.init.zeros_(mod.b1)
            nn.init.zeros_(mod.b2)
