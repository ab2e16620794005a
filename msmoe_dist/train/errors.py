"""Errors of a training run."""

from __future__ import annotations

from msmoe_dist.errors import UserError


class TrainError(UserError):
    """A user-facing problem with the run (one line); the CLI exits with code 2."""


class NonFiniteLoss(RuntimeError):
    """Training hit a NaN/Inf loss; the CLI exits with code 3."""
