"""Small builders shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict
from rayrcm.models import build_classifier
from rayrcm.train.checkpoint import model_meta, save_model


def make_model(path, *, num_classes=10, sigma=0.25, stage="classifier", seed=0):
    """A small (untrained) 8 px digits classifier saved as a rayrcm ``model.pt``."""
    torch.manual_seed(seed)
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", f"method.sigma={sigma}", "data.image_size=8",
                                               "model.patch_size=4"])
    save_model(path, build_classifier(cfg.model, 8, num_classes), model_meta(to_dict(cfg), stage, num_classes))
    return path


def trained_digits_model(path):
    """The rayrcm digits classifier (8 px), trained for two epochs (about 90% test accuracy), as a model.pt."""
    from torch.nn import functional as F

    from rayrcm.data.datasets import digits_tensors

    torch.manual_seed(0)
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "data.image_size=8", "model.patch_size=4"])
    model = build_classifier(cfg.model, 8, 10)
    x, y = digits_tensors(8)
    x = x.float() / 255
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    save_model(path, model.eval(), model_meta(to_dict(cfg), "classifier", 10))
    return path


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str, prefix: str = "recipe"):
    """The module of ``experiments/<name>.py`` (its sibling ``_*_seed`` helpers importable)."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENTS))


def same_weights(a, b, atol: float = 1e-6) -> None:
    """Assert that two ``model.pt`` files hold the same parameters (to ``atol``)."""
    from rayrcm.train.checkpoint import load_model_file

    sa, sb = load_model_file(a)["model"], load_model_file(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol), k


def fails_in_one_line(capsys, argv: list[str], needle: str, *, before_ray: bool = True) -> str:
    """``rayrcm ARGV`` exits 2 with one ``rayrcm: error:`` line holding ``needle``; with
    ``before_ray``, without having asked for a Ray cluster (Ray may already run in this test process,
    started by another module's fixture, so the check is that no job reached ``ensure_ray``)."""
    from unittest import mock

    import pytest

    from rayrcm.cli import main

    def no_ray(**_kw):
        raise AssertionError("bad input reached Ray")

    with mock.patch("rayrcm.orchestration.cluster.ensure_ray", side_effect=no_ray) if before_ray else _nothing():
        with pytest.raises(SystemExit) as exit_:
            main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("rayrcm: error:") and needle in err, err
    return err


def _nothing():
    import contextlib

    return contextlib.nullcontext()
