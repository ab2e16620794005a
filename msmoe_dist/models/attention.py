"""Multi-head self-attention (causal for the LM, bidirectional for ViT) with learned-absolute or rotary positions.

Legend: B batch, S sequence, D model dim, H heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary_tables(seq_len: int, head_dim: int, device, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables [S, Dh/2] of rotary position embedding (RoFormer)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles_SF = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_SF.cos(), angles_SF.sin()


def apply_rotary(x_BHSDh: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x_BHSDh[..., 0::2], x_BHSDh[..., 1::2]
    cos, sin = cos.to(x_BHSDh.dtype), sin.to(x_BHSDh.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class SelfAttention(nn.Module):
    """causal=True: each position attends to itself and earlier ones (the LM); False: to all (ViT)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, rotary: bool, causal: bool, bias: bool = True):
        super().__init__()
        self.causal = causal
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.rotary = rotary

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            cos, sin = rotary_tables(S, self.head_dim, x_BSD.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        y_BHSDh = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        return self.proj(y_BHSDh.transpose(1, 2).reshape(B, S, D))
