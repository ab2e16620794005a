"""Activation checkpointing under expert parallelism (2 gloo ranks, EP 2) and through the DeepSpeed engine.

Per rank, for every momentum kind, with dropout 0.1: the local-only model with `block` and with
`selective` gives the gradients (and loss) of the same model with `none`. `block` recomputes each MoE
layer in the backward, so every rank repeats the all-to-alls in the same order (each token all-to-all
runs twice per layer); `selective` never repeats one. Then one DeepSpeed step (ZeRO-1, EP 2) with
`block` moves every parameter as the step with `none` does.
"""

import torch

from msmoe_dist.config.loader import load_config
from msmoe_dist.data import train_batch
from msmoe_dist.models.build import build_model
from msmoe_dist.parallel import CommStats, ParallelLayout, apply_expert_parallel, build_process_groups
from msmoe_dist.parallel.all_to_all import TOKENS_FORWARD
from msmoe_dist.parallel.runtime import Runtime
from msmoe_dist.train.trainer import build_engine, local_expert_ids

V, B, S = 40, 2, 8
TOL = dict(rtol=1e-5, atol=1e-6)
BASE = [
    "model.num_layers=2",
    "model.d_model=16",
    "model.num_heads=2",
    "model.max_seq_len=8",
    "data.seq_len=8",
    f"data.batch_size={B}",
    "model.dropout=0.1",
    "moe.num_experts=4",
    "moe.expert_ffn_dim=24",
]
KINDS = {
    "none": ["momentum.kind=none"],
    "heavy_ball": ["momentum.kind=heavy_ball"],
    "adam": ["momentum.kind=adam", "momentum.adam_layers=1"],
    "robust": ["momentum.kind=robust"],
}


def _run(cfg, pg, mode, seq):
    local = pg.layout.local_experts(pg.rank, cfg.moe.num_experts)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V, local)
    model.set_activation_checkpointing(mode)
    comm = CommStats()
    apply_expert_parallel(model, pg, comm)
    model.train()
    torch.manual_seed(10 + pg.rank)  # this rank's dropout masks
    out = model(seq[:, :-1], seq[:, 1:])
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, comm[TOKENS_FORWARD].calls


def _worker(rank, world):
    pg = build_process_groups(ParallelLayout(world, 2), rank)
    seq = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(50 + rank))
    for kind, extra in KINDS.items():
        cfg = load_config(None, BASE + extra)
        loss, ref, calls = _run(cfg, pg, "none", seq)
        assert calls == 4  # two token all-to-alls (dispatch, combine) per MoE layer
        for mode, want_calls in (("block", 8), ("selective", 4)):
            got_loss, got, got_calls = _run(cfg, pg, mode, seq)
            assert got_calls == want_calls, (kind, mode, got_calls)
            assert torch.equal(got_loss, loss), (kind, mode)
            assert got.keys() == ref.keys()
            for n, g in got.items():
                torch.testing.assert_close(g, ref[n], **TOL, msg=lambda m, n=n: f"{kind} {mode} {n}: {m}")

    # The DeepSpeed engine: one optimiser step with block equals the step without.
    runtime = Runtime(rank, world, rank, torch.device("cpu"))
    stream = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(0))
    after = {}
    for mode in ("none", "block"):
        cfg = load_config(
            None,
            BASE
            + KINDS["heavy_ball"]
            + [
                "parallel.engine=deepspeed",
                "parallel.ep_size=2",
                "parallel.zero_stage=1",
                "optim.name=sgd",
                "optim.lr=0.5",
                f"train.activation_checkpointing={mode}",
            ],
        )
        runtime.start_distributed(cfg.parallel)
        torch.manual_seed(cfg.train.seed)
        model = build_model(
            cfg.model, cfg.moe, cfg.momentum, cfg.vision, V, local_expert_ids(cfg, "deepspeed", runtime)
        )
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        engine = build_engine(cfg, "deepspeed", runtime, model)
        engine.set_step(0)
        torch.manual_seed(7 + rank)
        engine.train_step([train_batch(stream, 0, B, S, 0, rank, world)], collect_stats=False)
        after[mode] = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    assert after["block"].keys() == after["none"].keys()
    for n, p in after["block"].items():
        torch.testing.assert_close(p, after["none"][n], **TOL, msg=lambda m, n=n: f"deepspeed {n}: {m}")
    return rank


def test_checkpointing_under_expert_parallelism_and_deepspeed(run_distributed):
    assert run_distributed(_worker, 2, timeout_s=400) == [0, 1]
