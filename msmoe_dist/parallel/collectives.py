"""Kept for the imports that name it: the named collectives live in `msmoe_dist.parallel.comm`."""

from msmoe_dist.parallel.comm import CollectiveError, named_collective

__all__ = ["CollectiveError", "named_collective"]
