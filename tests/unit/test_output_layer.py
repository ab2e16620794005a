"""model.output_layer: chunked cross-entropy equals the full one (loss and every gradient), holds
fewer logits at once, and adaptive softmax trains and evaluates; their config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from msmoe_dist.checkpoint import CheckpointError, CheckpointMeta
from msmoe_dist.config.loader import ConfigError, config_to_dict, load_config
from msmoe_dist.config.model_spec import ModelSpec
from msmoe_dist.config.schema import Config, ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.eval.lm import evaluate_lm
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.models.output import chunked_cross_entropy
from msmoe_dist.train.errors import TrainError
from msmoe_dist.train.tasks import resolve_vocab_size

V = 60


def make(output_layer="full", tie=True, chunk=5, cutoffs="10,30", seed=0, style="pre_ln"):
    torch.manual_seed(seed)
    mcfg = ModelConfig(
        num_layers=2,
        d_model=16,
        num_heads=2,
        max_seq_len=16,
        block_style=style,
        tie_embeddings=tie,
        output_layer=output_layer,
        output_chunk_tokens=chunk,
        adaptive_cutoffs=cutoffs,
        adaptive_div_value=2.0,
    )
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16)
    return MoELanguageModel(mcfg, moe, MomentumConfig(kind="heavy_ball"), V)


def batch(b=3, s=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (b, s + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


# ------------------------------------------------------------------------------------------
# chunked == full


@pytest.mark.parametrize("chunk", [1, 4, 7, 21, 100])  # 21 tokens: chunks that do and do not divide them
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_function_matches_cross_entropy(chunk, reduction):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(21, 8, generator=g, requires_grad=True)
    w = torch.randn(V, 8, generator=g, requires_grad=True)
    t = torch.randint(0, V, (21,), generator=g)
    ref = F.cross_entropy(h @ w.t(), t, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, (h, w))
    got = chunked_cross_entropy(h, w, t, chunk, reduction)
    got_grads = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [3, 7, 64])  # 21 tokens: 7 divides, 3 divides, 64 > all
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_model_matches_full_in_loss_and_every_gradient(tie, chunk, reduction):
    x, y = batch()
    full, chunked = make("full", tie), make("chunked", tie, chunk=chunk)
    chunked.load_state_dict(full.state_dict())  # the same parameters: checkpoints move between the two
    out_f, out_c = full(x, y, reduction=reduction), chunked(x, y, reduction=reduction)
    torch.testing.assert_close(out_c.loss, out_f.loss, rtol=1e-6, atol=1e-6)
    out_f.loss.backward()
    out_c.loss.backward()
    grads_f = dict(full.named_parameters())
    for name, p in chunked.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads_f[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    if tie:
        assert chunked.head.weight is chunked.tok_emb.weight


def test_chunk_size_does_not_matter_non_dividing():
    x, y = batch(b=2, s=11)  # 22 tokens
    losses = []
    for chunk in (5, 22):
        model = make("chunked", chunk=chunk)
        losses.append(model(x, y).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_chunked_under_bf16_autocast_follows_full():
    x, y = batch()
    full, chunked = make("full"), make("chunked")
    chunked.load_state_dict(full.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lf, lc = full(x, y).loss, chunked(x, y).loss
    assert lc.dtype == torch.float32
    torch.testing.assert_close(lc, lf, rtol=2e-2, atol=2e-2)
    lf.backward()
    lc.backward()
    assert torch.isfinite(chunked.head.weight.grad).all()
    torch.testing.assert_close(chunked.head.weight.grad, full.head.weight.grad, rtol=0.1, atol=2e-3)


def test_return_logits_and_no_target_forward():
    x, y = batch()
    full, chunked = make("full"), make("chunked")
    chunked.load_state_dict(full.state_dict())
    torch.testing.assert_close(chunked(x, y, return_logits=True).logits, full(x, return_logits=True).logits)
    for model in (full, chunked, make("adaptive", tie=False)):
        out = model(x)  # the routing-fluctuation probe: no targets, no logits, no head
        assert out.loss is None and out.logits is None


# ------------------------------------------------------------------------------------------
# memory: deterministic measures, not timings


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op produced (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _saved_numels(fn) -> list[int]:
    """Sizes of the tensors autograd saves for backward while fn runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_chunked_never_holds_all_logits():
    N, D, Vbig, chunk = 64, 8, 500, 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(Vbig, D, generator=g, requires_grad=True)
    t = torch.randint(0, Vbig, (N,), generator=g)

    def step(kind):
        with LargestTensor() as mode:
            loss = F.cross_entropy(h @ w.t(), t) if kind == "full" else chunked_cross_entropy(h, w, t, chunk)
            loss.backward()
        return mode.largest

    assert step("full") >= N * Vbig  # the whole [N, V] logits (and their gradient)
    assert step("chunked") == chunk * Vbig  # one chunk's logits; [V, D] and [N, D] are smaller here

    saved_full = _saved_numels(lambda: F.cross_entropy(h @ w.t(), t))
    saved_chunked = _saved_numels(lambda: chunked_cross_entropy(h, w, t, chunk))
    assert max(saved_full) >= N * Vbig
    assert max(saved_chunked) == max(N * D, Vbig * D)  # h, w, targets and one lse per token
    assert sum(saved_chunked) == N * D + Vbig * D + N + N


# ------------------------------------------------------------------------------------------
# adaptive softmax


def test_adaptive_trains_and_evaluates():
    model = make("adaptive", tie=False)
    assert sorted(n for n, _ in model.named_parameters() if n.startswith("head."))[0] == "head.head.weight"
    x, y = batch(b=4, s=12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(x, y)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses

    model.eval()
    with torch.no_grad():
        out = model(x, y, return_logits=True, reduction="sum")
        logp = out.logits  # [B, S, V] log-probabilities
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, 12), rtol=1e-5, atol=1e-5)
        nll = -logp.gather(-1, y[..., None]).sum()
        torch.testing.assert_close(out.loss, nll, rtol=1e-5, atol=1e-4)
        mean = model(x, y).loss
        torch.testing.assert_close(mean, nll / y.numel(), rtol=1e-5, atol=1e-5)

    stream = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(3))
    ev = evaluate_lm(model, stream, batch_size=3, seq_len=12, max_batches=0, device="cpu")
    assert ev["tokens"] == 199 and torch.isfinite(torch.tensor(ev["ppl"])) and ev["ppl"] > 1


def test_adaptive_model_refuses_tie_and_large_cutoffs():
    with pytest.raises(ValueError, match="model.tie_embeddings"):
        make("adaptive", tie=True)
    with pytest.raises(ValueError, match="model.adaptive_cutoffs"):
        make("adaptive", tie=False, cutoffs="10,60")  # V = 60


# ------------------------------------------------------------------------------------------
# configuration


def _config_error(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_adaptive_with_tied_embeddings_is_refused():
    msg = _config_error(["model.output_layer=adaptive"])  # tie_embeddings defaults to true
    assert "model.output_layer" in msg and "model.tie_embeddings" in msg
    cfg = load_config(None, ["model.output_layer=adaptive", "model.tie_embeddings=false"])
    assert cfg.model.adaptive_cutoffs == "20000,40000,200000" and cfg.model.adaptive_div_value == 4.0


@pytest.mark.parametrize("cutoffs", ["40000,20000", "20,20", "0,10", "ten,20", "", "10,,20", "-5"])
def test_bad_cutoffs_are_refused(cutoffs):
    msg = _config_error(
        ["model.output_layer=adaptive", "model.tie_embeddings=false", f"model.adaptive_cutoffs={cutoffs}"]
    )
    assert "model.adaptive_cutoffs" in msg


def test_cutoffs_checked_against_a_given_vocabulary():
    base = ["model.output_layer=adaptive", "model.tie_embeddings=false", "model.adaptive_cutoffs=100,200"]
    msg = _config_error(base + ["model.vocab_size=200"])
    assert "model.adaptive_cutoffs" in msg and "model.vocab_size" in msg
    assert load_config(None, base + ["model.vocab_size=201"]).model.adaptive_cutoffs == "100,200"
    # vocab_size=0 takes the data's: checked when the data is loaded
    cfg = load_config(None, base)
    with pytest.raises(TrainError, match="model.adaptive_cutoffs"):
        resolve_vocab_size(cfg.model, 150)
    assert resolve_vocab_size(cfg.model, 250) == 250


def test_other_output_keys_checked():
    assert "model.output_chunk_tokens" in _config_error(["model.output_chunk_tokens=0"])
    assert "model.adaptive_div_value" in _config_error(["model.adaptive_div_value=0"])
    assert "model.output_layer" in _config_error(["model.output_layer=sampled"])


def test_resume_may_switch_between_full_and_chunked_only():
    from pathlib import Path

    layout = {"engine": "native"}
    saved = CheckpointMeta(4, layout, config_to_dict(Config()))
    cfg = load_config(None, ["model.output_layer=chunked", "model.output_chunk_tokens=64"])
    saved.check_resume(Path("step_4"), layout, ModelSpec.of(cfg))  # same weights, same function
    cfg = load_config(None, ["model.output_layer=adaptive", "model.tie_embeddings=false"])
    with pytest.raises(CheckpointError, match="cannot resume.*model.output_layer"):
        saved.check_resume(Path("step_4"), layout, ModelSpec.of(cfg))


def test_wikitext103_configs_use_the_chunked_full_softmax():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "wikitext103").glob("*.yaml"))
    assert configs
    for path in configs:
        assert load_config(path, []).model.output_layer == "chunked", path.name
