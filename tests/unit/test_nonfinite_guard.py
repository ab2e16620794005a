"""The NaN guard looks at the gradient norm and the weights, not only the loss (issue 'Nothing lost, nothing
silent', item 5): a checkpoint whose weights cannot give a finite loss is never sealed."""

import math

import pytest
import torch

from msmoe_dist.checkpoint import latest_checkpoint, torch_load
from msmoe_dist.train import tasks, trainer
from msmoe_dist.train.engine import NonFiniteLoss, check_finite_params, nonfinite_params
from tests.unit.test_trainer_guards import tiny_cfg


@pytest.mark.parametrize(
    "value,bad",
    [(0.5, False), (1e6, False), (float("nan"), True), (float("inf"), True), (-float("inf"), True), (2e28, True)],
)
def test_nonfinite_params(value, bad):
    params = [torch.ones(3, 4), torch.tensor([1.0, value]), torch.ones(2, dtype=torch.bfloat16)]
    assert bool(nonfinite_params(params).item()) is bad
    if bad:
        with pytest.raises(NonFiniteLoss, match="not writing this checkpoint"):
            check_finite_params(params)
    else:
        check_finite_params(params)


def test_huge_lr_never_seals_a_checkpoint_of_unusable_weights(tmp_path):
    # lr=1e30: the first update leaves every weight finite but ~1e28, so the loss of step 2 is NaN. The
    # checkpoint of step 1 used to be sealed and evaluated to a NaN perplexity.
    cfg = tiny_cfg(tmp_path, "optim.lr=1e30", "checkpoint.every_steps=1", "train.max_steps=3")
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        trainer.run(cfg)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    if ckpt is not None:  # whatever was sealed must still give finite numbers
        state = torch_load(ckpt / "state.pt")["model"]
        assert not nonfinite_params([v for v in state.values() if v.is_floating_point()]).item()


def test_nonfinite_gradient_with_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    real_build = tasks.build_model
    calls = {"n": 0}
    kept: dict = {}

    def poisoned(*args):
        model = real_build(*args)
        orig_forward = model.forward
        p = next(model.parameters())
        # The 3rd step's gradient of one weight is infinite; its loss is finite.
        p.register_hook(lambda g: g * math.inf if calls["n"] == 3 else g)

        def forward(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                kept["before"] = [q.detach().clone() for q in model.parameters()]
                kept["model"] = model
            return orig_forward(*a, **kw)

        model.forward = forward
        return model

    monkeypatch.setattr(tasks, "build_model", poisoned)
    with pytest.raises(NonFiniteLoss, match="gradient norm became (inf|nan).* at step 3"):
        trainer.run(tiny_cfg(tmp_path, "train.eval_every=0"))
    after = list(kept["model"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, kept["before"], strict=True))  # not updated
