"""What DeepSpeed's engine adds to a training step, counted the way the planner counts a model (census._OpCounter).

    torchrun --nproc_per_node N -m msmoe_dist.bench.deepspeed_work --config FILE --zero-stage S [key=value ...]

Each rank builds the run's model and DeepSpeed engine (train/trainer.py: parallel.ep_size = N, synthetic data
of the config's shape), takes two steps, then counts the aten calls and bytes (views and allocations excepted)
of one ``engine.train_step``, of the same micro-batches' plain forward + backward, and of a torch AdamW step with
clipping over one flat tensor the size of the rank's optimiser partition. The step minus the other two is
DeepSpeed's own work: copying gradients into its reduce bucket, averaging them, flattening the partition,
clipping, copying the fp32 master back into the weights, and its hooks. Rank 0 prints it per parameter this
rank holds and per parameter tensor. plan/step_time.DEEPSPEED_STEP_WORK holds the figures this gave.

It also reports what the engine holds, exactly (unique storages): after the step ``param_bytes`` (the weights;
under ZeRO 1/2 views of DeepSpeed's flat buffers) and ``optimizer_bytes`` (the inner optimiser's state plus
ZeRO's fp32 master partitions); after one more backward ``grad_bytes`` (ZeRO 0: every ``.grad``; ZeRO 1/2 the
partition's gradients it keeps), which plan/memory.model_state_bytes predicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

from msmoe_dist.errors import UserError


def count_step_work(config: str, zero_stage: int, overrides: list[str], run_dir: str) -> dict:
    """Counts on this rank (torch.distributed already started, or a world of one started here)."""
    import torch

    from msmoe_dist.config import load_config
    from msmoe_dist.moe import is_expert_param
    from msmoe_dist.parallel.runtime import Runtime
    from msmoe_dist.plan.census import _OpCounter
    from msmoe_dist.train.ds_engine import DeepSpeedEngine
    from msmoe_dist.train.engine import objective
    from msmoe_dist.train.tasks import make_task
    from msmoe_dist.train.trainer import build_engine, build_initial_model, local_expert_ids

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(
        config,
        [
            "data.kind=synthetic",
            f"data.path={run_dir}/synthetic",
            "data.synthetic_lines=2000",
            *overrides,
            f"train.run_dir={run_dir}/run",
            f"parallel.zero_stage={zero_stage}",
            f"parallel.ep_size={world}",
            "parallel.engine=deepspeed",
        ],
    )
    rt = Runtime.from_env("cpu")
    rt.start_distributed(cfg.parallel)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    task = make_task(cfg)
    task.load_data()
    task.start(0, rt.rank, world)
    micro, _ = task.micro_batches(0)
    engine = build_engine(cfg, "deepspeed", rt, build_initial_model(cfg, task, local_expert_ids(cfg, "deepspeed", rt)))
    assert isinstance(engine, DeepSpeedEngine)
    for _ in range(2):  # the first step allocates the optimiser state
        engine.train_step(micro, False)

    def count(fn) -> tuple[int, int]:
        counter = _OpCounter()
        with counter:
            fn()
        return sum(v for k, v in counter.work.items() if k.endswith(".bytes")), counter.calls

    def forward_backward():
        for x, y in micro:
            objective(module(x, y)).backward()

    module = engine.engine.module
    zero = engine.engine.optimizer
    step = count(lambda: engine.train_step(micro, False))
    # The gradients it keeps after a backward (ZeRO 1/2: its partition's, in averaged_gradients; ZeRO 0: .grad),
    # then the step finished.
    for x, y in micro[:1]:
        engine.engine.backward(objective(engine.engine(x, y)))
    kept = [p.grad for p in module.parameters() if p.grad is not None]
    for grads in (getattr(zero, "averaged_gradients", None) or {}).values():
        kept += list(grads or [])
    grad_bytes = _storage_bytes(kept)
    engine.engine.step()
    # The plain forward + backward without DeepSpeed's gradient hooks (ZeRO 1/2 reduce from them): the engine is
    # not used after this.
    for hook in getattr(zero, "_grad_acc_hooks", []):
        hook.remove()
    fwd_bwd = count(forward_backward)
    params = [p for p in module.parameters() if p.requires_grad]
    dense = sum(p.numel() for p in params if not is_expert_param(p))
    expert = sum(p.numel() for p in params if is_expert_param(p))
    # ZeRO partitions dense parameters over the data-parallel world and experts over their EDP group (EP = world).
    held = dense // world + expert if zero_stage else dense + expert
    flat = torch.zeros(held, requires_grad=True)
    flat.grad = torch.ones(held)
    opt = torch.optim.AdamW([flat], lr=1e-3)

    def adam():
        torch.nn.utils.clip_grad_norm_([flat], 1.0)
        opt.step()

    adam()
    adam_work = count(adam)
    inner = getattr(zero, "optimizer", zero)
    state = [t for st in inner.state.values() for t in st.values()]
    extra_bytes = step[0] - fwd_bwd[0] - adam_work[0]
    extra_calls = step[1] - fwd_bwd[1] - adam_work[1]
    return {
        "zero_stage": zero_stage,
        "world_size": world,
        "params": dense + expert,
        "held": held,
        "tensors": len(params),
        "extra_bytes": extra_bytes,
        "extra_calls": extra_calls,
        "bytes_per_param": extra_bytes / (dense + expert),
        "calls_per_tensor": extra_calls / len(params),
        "param_bytes": _storage_bytes(params),
        "optimizer_bytes": _storage_bytes(state + list(getattr(zero, "single_partition_of_fp32_groups", []))),
        "grad_bytes": grad_bytes,
    }


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (views of one flat buffer count once)."""
    import torch

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    return sum(storages.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m msmoe_dist.bench.deepspeed_work",
        description="Count DeepSpeed's own per-step work (bytes, calls) beyond forward + backward and Adam.",
    )
    p.add_argument("--config", required=True, help="model/training config (YAML)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=1)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = count_step_work(args.config, args.zero_stage, args.overrides, tmp)
    except UserError as exc:  # a bad config or override: one line, exit 2
        print(f"deepspeed_work: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
