"""Model FLOPs utilisation (MFU): the model's FLOPs per second over the GPU's peak.

Model FLOPs of one training step per token, PaLM's convention (Chowdhery et al. 2022, appendix B):

    6 * N_active  +  12 * layers * d_model * seq_len

- ``6 * N_active``: forward (2) and backward (4) FLOPs of every weight a token passes through.
  N_active counts the dense weights and, of each MoE layer's expert weights, the share a token
  uses (top_k / num_experts of them). Embedding tables are looked up, not multiplied, so they are
  left out unless the same matrix is also the output layer (tied embeddings).
- ``12 * layers * d_model * seq_len``: the attention scores and their weighted sum (QK^T and AV,
  2 GEMMs of 2 * seq_len * d_model FLOPs per token each, times 3 for forward + backward). Like
  PaLM, the causal mask's halving is not taken into account.

Recomputation, the router and element-wise work are not model FLOPs (they are hardware FLOPs).
The peak is the GPU's published dense (not 2:4 sparse) bf16 tensor-core figure; pass your own with
``--peak-tflops`` for another GPU or precision.
"""

from __future__ import annotations

import torch
from torch import nn

from msmoe_dist.moe import is_expert_param

# Published dense bf16 tensor-core peaks, TFLOP/s (NVIDIA data sheets; the sparse figures are twice these).
# Matched in this order against torch.cuda.get_device_name(): the first key found in the name wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),  # H200 SXM
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # H100 SXM (HBM3)
    ("A100", 312.0),
)


class PeakUnknown(ValueError):
    """The device is not in PEAK_BF16_TFLOPS and no --peak-tflops was given."""


def lookup_peak_tflops(device_name: str) -> float:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    known = ", ".join(k for k, _ in PEAK_BF16_TFLOPS)
    raise PeakUnknown(f"no published bf16 peak for {device_name!r} (known: {known}); pass --peak-tflops")


def peak_tflops(device: torch.device | str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from); (None, why) when there is none (the CPU, an unknown GPU)."""
    if override is not None:
        return float(override), "--peak-tflops"
    device = torch.device(device)
    if device.type != "cuda":
        return None, "no peak for the CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    try:
        return lookup_peak_tflops(name), f"published dense bf16 peak of {name}"
    except PeakUnknown as exc:
        return None, str(exc)


def _unique_params(model: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for p in model.parameters()}


def active_params(model: nn.Module, top_k: int, num_experts: int, *, tied_output: bool = False) -> dict[str, float]:
    """Parameter counts of ``model`` (each shared tensor once): dense (non-expert, embedding tables
    excluded), expert, embedding, and ``active`` = dense + expert * top_k / num_experts (+ the
    embedding matrix when it is also the output layer, ``tied_output``).

    ``num_experts`` is the total number of experts of a layer; on an expert-parallel rank the model
    holds only its share, and the ratio uses the local count of expert parameters as they are
    (every token still passes through top_k experts' worth of weights, wherever they live)."""
    params = _unique_params(model)
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    expert = sum(p.numel() for p in params.values() if is_expert_param(p))
    embedding = sum(p.numel() for i, p in params.items() if i in emb_ids)
    dense = sum(p.numel() for i, p in params.items() if i not in emb_ids and not is_expert_param(p))
    if num_experts <= 0 or not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    active = dense + expert * top_k / num_experts
    tied = 0
    if tied_output:
        out = getattr(model, "tok_emb", None)
        tied = out.weight.numel() if isinstance(out, nn.Embedding) else 0
        active += tied
    return {
        "total": float(sum(p.numel() for p in params.values())),
        "dense": float(dense),
        "expert": float(expert),
        "embedding": float(embedding),
        "tied_output": float(tied),
        "active": float(active),
    }


def flops_per_token(n_active: float, layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N_active + 12 layers d_model seq_len (see the module docstring)."""
    return 6.0 * n_active + 12.0 * layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, peak_tflops_: float) -> float:
    """Achieved model FLOP/s over the peak (a fraction, 0..1)."""
    if peak_tflops_ <= 0:
        raise ValueError(f"peak TFLOP/s must be positive, got {peak_tflops_}")
    return tokens_per_s * flops_per_tok / (peak_tflops_ * 1e12)


def mfu_report(
    model: nn.Module,
    *,
    top_k: int,
    num_experts: int,
    layers: int,
    d_model: int,
    seq_len: int,
    tokens_per_s: float,
    device: torch.device | str,
    peak_override: float | None = None,
    tied_output: bool = False,
) -> dict:
    """The MFU figures a benchmark prints: N_active, FLOPs per token, achieved TFLOP/s, peak, MFU."""
    counts = active_params(model, top_k, num_experts, tied_output=tied_output)
    fpt = flops_per_token(counts["active"], layers, d_model, seq_len)
    peak, source = peak_tflops(device, peak_override)
    out: dict = {
        "params": counts,
        "flops_per_token": fpt,
        "model_tflops_per_s": tokens_per_s * fpt / 1e12,
        "peak_tflops": peak,
        "peak_source": source,
        "mfu": None if peak is None else mfu(tokens_per_s, fpt, peak),
        "formula": "6*N_active + 12*layers*d_model*seq_len FLOPs per token (PaLM); N_active = dense "
        "(no embedding tables) + expert*top_k/num_experts",
    }
    return out
