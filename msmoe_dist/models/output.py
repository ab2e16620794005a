"""The language model's output layer: projection to the vocabulary and the cross-entropy.

Three ways (``model.output_layer``):

- ``full``: ``logits = head(h)`` for every token, then ``F.cross_entropy``. Autograd keeps the
  [N, V] logits and their log-softmax for backward; with WikiText-103's V = 267,735 and
  N = 48 x 512 tokens that is 26 GB per fp32 copy.
- ``chunked``: the same loss, exact, computed N_c tokens at a time by :class:`ChunkedSoftmaxCE`,
  an autograd Function that keeps only the hidden states, the weight and one log-sum-exp per
  token, and recomputes each chunk's logits in backward. At most [N_c, V] logits exist at once.
  The price is one extra [N, D] x [D, V] matmul (the forward one, again in backward).
- ``adaptive``: ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017): a head over the
  frequent words plus clusters and smaller tail projections for the rare ones. A different
  model (its own parameters), not an implementation of the same one.

Legend: N tokens (B*S), D model dim, V vocabulary, C tokens in a chunk.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msmoe_dist.config.output_layer import check_cutoffs


def build_head(
    kind: str, d_model: int, vocab_size: int, cutoffs: str, div_value: float, bias: bool = False
) -> nn.Module:
    """nn.Linear(D, V) for full/chunked (the same parameters, so checkpoints move between them), or
    the adaptive softmax module. ``bias`` (model.output_bias): a [V] bias, as the MomentumSMoE reference's
    out_emb; the adaptive softmax has it on its head cluster."""
    if kind == "adaptive":
        return nn.AdaptiveLogSoftmaxWithLoss(
            d_model, vocab_size, check_cutoffs(cutoffs, vocab_size), div_value=div_value, head_bias=bias
        )
    return nn.Linear(d_model, vocab_size, bias=bias)


def _compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype ``head(h)`` would run its matmul in: the autocast dtype inside autocast, else h's."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


class ChunkedSoftmaxCE(torch.autograd.Function):
    """Sum over tokens of -log softmax(h_ND @ w_VD^T)[target], C tokens at a time.

    Saved for backward: h_ND, w_VD (both already alive as activations/parameters) and lse_N, the
    log-sum-exp per token (N floats). Backward recomputes a chunk's logits, turns them in place
    into softmax - onehot(target), and multiplies out: d h_CD = g_CV w_VD, d w_VD += g_CV^T h_CD.
    Matmuls run in ``dtype`` (bf16 under autocast, as ``head(h)`` would); the softmax and the
    weight-gradient accumulation in fp32.
    """

    @staticmethod
    def forward(ctx, h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
        N = h_ND.shape[0]
        lse_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        with torch.autocast(h_ND.device.type, enabled=False):
            w = w_VD.to(dtype)
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                logits_CV = (h_ND[s:e].to(dtype) @ w.t()).float()
                lse_C = torch.logsumexp(logits_CV, dim=-1)
                target_C = logits_CV.gather(1, targets_N[s:e, None]).squeeze(1)
                total += (lse_C - target_C).sum()
                lse_N[s:e] = lse_C
                del logits_CV
        ctx.save_for_backward(h_ND, w_VD, targets_N, lse_N)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        h_ND, w_VD, targets_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, dtype, chunk = h_ND.shape[0], ctx.dtype, ctx.chunk
        grad_h = torch.empty(h_ND.shape, dtype=dtype, device=h_ND.device) if need_h else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        scale = grad_total.float()
        with torch.autocast(h_ND.device.type, enabled=False):
            w = w_VD.to(dtype)
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                h_CD = h_ND[s:e].to(dtype)
                g_CV = (h_CD @ w.t()).float()
                g_CV.sub_(lse_N[s:e, None]).exp_()  # softmax, in place
                g_CV[torch.arange(e - s, device=g_CV.device), targets_N[s:e]] -= 1.0
                g_CV.mul_(scale)
                g_CV = g_CV.to(dtype)  # no copy in fp32
                if need_h:
                    grad_h[s:e] = g_CV @ w
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(g_CV.t(), h_CD)  # accumulates without a [V, D] temporary
                elif need_w:
                    grad_w += (g_CV.t() @ h_CD).float()
                del g_CV
        return (
            None if grad_h is None else grad_h.to(h_ND.dtype),
            None if grad_w is None else grad_w.to(w_VD.dtype),
            None,
            None,
            None,
        )


def chunked_cross_entropy(h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, chunk: int, reduction: str = "mean") -> Tensor:
    """F.cross_entropy(h_ND @ w_VD.T, targets_N) without ever holding more than chunk x V logits."""
    total = ChunkedSoftmaxCE.apply(h_ND, w_VD, targets_N, chunk, _compute_dtype(h_ND))
    return _reduce(total, targets_N.numel(), reduction)


def _reduce(total: Tensor, count: int, reduction: str) -> Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


@contextlib.contextmanager
def _adaptive_precision(h_ND: Tensor):
    """AdaptiveLogSoftmaxWithLoss under autocast mixes dtypes (its output buffer takes the input's
    dtype, the cluster log-softmax the autocast one) and fails; it runs in fp32 instead, outside
    autocast. Its matmuls are small next to a full [V, D] head, so this costs little."""
    if not torch.is_autocast_enabled(h_ND.device.type):
        yield h_ND
        return
    with torch.autocast(h_ND.device.type, enabled=False):
        yield h_ND.float()


def output_loss(kind: str, head: nn.Module, h_ND: Tensor, targets_N: Tensor, chunk: int, reduction: str) -> Tensor:
    """Token cross-entropy (fp32), mean or sum over the N tokens."""
    if kind == "chunked":
        if head.bias is not None:
            # h w^T + b = [h, 1] [w, b]^T: the same exact chunked loss; autograd splits the gradient back.
            h_ND = torch.cat([h_ND, h_ND.new_ones(h_ND.shape[0], 1)], dim=1)
            return chunked_cross_entropy(
                h_ND, torch.cat([head.weight, head.bias[:, None]], dim=1), targets_N, chunk, reduction
            )
        return chunked_cross_entropy(h_ND, head.weight, targets_N, chunk, reduction)
    if kind == "adaptive":
        with _adaptive_precision(h_ND) as h:
            logp_N = head(h, targets_N).output  # log-probability of each target
        return _reduce(-logp_N.float().sum(), targets_N.numel(), reduction)
    return F.cross_entropy(head(h_ND).float(), targets_N, reduction=reduction)


def output_logits(kind: str, head: nn.Module, h_ND: Tensor) -> Tensor:
    """[N, V] scores whose softmax is the model's distribution: logits, or log-probabilities for adaptive
    (which has no single logit matrix). Materialises N x V values; only when asked for."""
    if kind == "adaptive":
        with _adaptive_precision(h_ND) as h:
            return head.log_prob(h)
    return head(h_ND)
