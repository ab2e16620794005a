"""Every range and cross-field check of the configuration, in one function.

:func:`validate` raises a one-line :class:`~msmoe_dist.config.errors.ConfigError` for the first
problem it finds, naming the key(s), where their values came from (when ``sources`` is given),
what was expected and what was got.  Checks that depend on the machine (is CUDA there, does
``parallel.ep_size`` divide the world size) are runtime checks and do not belong here.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from msmoe_dist.config.errors import COMMAND_LINE, DEFAULT_SOURCE, ConfigError, key_error, show
from msmoe_dist.config.fields import all_keys, check_value
from msmoe_dist.config.moe_placement import lm_moe_blocks, vit_moe_blocks
from msmoe_dist.config.output_layer import parse_cutoffs
from msmoe_dist.config.schema import Config, MomentumConfig

_DEFAULTS = {"momentum.mu": MomentumConfig().mu, "momentum.gamma": MomentumConfig().gamma}

__all__ = ["validate", "ConfigError"]


def _moe_layers_of(cfg: Config) -> tuple[int, list[str]]:
    """How many MoE layers the configured model has, and the keys that decide it."""
    m, v = cfg.model, cfg.vision
    if m.kind == "vit":
        return len(vit_moe_blocks(m.num_layers, v.moe_layout, v.moe_every, v.moe_last)), [
            "model.num_layers",
            "vision.moe_layout",
            "vision.moe_every" if v.moe_layout == "every" else "vision.moe_last",
        ]
    return len(lm_moe_blocks(m.num_layers, m.layout)), ["model.num_layers", "model.layout"]


MAX_OVERLAP_CHUNKS = 64  # each chunk is two all-to-alls more per layer and step; far past any gain


def _check_overlap_chunks(cfg: Config, fail: Any) -> None:
    """moe.overlap_chunks: an integer in [1, 64]; for a language model at most the rows a rank sends one EP peer
    on average per micro-batch (more chunks would be empty on average, each still a collective); > 1 with
    parallel.ep_size=1 has no all-to-all to overlap, so it is accepted with a warning (a file shared by runs at
    several EP degrees)."""
    n, ep = cfg.moe.overlap_chunks, cfg.parallel.ep_size
    if type(n) is not int or not 1 <= n <= MAX_OVERLAP_CHUNKS:
        fail("moe.overlap_chunks", f"expected an integer in [1, {MAX_OVERLAP_CHUNKS}] (1 = no overlap), got {show(n)}")
    if n == 1:
        return
    if ep == 1:
        warnings.warn(
            f"moe.overlap_chunks={n} has no effect with parallel.ep_size=1: without expert parallelism there is "
            "no all-to-all to overlap with the expert computation",
            stacklevel=3,
        )
        return
    if cfg.model.kind == "vit":
        return
    rows = cfg.data.batch_size * cfg.data.seq_len * cfg.moe.top_k // ep
    if n > rows:
        fail(
            ["moe.overlap_chunks", "data.batch_size", "data.seq_len", "moe.top_k", "parallel.ep_size"],
            f"moe.overlap_chunks={n} is more chunks than the {rows} rows a rank sends each EP peer on average "
            "(batch_size * seq_len * top_k / ep_size): most chunks would be empty and still cost a collective",
        )


LM_DATA = ("synthetic", "text", "prepared")
IMAGE_DATA = ("synthetic_images", "imagenet")


def validate(cfg: Config, sources: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError unless every value of ``cfg`` is in range and consistent with the others.

    ``sources`` maps ``section.key`` to where the value came from (a file path, ``command line``
    or ``default``); messages name it when given.
    """

    def get(key: str) -> Any:
        section, leaf = key.split(".")
        return getattr(getattr(cfg, section), leaf)

    def fail(keys: str | list[str], detail: str) -> None:
        raise key_error(keys, detail, sources)

    def kind_word(key: str) -> str:
        return "integer" if type(get(key)) is int else "number"

    # Types and choices first, so that the comparisons below are meaningful even for a Config
    # built in code rather than by the loader.
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a Config, got {type(cfg).__name__}")
    for key in all_keys():
        section, leaf = key.split(".")
        check_value(section, leaf, get(key), sources)

    # Range helpers; written as "not (ok)" so that NaN fails too.
    def positive(key: str) -> None:
        if not get(key) > 0:
            fail(key, f"expected a positive {kind_word(key)}, got {show(get(key))}")

    def non_negative(key: str, note: str = "") -> None:
        if not get(key) >= 0:
            fail(key, f"expected a non-negative {kind_word(key)}{note}, got {show(get(key))}")

    def at_least(key: str, low: int) -> None:
        if not get(key) >= low:
            fail(key, f"expected an integer >= {low}, got {show(get(key))}")

    def in_range(key: str, low: float, high: float, low_closed: bool = True, high_closed: bool = False) -> None:
        v = get(key)
        ok = (v >= low if low_closed else v > low) and (v <= high if high_closed else v < high)
        if not ok:
            interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
            fail(key, f"expected a value in {interval}, got {show(v)}")

    def non_empty(key: str) -> None:
        if not get(key).strip():
            fail(key, f"expected a non-empty string, got {show(get(key))}")

    # ---- model
    for key in ("model.num_layers", "model.d_model", "model.num_heads", "model.ffn_dim", "model.max_seq_len"):
        positive(key)
    non_negative("model.vocab_size", " (0 = take it from the data)")
    d_model, heads = get("model.d_model"), get("model.num_heads")
    if d_model % heads != 0:
        fail(
            ["model.d_model", "model.num_heads"],
            f"model.d_model={d_model} must be divisible by model.num_heads={heads}",
        )
    if get("model.position") == "rotary" and (d_model // heads) % 2 != 0:
        fail(
            ["model.position", "model.d_model", "model.num_heads"],
            f"model.position=rotary needs an even head dimension, got model.d_model/model.num_heads = "
            f"{d_model}/{heads} = {d_model // heads}",
        )
    in_range("model.dropout", 0, 1)
    positive("model.init_std")
    positive("model.output_chunk_tokens")
    positive("model.adaptive_div_value")
    try:
        cutoffs = parse_cutoffs(get("model.adaptive_cutoffs"))
    except ValueError as exc:
        fail("model.adaptive_cutoffs", str(exc))
    vocab = get("model.vocab_size")
    if get("model.output_layer") == "adaptive":
        if get("model.tie_embeddings"):
            fail(
                ["model.output_layer", "model.tie_embeddings"],
                "model.output_layer=adaptive has no [vocab, d_model] output matrix to share with the token "
                "embedding: expected model.tie_embeddings=false (or model.output_layer=chunked)",
            )
        if vocab and cutoffs[-1] >= vocab:
            fail(
                ["model.adaptive_cutoffs", "model.vocab_size"],
                f"every cutoff must be < model.vocab_size={vocab}, got {cutoffs[-1]}",
            )
        if d_model // get("model.adaptive_div_value") ** len(cutoffs) < 1:
            fail(
                ["model.adaptive_div_value", "model.d_model", "model.adaptive_cutoffs"],
                f"the last tail cluster would project to d_model // div_value**{len(cutoffs)} = 0 dims "
                f"(model.d_model={d_model}); expected a smaller model.adaptive_div_value or fewer cutoffs",
            )

    # ---- moe
    at_least("moe.num_experts", 1)
    top_k, experts = get("moe.top_k"), get("moe.num_experts")
    if top_k < 1:
        fail("moe.top_k", f"expected an integer >= 1, got {show(top_k)}")
    if top_k > experts:
        fail(["moe.top_k", "moe.num_experts"], f"moe.top_k={top_k} must be <= moe.num_experts={experts}")
    positive("moe.expert_ffn_dim")
    non_negative("moe.capacity_factor", " (0 = dropless)")
    positive("moe.noise_std")
    non_negative("moe.balance_loss_coef")
    non_negative("moe.z_loss_coef")
    if get("moe.balance_loss") == "vmoe" and get("moe.balance_loss_coef") and not get("moe.noisy_gating"):
        fail(
            ["moe.balance_loss", "moe.noisy_gating"],
            "moe.balance_loss=vmoe needs moe.noisy_gating=true: its load "
            "loss is the probability of staying in the top-k under re-drawn gating noise",
        )
    if get("moe.renormalize") and get("moe.gate") != "softmax_topk":
        fail(
            ["moe.renormalize", "moe.gate"],
            f"moe.renormalize=true needs moe.gate=softmax_topk, got moe.gate={get('moe.gate')} "
            "(whose top-k weights already sum to 1)",
        )
    non_negative("moe.stable_balance_coef")
    positive("moe.stable_distill_coef")
    at_least("moe.stable_distill_dim", 1)
    non_negative("moe.stable_switch_step")
    if get("moe.router") == "stablemoe":
        # StableMoE routes each token to exactly one expert; top_k also sizes the capacity, so a
        # silently ignored top_k=2 would double every expert's capacity.
        if top_k != 1:
            fail(["moe.router", "moe.top_k"], f"moe.router=stablemoe routes top-1: expected moe.top_k=1, got {top_k}")
        for key in ("moe.balance_loss_coef", "moe.z_loss_coef", "moe.noisy_gating"):
            if get(key):
                fail(
                    ["moe.router", key],
                    f"{key}={show(get(key))} belongs to moe.router=topk; moe.router=stablemoe "
                    "has its own balance loss (moe.stable_balance_coef): expected 0/false",
                )

    # ---- reference-exact options (docs/reference_differences.md)
    positive("model.norm_eps")
    in_range("moe.expert_dropout", 0, 1)
    in_range("moe.expert_output_dropout", 0, 1)
    style, mkind = get("model.block_style"), get("model.kind")
    if mkind == "vit":
        for key, unused in (
            ("model.init", "torch_default"),
            ("model.init", "fairseq"),
            ("model.output_bias", True),
            ("model.embed_scale", True),
        ):
            if get(key) == unused:
                fail([key, "model.kind"], f"{key}={show(unused)} is a language-model option: not with model.kind=vit")
    elif get("model.init") == "vmoe":
        fail(["model.init", "model.kind"], "model.init=vmoe is the V-MoE fork's initialisation: needs model.kind=vit")
    for key, bad in (("model.post_mlp_norm", True), ("model.layer_insert", True), ("momentum.lookahead", "normed")):
        if get(key) == bad and style != "pre_ln":
            fail([key, "model.block_style"], f"{key}={show(bad)} needs model.block_style=pre_ln, got {style}")
    if get("model.layer_insert") and (mkind != "lm" or get("model.layout") != "middle"):
        fail(
            ["model.layer_insert", "model.layout"],
            "model.layer_insert=true inserts the one MoE layer of model.layout=middle (language model): "
            f"got model.layout={get('model.layout')}",
        )
    if get("moe.gate_bias") and get("moe.router") != "topk":
        fail(["moe.gate_bias", "moe.router"], "moe.gate_bias=true is a moe.router=topk option (the linear gate)")
    if get("moe.stable_router_input") != "normed" and get("moe.router") != "stablemoe":
        fail(
            ["moe.stable_router_input", "moe.router"],
            "moe.stable_router_input=residual is a moe.router=stablemoe option: expected normed",
        )
    # ---- moe: balancing without an auxiliary loss, shared experts, expert choice, DeepSpeed semantics
    non_negative("moe.bias_update_rate")
    non_negative("moe.num_shared_experts")
    positive("moe.shared_expert_ffn_dim")
    non_negative("moe.min_capacity", " (0 = no floor)")
    router = get("moe.router")
    if get("moe.balance") == "bias" and router != "topk":
        fail(
            ["moe.balance", "moe.router"],
            f"moe.balance=bias steers the choice of moe.router=topk; moe.router={router} "
            + (
                "has its own balance loss (moe.stable_balance_coef)"
                if router == "stablemoe"
                else "gives every expert the same number of tokens by construction"
            )
            + ": expected moe.balance=loss or moe.router=topk",
        )
    if get("moe.renormalize_after_drop") and not get("moe.renormalize"):
        fail(
            ["moe.renormalize_after_drop", "moe.renormalize"],
            "moe.renormalize_after_drop=true changes when moe.renormalize rescales the gate values: expected "
            "moe.renormalize=true (with moe.gate=softmax_topk)",
        )
    if router == "topk" and top_k == 1 and (get("moe.gate") == "topk_softmax" or get("moe.renormalize")):
        what = "moe.renormalize=true" if get("moe.gate") == "softmax_topk" else "moe.gate=topk_softmax"
        fail(
            ["moe.top_k", "moe.gate", "moe.renormalize"],
            f"moe.top_k=1 with {what} gives every token the weight 1, so the router gets no gradient from "
            "the task loss: expected moe.gate=softmax_topk (with moe.renormalize=false)",
        )
    if router == "expert_choice":
        if get("moe.overlap_chunks") != 1:
            fail(
                ["moe.overlap_chunks", "moe.router"],
                "moe.router=expert_choice exchanges its rows in one blocking all-to-all (the choice spans the EP "
                f"group): expected moe.overlap_chunks=1, got {show(get('moe.overlap_chunks'))}",
            )
        if get("model.kind") != "vit":
            fail(
                ["moe.router", "model.kind"],
                "moe.router=expert_choice on the causal language model would leak future tokens (each expert "
                "picks among the whole batch, so position t's routing depends on later positions): expected "
                "model.kind=vit, or moe.router=topk",
            )
        for key in ("moe.balance_loss_coef", "moe.noisy_gating"):
            if get(key):
                fail(
                    ["moe.router", key],
                    f"{key}={show(get(key))} belongs to moe.router=topk; moe.router=expert_choice gives every "
                    "expert the same number of tokens by construction: expected 0/false",
                )

    # ---- momentum
    in_range("momentum.mu", 0, 1)
    positive("momentum.gamma")
    in_range("momentum.beta1", 0, 1)
    in_range("momentum.beta2", 0, 1)
    positive("momentum.eps")
    positive("momentum.adam_gamma")
    at_least("momentum.adam_layers", 1)
    if get("momentum.kind") == "adam":
        n_moe, decided_by = _moe_layers_of(cfg)
        if get("momentum.adam_layers") > n_moe:
            fail(
                ["momentum.adam_layers", *decided_by],
                f"momentum.adam_layers={get('momentum.adam_layers')} must be <= the number of MoE layers "
                f"({n_moe} with {', '.join(f'{k}={show(get(k))}' for k in decided_by)}) when momentum.kind=adam",
            )
    in_range("momentum.rho", 0, 1, low_closed=False)
    if get("momentum.kind") == "robust":
        # The reference calls robust momentum's parameters mu/gamma; here they are rho/kappa and
        # momentum.mu/gamma (heavy-ball's) would be silently ignored. Refused when they were meant for
        # robust momentum: given on the command line, or changed from the default in the same file that
        # sets kind=robust (or, for a config built in code, changed from the default). A file written for
        # heavy-ball whose kind is switched to robust on the command line gets a warning instead.
        for key in ("momentum.mu", "momentum.gamma"):
            if sources is None:
                given = get(key) != _DEFAULTS.get(key)
            else:
                key_src, kind_src = sources.get(key), sources.get("momentum.kind")
                changed = get(key) != _DEFAULTS.get(key)  # a saved resolved config lists every key, at its default
                given = key_src == COMMAND_LINE or (
                    changed and key_src not in (None, DEFAULT_SOURCE) and key_src == kind_src
                )
                if not given and changed and key_src not in (None, DEFAULT_SOURCE):
                    warnings.warn(
                        f"{key}={show(get(key))} from {key_src} is not read by momentum.kind=robust (from "
                        f"{kind_src}); robust momentum reads momentum.rho and momentum.kappa",
                        stacklevel=2,
                    )
            if given:
                fail(
                    ["momentum.kind", key],
                    f"{key}={show(get(key))} is not read by momentum.kind=robust, which reads momentum.rho "
                    "and momentum.kappa (the reference's mu and gamma): expected momentum.rho/kappa instead",
                )
    if not get("momentum.kappa") > 1:
        fail("momentum.kappa", f"expected a value > 1, got {show(get('momentum.kappa'))}")
    if get("momentum.learnable") != "none" and get("momentum.kind") == "none":
        fail(
            ["momentum.learnable", "momentum.kind"],
            f"momentum.learnable={get('momentum.learnable')} needs a momentum method, got momentum.kind=none "
            "(use heavy_ball, adam or robust)",
        )

    # ---- data
    positive("data.seq_len")
    if get("data.seq_len") > get("model.max_seq_len"):
        fail(
            ["data.seq_len", "model.max_seq_len"],
            f"data.seq_len={get('data.seq_len')} must be <= model.max_seq_len={get('model.max_seq_len')}",
        )
    positive("data.batch_size")
    positive("data.synthetic_lines")
    non_empty("data.path")
    at_least("data.sp_vocab_size", 3)  # <unk> and <eos> are pieces too

    # ---- model kind <-> data kind, vision
    kind, dkind = get("model.kind"), get("data.kind")
    if kind == "vit" and dkind not in IMAGE_DATA:
        fail(
            ["model.kind", "data.kind"],
            f"model.kind=vit trains on images: expected data.kind in {'/'.join(IMAGE_DATA)}, got data.kind={dkind}",
        )
    if kind == "lm" and dkind not in LM_DATA:
        fail(
            ["model.kind", "data.kind"],
            f"data.kind={dkind} holds images: expected model.kind=vit, or data.kind "
            f"in {'/'.join(LM_DATA)} for the language model",
        )
    for key in ("vision.image_size", "vision.patch_size", "vision.num_classes"):
        positive(key)
    size, patch = get("vision.image_size"), get("vision.patch_size")
    if size % patch != 0:
        fail(
            ["vision.image_size", "vision.patch_size"],
            f"vision.image_size={size} must be a multiple of vision.patch_size={patch}",
        )
    at_least("vision.moe_every", 1)
    at_least("vision.moe_last", 1)
    if kind == "vit":
        if get("logging.fluct_every"):
            fail(
                ["logging.fluct_every", "model.kind"],
                "routing fluctuation tracks validation tokens of the "
                "language model: expected logging.fluct_every=0 with model.kind=vit",
            )
        if get("model.block_style") != "pre_ln":
            fail(
                ["model.block_style", "model.kind"],
                "model.kind=vit uses pre-LN ViT blocks: expected "
                f"model.block_style=pre_ln, got {get('model.block_style')}",
            )
        if get("moe.router") == "stablemoe":
            fail(
                ["moe.router", "model.kind"],
                "moe.router=stablemoe routes by token id, which images do not have: "
                "expected moe.router=topk with model.kind=vit",
            )
        if get("vision.moe_layout") == "last" and get("vision.moe_last") > get("model.num_layers"):
            fail(
                ["vision.moe_last", "model.num_layers"],
                f"vision.moe_last={get('vision.moe_last')} must be <= model.num_layers={get('model.num_layers')}",
            )
        n_moe, decided_by = _moe_layers_of(cfg)
        if n_moe == 0:
            fail(
                decided_by,
                f"the model would have no MoE layer ({', '.join(f'{k}={show(get(k))}' for k in decided_by)}); "
                "expected vision.moe_every <= model.num_layers",
            )
    non_negative("vision.randaugment_ops")
    in_range("vision.randaugment_magnitude", 0, 30, high_closed=True)
    non_negative("vision.mixup_alpha", " (0 = off)")
    in_range("vision.eval_crop_ratio", 0, 1, low_closed=False, high_closed=True)
    non_negative("vision.num_workers")
    in_range("vision.synthetic_classes", 2, 48, high_closed=True)
    if dkind == "synthetic_images" and get("vision.synthetic_classes") > get("vision.num_classes"):
        fail(
            ["vision.synthetic_classes", "vision.num_classes"],
            f"vision.synthetic_classes="
            f"{get('vision.synthetic_classes')} must be <= vision.num_classes={get('vision.num_classes')}",
        )
    positive("vision.synthetic_train_per_class")
    positive("vision.synthetic_val_per_class")

    # ---- optim
    positive("optim.lr")
    in_range("optim.beta1", 0, 1)
    in_range("optim.beta2", 0, 1)
    positive("optim.eps")
    non_negative("optim.weight_decay")
    non_negative("optim.warmup_steps")
    in_range("optim.min_lr_ratio", 0, 1, high_closed=True)
    non_negative("optim.grad_clip", " (0 = no clipping)")

    # ---- train (train.device=cuda without a GPU is a runtime error, not a config error)
    non_empty("train.run_dir")
    positive("train.max_steps")
    non_negative("train.eval_every", " (0 = only at the end)")
    non_negative("train.eval_batches", " (0 = the whole validation stream)")
    at_least("train.grad_accum_steps", 1)

    # ---- checkpoint, logging
    non_negative("checkpoint.every_steps", " (0 = only at the end)")
    at_least("checkpoint.keep_last", 1)
    positive("logging.log_every")
    non_negative("logging.fluct_every", " (0 = off)")
    positive("logging.fluct_tokens")

    # ---- parallel
    at_least("parallel.ep_size", 1)
    if experts % get("parallel.ep_size") != 0:
        fail(
            ["moe.num_experts", "parallel.ep_size"],
            f"moe.num_experts={experts} must be divisible by parallel.ep_size={get('parallel.ep_size')}",
        )
    _check_overlap_chunks(cfg, fail)
    if get("parallel.zero_stage") not in (0, 1, 2):
        detail = f"expected 0, 1 or 2, got {show(get('parallel.zero_stage'))}"
        if get("parallel.zero_stage") == 3:
            detail = (
                "ZeRO stage 3 is refused: DeepSpeed does not support it for MoE models (it asserts, and would "
                "partition each expert over the whole data-parallel group); expected 0, 1 or 2"
            )
        fail("parallel.zero_stage", detail)
    positive("parallel.timeout_s")
    dtype, engine, stage = get("train.dtype"), get("parallel.engine"), get("parallel.zero_stage")
    if engine == "native" and dtype == "fp16":
        fail(
            ["train.dtype", "parallel.engine"],
            "train.dtype=fp16 needs loss scaling, which only parallel.engine=deepspeed provides "
            "(expected bf16 or fp32)",
        )
    if engine != "native" and dtype in ("bf16", "fp16") and stage == 0:
        fail(
            ["train.dtype", "parallel.zero_stage"],
            f"train.dtype={dtype} with parallel.zero_stage=0 is refused: DeepSpeed's stage-0 {dtype} optimizer "
            "leaves expert gradients out of the norm (and fp16 skips loss scaling); expected zero_stage 1 or 2",
        )
