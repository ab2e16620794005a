"""Evaluation: perplexity of language models."""

from msmoe_dist.eval.evaluate import autocast_ctx, evaluate_lm  # noqa: F401
