"""Configs: overrides, recipes, and one-line errors naming the bad value."""

from __future__ import annotations

import pytest
import torch

from rayrcm.config import (
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_recipe,
    to_dict,
    to_flat_dict,
    validate,
)
from rayrcm.errors import ConfigError


def test_dotted_overrides_are_typed():
    cfg = apply_overrides(ExperimentConfig(), ["optim.lr=2e-4", "train.workers=3", "data.hflip=true",
                                               "train.eval_sigmas=0.25,0.5,1.0", "model.init_from=none"])
    assert cfg.optim.lr == 2e-4 and cfg.train.workers == 3 and cfg.data.hflip is True
    assert cfg.train.eval_sigmas == (0.25, 0.5, 1.0) and cfg.model.init_from is None


def test_round_trip_through_plain_dict():
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "method.sigma=0.5", "optim.lr=0.01"])
    assert from_dict(to_dict(cfg)) == cfg
    flat = to_flat_dict(cfg)
    assert flat["method.sigma"] == 0.5 and flat["optim.lr"] == 0.01


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("nosuch.key=1", "nosuch"),
    ("optim.lr=abc", "optim.lr"),
    ("method.name=nosuch", "method.name"),
    ("lr=1", "lr=1"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        apply_overrides(ExperimentConfig(), [override])
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("data.name=mnist", "data.name"),
    ("model.encoder=vit_huge", "model.encoder"),
    ("optim.lr=-0.1", "optim.lr"),
    ("train.eval_sigmas=0", "train.eval_sigmas"),
    ("data.augmentation=fancy", "data.augmentation"),
    ("train.precision=fp8", "train.precision"),
    ("model.patch_size=5", "model.patch_size"),
    ("tracking.alias=sigma-0.50", "tracking.alias"),
])
def test_validation_errors_are_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(ExperimentConfig(), [override]))
    msg = str(err.value)
    assert err.value.key == key and "\n" not in msg and key in msg


def test_method_specific_validation():
    with pytest.raises(ConfigError, match="method.sigma"):
        validate(apply_overrides(ExperimentConfig(), ["method.name=gaussian", "method.sigma=-1"]))
    with pytest.raises(ConfigError, match="method.temperature"):
        validate(apply_overrides(ExperimentConfig(), ["method.temperature=0"]))


def test_missing_data_paths(tmp_path):
    for name in ("cifar10", "cifar100", "imagefolder"):
        with pytest.raises(ConfigError, match="data.path"):
            validate(apply_overrides(ExperimentConfig(), [f"data.name={name}"]))
        with pytest.raises(ConfigError, match="data.path"):
            validate(apply_overrides(ExperimentConfig(), [f"data.name={name}", f"data.path={tmp_path}"]))


def test_yaml_and_python_recipes(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("method:\n  name: gaussian\n  sigma: 0.5\noptim:\n  lr: 0.002\n")
    cfg = load_recipe(y)
    assert cfg.method.name == "gaussian" and cfg.method.sigma == 0.5 and cfg.optim.lr == 0.002
    p = tmp_path / "r.py"
    p.write_text("def config():\n    return {'train': {'steps': 7}, 'method': {'name': 'rcm', 'temperature': 0.3}}\n")
    cfg = load_recipe(p)
    assert cfg.train.steps == 7 and cfg.method.temperature == 0.3
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  nosuch: 1\n")
    with pytest.raises(ConfigError, match="optim.nosuch"):
        load_recipe(bad)


def test_sgd_is_plain_momentum_unless_nesterov_is_asked():
    """The seeds call ``torch.optim.SGD(momentum=0.9)`` (plain) except where they pass
    ``nesterov=True``; timm's own ``sgd`` is Nesterov, so the name alone must not decide it."""
    from torch import nn

    from rayrcm.config import apply_overrides
    from rayrcm.train.optim import build_optimizer

    net = nn.Linear(3, 2)
    for extra, nesterov in (([], False), (["optim.nesterov=true"], True)):
        cfg = apply_overrides(ExperimentConfig(), ["optim.name=sgd", "optim.momentum=0.9", *extra])
        opt = build_optimizer(net, net, cfg.optim)
        assert isinstance(opt, torch.optim.SGD) and all(g["nesterov"] is nesterov for g in opt.param_groups)


def test_adam_betas_reach_the_optimizer_and_bad_ones_are_one_line():
    import torch

    from rayrcm.config import apply_overrides, validate
    from rayrcm.errors import ConfigError
    from rayrcm.train.optim import build_optimizer

    cfg = validate(apply_overrides(ExperimentConfig(), ["optim.name=adamw", "optim.betas=0.9,0.98"]), check_paths=False)
    m = torch.nn.Linear(3, 2)
    assert build_optimizer(m, m, cfg.optim).defaults["betas"] == (0.9, 0.98)  # StableRep's README value
    default = validate(ExperimentConfig(), check_paths=False)
    assert build_optimizer(m, m, default.optim).defaults["betas"] == (0.9, 0.999)  # torch's, as before
    with pytest.raises(ConfigError, match=r"optim.betas=\(0.9, 1.0\) is invalid: two numbers in \[0, 1\)"):
        validate(apply_overrides(ExperimentConfig(), ["optim.betas=0.9,1.0"]), check_paths=False)
