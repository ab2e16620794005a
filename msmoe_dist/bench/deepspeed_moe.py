"""The comparison layers of `msmoe-bench layer`: DeepSpeed's own MoE layer at the benchmark's shapes, and
fairscale's MOELayer when the optional ``[bench]`` extra is installed.

deepspeed.moe.layer.MoE with a top-2 GShard gate, capacity factor 1.25 with token dropping, min
capacity 4, Linear-ReLU-Linear experts, no residual. It needs torch.distributed and DeepSpeed's comm
layer started (msmoe-bench's CLI does that, also for one process); it builds its own expert groups.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DS_CAPACITY_FACTOR = 1.25
DS_MIN_CAPACITY = 4


def build_deepspeed_moe(
    d_model: int, ffn: int, num_experts: int, top_k: int, ep_size: int, device: torch.device
) -> nn.Module:
    """DeepSpeed's MoE layer with the settings of the comparison; its expert groups are created here
    (all ranks must call this, in the same order)."""
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Linear(ffn, d_model))
    moe = MoE(
        hidden_size=d_model,
        expert=expert,
        num_experts=num_experts,
        ep_size=ep_size,
        k=top_k,
        capacity_factor=DS_CAPACITY_FACTOR,
        eval_capacity_factor=DS_CAPACITY_FACTOR,
        min_capacity=DS_MIN_CAPACITY,
        drop_tokens=True,
        use_residual=False,
    )
    moe.set_deepspeed_parallelism()  # what deepspeed.initialize would do: expert + expert-data groups
    return moe.to(device).train()


def deepspeed_capacity(tokens: int, num_experts: int, top_k: int) -> int:
    """Rows per (rank, expert) slot DeepSpeed's top-k gate computes on (its _capacity, min 4)."""
    return max(DS_MIN_CAPACITY, math.ceil(tokens / num_experts * DS_CAPACITY_FACTOR * top_k))


def deepspeed_settings(tokens: int, num_experts: int, top_k: int, ep_size: int) -> dict:
    """The comparison's settings as the result reports them."""
    return {
        "capacity_factor": DS_CAPACITY_FACTOR,
        "k": top_k,
        "drop_tokens": True,
        "min_capacity": DS_MIN_CAPACITY,
        "ep_size": ep_size,
    }


def fairscale_capacity(tokens: int, num_experts: int) -> int:
    """Rows per (rank, expert) slot of fairscale's Top2Gate: 2 * tokens // experts (capacity factor 1, no minimum)."""
    return 2 * tokens // num_experts


def build_fairscale_moe(d_model: int, ffn: int, num_experts: int, top_k: int, ep_size: int, group, device):
    """fairscale's MOELayer (GShard's einsum dispatch) with its Top2Gate and this rank's ``num_experts / ep_size``
    Linear-ReLU-Linear experts, exchanging over ``group`` (None: the world). Needs the optional ``[bench]`` extra."""
    from fairscale.nn import MOELayer, Top2Gate

    if top_k != 2:
        raise ValueError(f"fairscale's Top2Gate routes every token to 2 experts, not top_k={top_k}")
    local = nn.ModuleList(
        [
            nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Linear(ffn, d_model))
            for _ in range(num_experts // ep_size)
        ]
    )
    return MOELayer(Top2Gate(d_model, num_experts), local, group).to(device).train()


def fairscale_note() -> str | None:
    """Why fairscale's MOELayer cannot be measured here, or None when it can."""
    try:
        import fairscale.nn  # noqa: F401
    except ImportError:
        return "not installed (pip install 'msmoe_dist[bench]' or pip install fairscale --no-deps)"
    except Exception as exc:  # an import that breaks on this torch says so
        return "unusable: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return None
