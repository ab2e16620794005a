"""Bad inputs end with one line naming what was wrong and what was expected (issue 'Nothing lost, nothing silent')."""

from __future__ import annotations

import pytest

from msmoe_dist import cli
from msmoe_dist.config.errors import ConfigError
from msmoe_dist.config.loader import load_config


def test_a_key_given_twice_on_the_command_line_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.train_main(["optim.lr=1e-3", "data.batch_size=2", "optim.lr=2e-3", "--print-config"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr (command line): given twice" in err, err


def test_programs_may_still_append_overrides():
    # Benchmarks build lists by appending to a base list: load_config lets the later one win.
    assert load_config(None, ["optim.lr=1e-3", "optim.lr=2e-3"]).optim.lr == 2e-3


@pytest.mark.parametrize("key,value", [("momentum.mu", "0.5"), ("momentum.gamma", "2.0"), ("momentum.gamma", "1.0")])
def test_robust_momentum_refuses_heavy_ball_keys(key, value):
    with pytest.raises(ConfigError, match=rf"{key}=.*momentum\.rho and momentum\.kappa"):
        load_config(None, ["momentum.kind=robust", f"{key}={value}"])


def test_robust_momentum_accepts_a_saved_resolved_config():
    # A run's saved config.yaml lists every key, mu/gamma at their defaults: still loadable.
    load_config(None, ["momentum.kind=robust", "momentum.rho=0.3", "momentum.kappa=2.0"])
    from msmoe_dist.config.loader import config_from_dict, config_to_dict

    cfg = load_config(None, ["momentum.kind=robust"])
    config_from_dict(config_to_dict(cfg))


@pytest.mark.parametrize(
    "main,argv,names",
    [
        (cli.eval_main, ["--checkpoint", "x", "--bogus"], "--checkpoint"),
        (cli.prepare_main, ["in", "out", "--bogus"], "--overwrite"),
        (cli.bench_main, ["layer", "--bogus"], "layer"),
    ],
)
def test_unknown_flags_are_one_line_naming_the_valid_options(main, argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--bogus" in err and "valid:" in err and names in err


def test_robust_switched_on_the_command_line_warns_about_a_heavy_ball_files_mu(tmp_path):
    heavy_ball = tmp_path / "hb.yaml"
    heavy_ball.write_text("momentum:\n  kind: heavy_ball\n  mu: 0.9\n")
    with pytest.warns(UserWarning, match=r"momentum\.mu=0\.9 from .*hb\.yaml is not read by momentum\.kind=robust"):
        assert load_config(str(heavy_ball), ["momentum.kind=robust"]).momentum.kind == "robust"
    robust = tmp_path / "robust.yaml"
    robust.write_text("momentum:\n  kind: robust\n  mu: 0.9\n")  # meant for robust momentum: refused
    with pytest.raises(ConfigError, match=r"momentum\.mu=.*momentum\.rho and momentum\.kappa"):
        load_config(str(robust), [])
