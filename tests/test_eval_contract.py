"""The contract of every registered training evaluation (:mod:`rayrcm.eval.base`): integer counts
per shard that add up over shards (each image counted once; the noisy ones draw per shard, so
their sums are equal in distribution), metrics named as announced, the model's mode left as it was; and the ``certified`` evaluation's numbers against the sequential procedure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayrcm.certify.sequential import CERTIFIED, certify_sequential
from rayrcm.certify.smoothing import Smoother
from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.eval import EVALUATIONS, build_evaluations
from rayrcm.eval.certified import CertifiedAccuracy
from rayrcm.models import build_classifier


class _Images(torch.utils.data.Dataset):
    """Eight 8 px images in [0, 1] with labels, as ``((view,), label)``."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(8, 3, 8, 8, generator=g), torch.arange(8) % 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i],), int(self.y[i])


def _cfg():
    return apply_overrides(ExperimentConfig(), [
        "method.name=gaussian", "data.image_size=8", "model.patch_size=4", "train.eval_sigmas=0.5", "train.eval_votes=3",
        "train.eval_max_n=500", "train.eval_radii=0,0.1"])


@pytest.mark.parametrize("name", sorted(EVALUATIONS.names()))
def test_every_evaluation_counts_add_over_shards_and_name_its_metrics(name):
    cfg = _cfg()
    ev = build_evaluations([name], cfg, reference=_Images())[0]
    if name == "robust":  # keep the attacks short here; their numbers are tested in their own module
        ev.cfg = type(ev.cfg)(**{**ev.cfg.__dict__, "pgd_steps": 2, "autoattack": False})
    torch.manual_seed(0)
    model = build_classifier(cfg.model, 8, 3).train()
    data = _Images()
    whole = ev.counts(model, data, seed=3)
    halves = ev.counts(model, data, rank=0, world=2, seed=3) + ev.counts(model, data, rank=1, world=2, seed=3)
    assert whole.dtype == torch.long and model.training  # int64 counts; the model's mode restored
    assert whole.shape == halves.shape and whole[0] == halves[0] == len(data)  # every image counted once
    if name in ("certified", "knn"):  # noise seeded by image (or none): the very same counts on any number of workers
        assert torch.equal(whole, halves)
    metrics = ev.metrics(whole, "val")
    assert set(ev.metric_names("val")) <= set(metrics) and all(k.startswith("val_") for k in metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ev.metric_names("val") if "_acc" in k or k.endswith(("_sa",)))


@pytest.mark.parametrize("name", [n for n in sorted(EVALUATIONS.names())
                                  if build_evaluations([n], _cfg())[0].on_features])
def test_every_feature_evaluation_takes_an_encoder_too(name):
    """What ``train.encoder_evals`` may name runs on an encoder (a pretraining stage's export)."""
    from rayrcm.models.encoders import build_encoder

    cfg = _cfg()
    ev = build_evaluations([name], cfg, reference=_Images())[0]
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, 8).train()
    counts = ev.counts(encoder, _Images())
    assert counts.dtype == torch.long and counts[0] == 8 and encoder.training
    assert set(ev.metric_names("val")) <= set(ev.metrics(counts, "val"))


class _Fixed(nn.Module):
    """Always class 1 on bright images (mean > 0.5), else class 0: p_y is 0 or 1 up to the noise."""

    def forward(self, x):
        bright = (x.flatten(1).mean(1) > 0.5).long()
        return nn.functional.one_hot(bright, 2).float()


def test_certified_accuracy_is_the_sequential_decision_per_image():
    data = _Images()
    data.y = torch.tensor([int(x.mean() > 0.5) for x in data.x])
    data.y[:2] = 1 - data.y[:2]  # two images whose label the model never predicts
    ev = CertifiedAccuracy([0.25], [0.0, 0.1], max_n=1000, alpha=0.001)
    model = _Fixed()
    counts = ev.counts(model, data, seed=2)
    sm = Smoother(model, 2, 0.25, batch=2000, device="cpu")
    want = [certify_sequential(sm, data.x[i], int(data.y[i]), radii=[0.0, 0.1], alpha=0.001, n_max=1000,
                               seed=2 * 1_000_003, index=i, chunk=1000) for i in range(8)]
    assert counts[0] == 8 and counts[1] == sum(w.decisions[0] == CERTIFIED for w in want)
    assert counts[2] == sum(w.decisions[1] == CERTIFIED for w in want) and counts[3] == sum(w.samples for w in want)
    m = ev.metrics(counts, "val")
    assert m["val_certified_acc_sigma_0.25_r0"] == float(counts[1]) / 8 <= 6 / 8  # the two mislabelled ones never count


def test_certified_eval_settings_are_checked_in_one_line():
    from rayrcm.config import validate
    from rayrcm.errors import ConfigError

    base = ["method.name=gaussian", "train.evals=noisy,certified"]
    for extra, needle in ((["train.eval_max_n=150"], "train.eval_max_n"), (["train.eval_radii=0.5,0.25"], "increasing"),
                          (["train.eval_radii=0,0.9"], "raise train.eval_max_n"), (["train.eval_alpha=0"], "train.eval_alpha")):
        with pytest.raises(ConfigError, match=needle) as err:
            validate(apply_overrides(ExperimentConfig(), base + extra))
        assert "\n" not in str(err.value)
    ok = validate(apply_overrides(ExperimentConfig(), base + ["train.select_metric=val_certified_acc_sigma_0.25_r0.25"]))
    assert ok.train.select_metric == "val_certified_acc_sigma_0.25_r0.25"
