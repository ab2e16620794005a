"""model.output_layer chunked and adaptive under the DeepSpeed engine with expert parallelism (2 gloo
ranks, ep_size 2, ZeRO-2): the global gradient norm and the SGD update equal one process on the
global batch. The output layer is a dense parameter: its gradient is averaged over all ranks."""

import torch

from msmoe_dist.config import load_config
from msmoe_dist.data import train_batch
from msmoe_dist.models.build import build_model
from msmoe_dist.moe import is_expert_param
from msmoe_dist.parallel.runtime import Runtime
from msmoe_dist.train.trainer import build_engine

V, B, S, E = 60, 2, 8, 4
STREAM = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(0))
CASES = {
    "chunked": ["model.output_layer=chunked", "model.output_chunk_tokens=5"],  # 16 tokens: 5 does not divide
    "adaptive": [
        "model.output_layer=adaptive",
        "model.tie_embeddings=false",
        "model.adaptive_cutoffs=10,30",
        "model.adaptive_div_value=2.0",
    ],
}


def _cfg(kind):
    return load_config(
        None,
        [
            "model.num_layers=2",
            "model.d_model=16",
            "model.num_heads=2",
            "model.max_seq_len=8",
            "data.seq_len=8",
            f"data.batch_size={B}",
            f"moe.num_experts={E}",
            "moe.expert_ffn_dim=16",
            "momentum.kind=heavy_ball",
            "optim.name=sgd",
            "optim.beta1=0.0",
            "optim.lr=0.5",
            "optim.grad_clip=0.05",
            "parallel.engine=deepspeed",
            "parallel.ep_size=2",
            "parallel.zero_stage=2",
            *CASES[kind],
        ],
    )


def _model(cfg):
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V)


def _worker(rank, world):
    norms = {}
    runtime = Runtime(rank, world, rank, torch.device("cpu"))
    for kind in CASES:
        cfg = _cfg(kind)
        runtime.start_distributed(cfg.parallel)
        eng = build_engine(cfg, "deepspeed", runtime, _model(cfg))
        res = eng.train_step([train_batch(STREAM, 0, B, S, 0, rank, world)], collect_stats=False)
        ref = _model(cfg)
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        losses = [ref(*train_batch(STREAM, 0, B, S, 0, r, world)) for r in range(world)]
        (sum(o.loss + o.aux_loss for o in losses) / world).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip))
        assert abs(res.grad_norm - ref_norm) <= 1e-5 * ref_norm, (kind, res.grad_norm, ref_norm)
        mine, per = dict(eng.model.named_parameters()), E // 2
        for n, p in ref.named_parameters():
            expect = before[n] - cfg.optim.lr * p.grad
            if is_expert_param(p):
                expect = expect[rank * per : (rank + 1) * per]
            torch.testing.assert_close(mine[n].detach(), expect, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind} {n}: {m}")
        norms[kind] = res.grad_norm
    return norms


def test_chunked_and_adaptive_under_expert_parallel_deepspeed(run_distributed):
    norms = run_distributed(_worker, 2, timeout_s=240)
    assert norms[0] == norms[1]  # every rank reports the same global norm
