"""Per-rank warnings carry their rank: several ranks share one log under SLURM and torchrun."""

import warnings

from msmoe_dist.parallel.startup import prefix_warnings_with_rank


def test_warnings_are_prefixed_with_the_rank():
    before = warnings.formatwarning
    try:
        prefix_warnings_with_rank(3)
        prefix_warnings_with_rank(3)  # idempotent: one prefix
        line = warnings.formatwarning("slow path", UserWarning, "f.py", 1)
        assert line.startswith("[rank 3] ") and line.count("[rank") == 1 and "slow path" in line
    finally:
        warnings.formatwarning = before
