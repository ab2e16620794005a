"""Shared experts (DeepSeekMoE, arXiv 2401.06066): dense FFN experts that every token goes through.

Legend: T tokens, D model dim, N shared experts, F their inner size (moe.shared_expert_ffn_dim).

The MoE layer adds their output to the routed output, so the momentum update that follows (outside the
layer) sees u_t = routed + shared. N experts of width F are held as ONE FFN of width N*F: with
W1 = [W1_1; ...; W1_N], b1 = [b1_1; ...; b1_N], W2 = [W2_1 ... W2_N],

    sum_i (W2_i act(W1_i x + b1_i) + b2_i) = W2 act(W1 x + b1) + b2,   b2 = sum_i b2_i,

the same function class in one pair of GEMMs. Their parameters are dense (replicated, gradients
averaged over all data-parallel ranks like attention's); under expert parallelism they run on the
tokens' home rank, between dispatch and combine, where nothing waits on them: a dispatcher whose
all-to-all is asynchronous overlaps them with the token exchange.
"""

from __future__ import annotations

from torch import Tensor, nn

from msmoe_dist.moe.experts import ACTIVATIONS


class SharedExperts(nn.Module):
    def __init__(self, d_model: int, num_shared: int, ffn_dim: int, activation: str, init_std: float = 0.02):
        super().__init__()
        if num_shared < 1 or ffn_dim < 1:
            raise ValueError(f"shared experts need num_shared >= 1 and ffn_dim >= 1, got {num_shared}, {ffn_dim}")
        self.num_shared, self.ffn_dim = num_shared, ffn_dim
        self.fc1 = nn.Linear(d_model, num_shared * ffn_dim)
        self.fc2 = nn.Linear(num_shared * ffn_dim, d_model)
        self.act = ACTIVATIONS[activation]
        for lin in (self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x_TD)))
