"""Every file name of a checkpoint, in one place.

<run_dir>/checkpoints/step_00000100/   one complete checkpoint:
    complete.json               written last: the metadata (CheckpointMeta); makes the directory a checkpoint
    config.yaml                 the resolved configuration, for people (the metadata holds the same values)
    state.pt                    native engine: model, optimiser, LR schedule, RNG
    mp_rank_00_model_states.pt  deepspeed engine: DeepSpeed's own model file (dense weights, rank 0's experts)
    *_optim_states.pt           ... DeepSpeed's optimiser partitions
    experts_ep000.pt            ... the experts of expert-parallel rank 0 (one file per EP rank)
    rank00000.pt                ... the RNG streams of rank 0 (one file per rank)
    portable_dense.pt           ... dense parameters (fp32 master), their optimiser state by name, the LR
                                    schedule, the buffers: with the experts files' "master"/"optimizer"
                                    entries, the layout-free state a resume at another layout reads
<run_dir>/checkpoints/latest    the name of the newest complete checkpoint
<run_dir>/checkpoints/.step_00000100.partial/   a save in progress (never read)
"""

from __future__ import annotations

LATEST = "latest"
META = "complete.json"
CONFIG = "config.yaml"
NATIVE_STATE = "state.pt"
DEEPSPEED_MODEL = "mp_rank_00_model_states.pt"  # DeepSpeed's name for the model file of model-parallel rank 0
DEEPSPEED_MARKER_PREFIX = "deepspeed_moe_marker."  # the parameter-free module that marks the model as MoE
EXPERTS_GLOB = "experts_ep*.pt"
PORTABLE_DENSE = "portable_dense.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def partial_dir_name(step: int) -> str:
    return f".{step_dir_name(step)}.partial"


def experts_file(ep_rank: int) -> str:
    return f"experts_ep{ep_rank:03d}.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"
