"""Evaluation: language-model perplexity (also under the word attack) and image classification with the
robustness benchmarks (ImageNet-A/-R/-C), through an Evaluator (a training engine or a plain model)."""

from msmoe_dist.eval.evaluator import Evaluator, LocalEvaluator, autocast_ctx
from msmoe_dist.eval.lm import evaluate_lm, evaluate_tokens

__all__ = ["Evaluator", "LocalEvaluator", "autocast_ctx", "evaluate_lm", "evaluate_tokens"]
