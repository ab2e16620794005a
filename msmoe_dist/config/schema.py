"""The typed configuration tree of msmoe_dist.

Nested dataclasses are the schema; YAML files only hold values for it; the command line
overrides single leaves with ``section.key=value``.  Precedence: defaults < YAML < CLI.
Every field documents itself through ``metadata["help"]`` so that ``msmoe-train --help``
is the manual.  Cross-field checks live in ``validate.py`` and nowhere else.

Each component receives only its own sub-config (the MoE layer gets ``MoEConfig``, the
momentum code ``MomentumConfig``, ...), never the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, *, arch: bool = False):
    """A dataclass field with its documentation (and allowed values) attached.

    ``arch=True`` marks a key outside the model/moe/momentum sections that shapes the network,
    so a checkpoint's weights only fit a run with the same value (``model_spec.ModelSpec``).
    """
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if arch:
        meta["arch"] = True
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    kind: str = opt(
        "lm",
        "lm: decoder-only language model (data.kind synthetic/text/prepared). vit: V-MoE vision transformer "
        "classifier (data.kind synthetic_images/imagenet); its image keys live in the vision section.",
        ("lm", "vit"),
    )
    vocab_size: int = opt(0, "Vocabulary size; 0 takes it from the data's vocabulary.")
    num_layers: int = opt(4, "Number of transformer blocks (attention + FFN/MoE each).")
    d_model: int = opt(128, "Hidden size of the residual stream.")
    num_heads: int = opt(4, "Attention heads; must divide d_model.")
    ffn_dim: int = opt(512, "Inner size of the dense FFN in dense (non-MoE) blocks of the GLaM layout.")
    max_seq_len: int = opt(256, "Largest sequence length the position table supports.")
    dropout: float = opt(0.0, "Dropout on attention output, FFN/MoE output and embeddings, in [0, 1).")
    block_style: str = opt(
        "pre_ln",
        "pre_ln: x + f(LN(x)) blocks. reference: the MomentumSMoE reference's post-LN block, "
        "h = LN2(h + LN(h + gamma*p)) with the double LayerNorm, to reproduce paper numbers.",
        ("pre_ln", "reference"),
    )
    layout: str = opt(
        "switch",
        "switch: an MoE layer in every block. glam: MoE blocks alternate with dense FFN blocks "
        "(block 0 MoE, block 1 dense, ...); dense blocks pass the momentum state through unchanged. "
        "middle: one MoE block at index num_layers // 2, all others dense (the StableMoE paper's layout; "
        "model.layer_insert inserts it as an extra layer instead).",
        ("switch", "glam", "middle"),
    )
    position: str = opt("learned", "Position encoding.", ("learned", "rotary"))
    tie_embeddings: bool = opt(True, "Share the token embedding with the output projection.")
    output_layer: str = opt(
        "full",
        "Output projection + cross-entropy. full: logits of every token at once (B*S*V floats, and as many "
        "again for their gradient; 26 GB in fp32 for WikiText-103's 267,735 words at 48x512 tokens). "
        "chunked: the same exact full-softmax loss over model.output_chunk_tokens tokens at a time, in forward "
        "and backward (backward recomputes each chunk's logits); same weights and checkpoints as full. "
        "adaptive: adaptive softmax (torch.nn.AdaptiveLogSoftmaxWithLoss) with clusters model.adaptive_cutoffs; "
        "a different model with its own weights, for frequency-ordered ids; needs tie_embeddings=false.",
        ("full", "chunked", "adaptive"),
    )
    output_chunk_tokens: int = opt(
        1024, "output_layer=chunked: tokens whose logits exist at once (chunk x vocab floats); > 0."
    )
    adaptive_cutoffs: str = opt(
        "20000,40000,200000",
        "output_layer=adaptive: comma-separated, increasing cluster boundaries in token ids, each < the vocabulary "
        "size: ids below the first form the head shortlist. Default: Transformer-XL's WikiText-103 cutoffs.",
    )
    adaptive_div_value: float = opt(
        4.0, "output_layer=adaptive: tail cluster i projects to d_model // div_value**(i+1) dims; > 0."
    )
    init_std: float = opt(0.02, "Std of the normal init of linear and embedding weights.")
    init: str = opt(
        "normal",
        "normal: every linear/embedding weight N(0, init_std), biases 0. torch_default (language model): PyTorch's "
        "default initialisers, as the MomentumSMoE reference has them: embeddings N(0, 1), linear layers "
        "U(+-1/sqrt(fan_in)) weights and biases, experts U(+-1/sqrt(d_model*expert_ffn_dim)) with zero biases "
        "(fastmoe's FMoELinear). vmoe (model.kind=vit): the flax initialisers of the V-MoE fork rachtsy/vmoe "
        "(xavier-uniform MLP/attention kernels, N(0, 1e-6) MLP biases, LeCun-normal router and patch embedding, "
        "one initial draw shared by all experts). fairseq (language model): fairseq's, as the StableMoE reference: "
        "token and position embeddings N(0, d_model^-1/2), q/k/v xavier-uniform with gain 1/sqrt(2), attention "
        "output xavier-uniform with a zero bias, other linear layers PyTorch's default, experts' second layer "
        "zero (MoESublayer). docs/reference_differences.md.",
        ("normal", "torch_default", "vmoe", "fairseq"),
    )
    output_bias: bool = opt(
        False, "Language model: a bias on the output layer (full/chunked), as the MomentumSMoE reference's out_emb."
    )
    dropout_at: str = opt(
        "all",
        "Where model.dropout applies. all: embeddings, attention probabilities and output, the dense FFN's hidden "
        "layer and output, the MoE output. reference (the MomentumSMoE reference): attention probabilities, the "
        "dense FFN's hidden layer and the MoE output only (set moe.expert_dropout for the experts' hidden layer).",
        ("all", "reference"),
    )
    norm_eps: float = opt(1e-5, "Epsilon of every LayerNorm (PyTorch: 1e-5; flax, the V-MoE reference: 1e-6); > 0.")
    post_mlp_norm: bool = opt(
        False,
        "pre_ln blocks: a LayerNorm after every MLP/MoE residual, x = LN(x + d), as the rachtsy/vmoe momentum "
        "models (MomentumV-MoE, Robust) have it.",
    )
    layer_insert: bool = opt(
        False,
        "layout=middle: insert the MoE layer as an extra layer (LN -> MoE -> residual, no attention) before block "
        "num_layers // 2, keeping every block's dense FFN, as the StableMoE reference does; false replaces block "
        "num_layers // 2's FFN.",
    )
    attention_bias: bool = opt(
        True, "Biases on the attention's q/k/v and output projections (the MomentumSMoE reference has none)."
    )
    embed_scale: bool = opt(
        False, "Language model: multiply the token embeddings by sqrt(d_model), as fairseq (the StableMoE reference)."
    )


@dataclass
class MoEConfig:
    num_experts: int = opt(8, "Experts per MoE layer (total, across all expert-parallel ranks).")
    top_k: int = opt(2, "Experts each token is routed to; 1 <= top_k <= num_experts.")
    expert_ffn_dim: int = opt(512, "Inner size of each expert FFN (d_model -> expert_ffn_dim -> d_model).")
    activation: str = opt(
        "relu",
        "Expert FFN activation (the reference uses relu); gelu is exact, gelu_tanh the tanh approximation (flax's "
        "nn.gelu, the V-MoE reference).",
        ("relu", "gelu", "silu", "gelu_tanh"),
    )
    gate: str = opt(
        "topk_softmax",
        "topk_softmax: take the top-k logits, softmax over those k (the MomentumSMoE reference gate). "
        "softmax_topk: softmax over all experts, then top-k (GShard/Switch).",
        ("topk_softmax", "softmax_topk"),
    )
    renormalize: bool = opt(False, "softmax_topk only: rescale the k selected probabilities to sum to 1.")
    noisy_gating: bool = opt(False, "Add Gaussian noise (std noise_std / num_experts) to logits in training.")
    noise_std: float = opt(1.0, "Scale of the gating noise when noisy_gating is on; > 0.")
    balance_loss_coef: float = opt(
        0.0, "Switch auxiliary load-balancing loss coefficient; 0 disables it (what the reference runs used)."
    )
    z_loss_coef: float = opt(0.0, "Router z-loss coefficient (ST-MoE); 0 disables it.")
    balance_loss: str = opt(
        "switch",
        "Which balance loss balance_loss_coef weighs. switch: E * sum_e f_e P_e (Switch Transformer). "
        "vmoe: V-MoE's importance loss CV^2(sum_t softmax(clean logits)) plus, in training, its load loss "
        "CV^2(mean_t P(expert e stays in the noisy top-k under re-sampled noise)); needs moe.noisy_gating=true.",
        ("switch", "vmoe"),
    )
    capacity_factor: float = opt(
        0.0,
        "0 = dropless. >0: each expert takes at most ceil(capacity_factor * tokens * top_k / num_experts) "
        "assignments; the overflow is dropped, contributes nothing, and is counted.",
    )
    eval_capacity_factor: float = opt(
        -1.0,
        "Capacity factor in evaluation (V-MoE trains at one capacity and evaluates at another): negative = "
        "the same as capacity_factor, 0 = dropless, > 0 = that factor.",
    )
    expert_impl: str = opt(
        "grouped",
        "grouped: sort tokens by expert and run the experts as one grouped GEMM (fast). "
        "loop: per-expert Python loop over masks (slow reference kept for tests).",
        ("grouped", "loop"),
    )
    router: str = opt(
        "topk",
        "topk: the linear top-k router above (gate, noise, balance/z losses). stablemoe: StableMoE's two-stage "
        "router (arXiv 2204.08396): top-1 against learned expert centroids with a sigmoid gate and distillation "
        "into a token-id router, which alone routes, frozen, from moe.stable_switch_step on. Needs moe.top_k=1 "
        "and leaves gate, noisy_gating, balance_loss_coef and z_loss_coef unused (non-zero values are refused). "
        "expert_choice: each expert picks its top ceil(top_k * T / num_experts * capacity_factor) tokens of the "
        "batch (capacity_factor 0 reads as 1); a token may be picked by 0..num_experts experts (unpicked ones pass "
        "through the residual and are counted); model.kind=vit only (over a causal LM's batch it leaks the future).",
        ("topk", "stablemoe", "expert_choice"),
    )
    stable_balance_coef: float = opt(
        0.3, "stablemoe: weight alpha of the StableMoE balance loss in stage 1 (paper: 0.3); >= 0."
    )
    stable_distill_coef: float = opt(
        0.3, "stablemoe: weight of the distillation cross-entropy in stage 1 (reference code: 0.3); > 0."
    )
    stable_distill_dim: int = opt(
        50, "stablemoe: dimension of the distilled router's token-id embedding and centroids (paper: 50); >= 1."
    )
    stable_switch_step: int = opt(
        100,
        "stablemoe: first optimiser step (0-based) of stage 2, where routing comes from the frozen distilled "
        "router. Paper: 10% of training, so set it to train.max_steps / 10 (the default is 10% of the default "
        "train.max_steps); an absolute step, so the stage depends on the step alone and survives resumes; >= 0.",
    )
    gate_bias: bool = opt(
        False, "topk router: a bias on the gate's linear layer (the MomentumSMoE reference's nn.Linear)."
    )
    expert_dropout: float = opt(
        0.0, "Dropout inside each expert after its activation (the MomentumSMoE and V-MoE references), in [0, 1)."
    )
    expert_output_dropout: float = opt(
        0.0, "Dropout on each expert's output before the gates combine them (V-MoE's expert MlpBlock), in [0, 1)."
    )
    stable_router_input: str = opt(
        "normed",
        "stablemoe: what the router scores and gates. normed: the MoE layer's (LayerNorm-ed) input. residual: the "
        "raw residual stream, as the StableMoE reference does (the experts still see the normalised input).",
        ("normed", "residual"),
    )
    overlap_chunks: int = opt(
        1,
        "Expert parallelism (parallel.ep_size > 1): split each MoE layer's routed rows into this many chunks and "
        "overlap one chunk's all-to-all with another's expert GEMMs, forward and backward (the same result to "
        "float rounding). 1 = one blocking exchange each way. 2-4 is the useful range; at most 64 and at most the "
        "rows a rank sends one peer on average (data.batch_size * data.seq_len * moe.top_k / parallel.ep_size "
        "for a language model): a chunk holding no rows still costs a collective. Not part of the network: a "
        "resume may change it.",
    )
    balance: str = opt(
        "loss",
        "How moe.router=topk balances the experts. loss: only the auxiliary losses above (balance_loss_coef). "
        "bias: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the routing scores for "
        "the choice of experts only (never to the combine weights), moves after each optimiser step by "
        "moe.bias_update_rate * sign(mean load - expert load) over the whole global batch, re-centred to zero "
        "mean; saved in checkpoints. docs/routing.md.",
        ("loss", "bias"),
    )
    bias_update_rate: float = opt(1e-3, "moe.balance=bias: the step of each expert's bias per optimiser step; >= 0.")
    num_shared_experts: int = opt(
        0,
        "Shared experts: dense FFNs (d_model -> moe.shared_expert_ffn_dim -> d_model, moe.activation) that every "
        "token goes through, added to the routed output before the momentum update; 0 = none.",
    )
    shared_expert_ffn_dim: int = opt(512, "Inner size of each shared expert FFN; > 0.")
    renormalize_after_drop: bool = opt(
        False,
        "softmax_topk + renormalize: rescale a token's gate values over the assignments that survive the capacity "
        "drops (DeepSpeed's top2gating), instead of over its top-k before the drops (the default). docs/routing.md.",
    )
    min_capacity: int = opt(
        0,
        "With capacity_factor > 0 (or moe.router=expert_choice): each expert keeps at least this many rows "
        "(DeepSpeed's min_capacity, 4 or 8 there); 0 = no floor.",
    )


@dataclass
class MomentumConfig:
    kind: str = opt(
        "none",
        "Residual update across MoE layers. none: x += u. heavy_ball: p = u + mu*p; x += gamma*p. "
        "adam: Adam-normalised step at the first adam_layers MoE layers, heavy-ball after (AdamSMoE). "
        "robust: robust momentum (Cyrus et al. 2018) from rho and kappa, experts see a look-ahead point.",
        ("none", "heavy_ball", "adam", "robust"),
    )
    mu: float = opt(0.7, "Heavy-ball momentum coefficient, in [0, 1).")
    gamma: float = opt(1.0, "Heavy-ball step size, > 0.")
    learnable: str = opt(
        "none",
        "Make mu and gamma trainable: one scalar pair, or one pair per MoE layer.",
        ("none", "scalar", "per_layer"),
    )
    beta1: float = opt(0.9, "AdamSMoE first-moment decay, in [0, 1).")
    beta2: float = opt(0.999, "AdamSMoE second-moment decay, in [0, 1).")
    eps: float = opt(1e-8, "AdamSMoE epsilon, added inside the square root as the reference does.")
    adam_gamma: float = opt(1.0, "AdamSMoE step size of the Adam layers (the reference's gamma1).")
    adam_layers: int = opt(
        1,
        "AdamSMoE: how many leading MoE layers take the Adam step (reference: 1); >= 1 and, "
        "when kind=adam, at most the number of MoE layers.",
    )
    rho: float = opt(0.2, "Robust momentum convergence-rate parameter rho, in (0, 1).")
    kappa: float = opt(1.25, "Robust momentum condition-number parameter kappa, > 1.")
    lookahead: str = opt(
        "residual",
        "robust, pre_ln blocks: where the look-ahead lam*p is added. residual: to the residual stream before the "
        "LayerNorm, LN(x + lam*p). normed: after it, LN(x) + lam*p (the rachtsy/vmoe robust reference).",
        ("residual", "normed"),
    )
    lookahead_dense: bool = opt(
        False, "robust: the dense (non-MoE) blocks' FFN sees the look-ahead point too (the rachtsy/vmoe reference)."
    )


@dataclass
class DataConfig:
    kind: str = opt(
        "synthetic",
        "synthetic: a learnable corpus the project generates itself into data.path. "
        "text: an existing directory with train/valid/test text in WikiText format. "
        "prepared: a directory written by msmoe-prepare (memory-mapped token ids + meta.json). "
        "synthetic_images: coloured-shape images the project generates into data.path in ImageNet layout "
        "(model.kind=vit). imagenet: an existing folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.",
        ("synthetic", "text", "prepared", "synthetic_images", "imagenet"),
    )
    path: str = opt(
        "data_cache/synthetic",
        "Directory of the corpus (train.txt, valid.txt, test.txt or wiki.*.tokens; for kind=prepared the "
        "msmoe-prepare output directory).",
    )
    tokenizer: str = opt(
        "word",
        "word: the reference's whitespace words + <eos> per line, vocabulary from the train split only "
        "(valid/test words unseen in train become <unk>). sentencepiece: a model trained on the train split "
        "(data.sp_vocab_size, data.sp_model_type). kind=prepared: must match what msmoe-prepare used.",
        ("word", "sentencepiece"),
    )
    sp_vocab_size: int = opt(32000, "sentencepiece only: vocabulary size to train (a soft limit on small corpora).")
    sp_model_type: str = opt("unigram", "sentencepiece only: model type.", ("unigram", "bpe", "char", "word"))
    sampler: str = opt(
        "random",
        "random: step-seeded random windows. sequential: the reference's order; each data-parallel rank "
        "reads its own contiguous shard of the training stream (world_size*batch_size contiguous lanes, step s "
        "reads window s of each lane, wrapping at the end of an epoch). Both are pure functions of the step, "
        "so a resumed run neither repeats nor skips a token.",
        ("random", "sequential"),
    )
    seq_len: int = opt(128, "Tokens per training/eval window; must be <= model.max_seq_len.")
    batch_size: int = opt(16, "Sequences per optimiser step (per data-parallel rank).")
    synthetic_lines: int = opt(20000, "synthetic only: number of generated training lines.")
    synthetic_seed: int = opt(1234, "synthetic only: seed of the corpus generator.")


@dataclass
class VisionConfig:
    # arch=True: these keys shape the ViT (a resume must keep them); the others only change training.
    image_size: int = opt(224, "Side of the square model input in pixels; a multiple of vision.patch_size.", arch=True)
    patch_size: int = opt(32, "Side of the square patches embedded as tokens (ViT-S/32: 32).", arch=True)
    num_classes: int = opt(1000, "Classifier outputs (ImageNet-1K: 1000); >= the number of class folders.", arch=True)
    pooling: str = opt(
        "cls", "cls: classify the class token. gap: global average pool of the patch tokens.", ("cls", "gap"), arch=True
    )
    moe_layout: str = opt(
        "every",
        "Which blocks hold an MoE layer instead of the dense MLP. every: every moe_every-th block "
        "(blocks k-1, 2k-1, ...: V-MoE's 'every 2' puts them at 1, 3, 5, 7 of 8). last: the last moe_last blocks. "
        "Dense blocks pass the momentum state through unchanged.",
        ("every", "last"),
        arch=True,
    )
    moe_every: int = opt(2, "moe_layout=every: the k of every k-th block; >= 1.", arch=True)
    moe_last: int = opt(
        2, "moe_layout=last: how many final blocks are MoE; 1 <= moe_last <= model.num_layers.", arch=True
    )
    random_resized_crop: bool = opt(
        True,
        "Training: Inception-style random-resized crop (scale 0.08-1) + horizontal flip; false: resize + "
        "centre crop as in evaluation.",
    )
    randaugment_ops: int = opt(0, "Training: RandAugment operations per image; 0 disables RandAugment.")
    randaugment_magnitude: int = opt(9, "Training: RandAugment magnitude, in [0, 30].")
    mixup_alpha: float = opt(0.0, "Training: mixup Beta(alpha, alpha) on each batch; 0 disables mixup.")
    eval_crop_ratio: float = opt(
        0.875, "Evaluation: resize the short side to image_size / eval_crop_ratio, then centre-crop; in (0, 1]."
    )
    num_workers: int = opt(2, "DataLoader worker processes per rank for decoding images; 0 = in the main process.")
    synthetic_classes: int = opt(10, "synthetic_images only: number of classes (shape x colour); 2..48.")
    synthetic_train_per_class: int = opt(64, "synthetic_images only: training images per class.")
    synthetic_val_per_class: int = opt(16, "synthetic_images only: validation images per class.")
    synthetic_seed: int = opt(1234, "synthetic_images only: seed of the image generator.")
    pre_logits: bool = opt(
        False,
        "A pre-logits layer before the head: tanh(Linear(d_model, d_model)) (V-MoE's representation_size).",
        arch=True,
    )
    head_bias: str = opt(
        "zero",
        "Initial bias of the classifier head: zero, or neg_log_classes = -log(num_classes) (V-MoE), which starts "
        "every sigmoid near 1/num_classes.",
        ("zero", "neg_log_classes"),
    )
    loss: str = opt(
        "softmax_ce",
        "softmax_ce: softmax cross-entropy. sigmoid_ce: V-MoE's sigmoid_xent, per image the sum over classes of "
        "binary cross-entropy against the (one-hot or mixup) targets, averaged over images.",
        ("softmax_ce", "sigmoid_ce"),
    )


@dataclass
class OptimConfig:
    name: str = opt("adamw", "Optimiser.", ("adam", "adamw", "sgd"))
    lr: float = opt(1e-3, "Peak learning rate, > 0.")
    beta1: float = opt(0.9, "Adam beta1, in [0, 1).")
    beta2: float = opt(0.999, "Adam beta2, in [0, 1).")
    eps: float = opt(1e-8, "Adam epsilon, > 0.")
    weight_decay: float = opt(0.0, "Weight decay (not applied to norms, biases, embeddings or momentum scalars).")
    warmup_steps: int = opt(0, "Linear warm-up steps from 0 to lr.")
    schedule: str = opt("constant", "LR after warm-up.", ("constant", "cosine", "linear"))
    min_lr_ratio: float = opt(0.1, "cosine/linear: final lr as a fraction of the peak, in [0, 1].")
    grad_clip: float = opt(0.0, "Clip the global gradient norm to this value; 0 disables clipping.")


@dataclass
class TrainConfig:
    run_dir: str = opt("runs/default", "Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/.")
    max_steps: int = opt(1000, "Optimiser steps to train for.")
    seed: int = opt(0, "Seed of model init, data order and dropout.")
    resume: bool = opt(False, "Continue from the latest checkpoint in run_dir (an error if there is none).")
    auto_resume: bool = opt(
        False,
        "Continue from the latest complete checkpoint if run_dir has one, else start fresh: for elastic "
        "restarts (torchrun --max-restarts), where the same command is run again after a failure.",
    )
    device: str = opt("auto", "auto picks cuda when available, else cpu.", ("auto", "cpu", "cuda"))
    dtype: str = opt(
        "fp32",
        "Precision. native engine: fp32, or bf16 autocast with fp32 weights. deepspeed engine: its bf16/fp16 "
        "modes (fp16 with dynamic loss scaling; needs a GPU and parallel.zero_stage >= 1).",
        ("fp32", "bf16", "fp16"),
    )
    grad_accum_steps: int = opt(1, "Micro-batches of data.batch_size accumulated per optimiser step (>= 1).")
    eval_every: int = opt(0, "Evaluate validation perplexity every N steps; 0 = only at the end.")
    eval_batches: int = opt(20, "Batches per evaluation; 0 = the whole validation stream.")
    progress: bool = opt(True, "Show a progress bar (loss, tokens/s, ETA).")
    overwrite: bool = opt(
        False,
        "Start a fresh run in a run_dir that already holds checkpoints, deleting them (no shipped config sets it; "
        "pass it on the command line when you mean it).",
    )
    activation_checkpointing: str = opt(
        "none",
        "Recompute activations in the backward pass instead of keeping them (the gradients are the same). "
        "block: whole transformer blocks (least memory; under expert parallelism the backward repeats each "
        "MoE layer's all-to-all). selective: attention and dense FFN sublayers only; the MoE layer keeps "
        "its activations, so no all-to-all is repeated. Both engines; any momentum kind, router and dropout.",
        ("none", "block", "selective"),
    )
    allow_batch_change: bool = opt(
        False,
        "On resume, accept a changed global batch (data.batch_size x grad_accum_steps x world size) or "
        "data.batch_size: training continues at the saved step with the new batch (the data order is then "
        "that of the new batch). Without it such a resume is refused.",
    )


@dataclass
class CheckpointConfig:
    every_steps: int = opt(0, "Save a checkpoint every N steps; 0 = only at the end.")
    keep_last: int = opt(2, "How many most recent checkpoints to keep; >= 1.")
    init_from: str = opt(
        "",
        "Start a fresh run from the weights of this checkpoint (run dir or step dir; any engine and EP degree "
        "with the same total number of experts). Optimiser state, schedule and step start anew.",
    )
    on_corrupt: str = opt(
        "fallback",
        "A checkpoint whose files differ from the checksums recorded at save (bit flips, truncation), found "
        "on resume: fallback renames it to step_N.corrupt (never deleted), says so on stderr and resumes from "
        "the newest checkpoint that verifies; fail stops with one line naming the file.",
        ("fallback", "fail"),
    )


@dataclass
class LoggingConfig:
    log_every: int = opt(10, "Write metrics.jsonl / TensorBoard scalars every N steps.")
    tensorboard: bool = opt(True, "Write TensorBoard event files under run_dir/tensorboard.")
    moe_stats: bool = opt(True, "Log per-layer MoE statistics (imbalance, drops, entropy, momentum norms).")
    fluct_every: int = opt(
        0,
        "Routing fluctuation (StableMoE paper): every N steps record the top-1 expert of a fixed set of "
        "validation tokens at each MoE layer; at the end log each token's last fluctuation step and write "
        "routing_fluctuation.png. 0 disables it. Any router.",
    )
    fluct_tokens: int = opt(
        2048, "Routing fluctuation: how many leading validation tokens to track (cut into data.seq_len windows)."
    )
    wandb: bool = opt(False, "Also send every metrics row to Weights & Biases (needs the wandb package; rank 0 only).")
    wandb_project: str = opt("msmoe_dist", "logging.wandb: the W&B project.")
    wandb_mode: str = opt(
        "offline",
        "logging.wandb: offline writes run_dir/wandb/ (upload later with `wandb sync`); online streams it.",
        ("offline", "online"),
    )


@dataclass
class ParallelConfig:
    ep_size: int = opt(1, "Expert-parallel degree: experts are sharded over groups of ep_size consecutive ranks.")
    engine: str = opt(
        "auto",
        "native: plain PyTorch, one process. deepspeed: the DeepSpeed engine (ZeRO, bf16/fp16, checkpoints), "
        "any world size. auto: native for one process, deepspeed under torchrun/the deepspeed launcher.",
        ("auto", "native", "deepspeed"),
    )
    zero_stage: int = opt(
        1, "DeepSpeed ZeRO stage: 0, 1 or 2 (stage 3 is refused: DeepSpeed does not support it for MoE models)."
    )
    deepspeed_config: str = opt(
        "", "Optional DeepSpeed JSON whose entries override the config generated from this one (deep merge)."
    )
    backend: str = opt("auto", "torch.distributed backend; auto = nccl with CUDA, else gloo.", ("auto", "nccl", "gloo"))
    timeout_s: float = opt(300.0, "Timeout of every collective, in seconds (a hung peer becomes an error).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
