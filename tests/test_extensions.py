"""The extension points work without touching rayrcm's files: this module registers a toy method,
a toy evaluation and a toy export kind, names itself as a plugin, and runs them through a real
one-worker Ray Train run and a Ray Data certification of the exported model. Old model files
still load, and unreadable ones fail with one line naming the version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.errors import ConfigError
from rayrcm.eval import EVALUATIONS, Evaluation, build_evaluations, evaluate
from rayrcm.models import build_classifier
from rayrcm.models.export import EXPORTS, ExportKind, build_from_blob, build_from_file, model_config
from rayrcm.models.export import _classifier as plain_classifier
from rayrcm.objectives import OBJECTIVES, LossOutput, MethodConfig, Objective
from rayrcm.train.checkpoint import model_meta, save_model

PLUGIN = __file__


# ----------------------------------------------------------------------------- the toy extensions


class Gain(nn.Module):
    """A learned input gain in front of a classifier: a composite export with its own weights."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier((x * self.gain).clamp(0, 1))


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    export: ClassVar[str] = "toy_gain_classifier"
    name: str = "toy_ce"
    noise: float = 0.1


class ToyObjective(Objective):
    """CE of the composite on noisy inputs."""

    def __init__(self, cfg: ToyConfig, net: Gain) -> None:
        super().__init__()
        self.cfg, self.net = cfg, net

    def forward(self, views: list[torch.Tensor], target: torch.Tensor, step: int) -> LossOutput:
        logits = self.net(views[0] + self.cfg.noise * torch.randn_like(views[0]))
        return LossOutput(F.cross_entropy(logits, target), {"gain": self.net.gain.detach()})

    def export(self) -> nn.Module:
        return self.net


def _build_toy(cfg: Any, num_classes: int) -> ToyObjective:
    return ToyObjective(cfg.method, Gain(build_classifier(cfg.model, cfg.data.image_size, num_classes)))


class Confident(Evaluation):
    """``<prefix>_toy_confident``: the fraction of images whose top softmax probability exceeds ``level``."""

    def __init__(self, level: float) -> None:
        self.level = level

    def metric_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_toy_confident"]

    @torch.no_grad()
    def counts(self, model, dataset, *, device="cpu", rank=0, world=1, seed=0) -> torch.Tensor:
        counts = torch.zeros(2, dtype=torch.long)
        model.eval()
        for i in range(rank, len(dataset), world):
            (x, *_), _ = dataset[i]
            counts[0] += 1
            counts[1] += int(F.softmax(model(x[None].to(device)), 1).max() > self.level)
        return counts

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        return {f"{prefix}_toy_confident": float(counts[1]) / max(int(counts[0]), 1)}


if "toy_ce" not in OBJECTIVES:  # the test module and its plugin import are one module; be safe anyway
    OBJECTIVES.register("toy_ce")((ToyConfig, _build_toy))
    EVALUATIONS.register("toy_confident")(lambda cfg: Confident(0.5))
    EXPORTS.register("toy_gain_classifier")(ExportKind(lambda meta: Gain(plain_classifier(meta)), predicts_classes=True))


# ----------------------------------------------------------------------------- tests


def _toy_cfg(tmp_path, *extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [
        f"train.plugins={PLUGIN}", "method.name=toy_ce", "data.image_size=8", "model.patch_size=4", "data.batch_size=32",
        "train.steps=6", "train.workers=1", "train.checkpoint_every=3", "train.log_every=3", "train.eval_sigmas=0.25",
        "train.evals=noisy,toy_confident", "train.select_metric=val_toy_confident", "optim.lr=0.003",
        f"train.storage_path={tmp_path / 'storage'}", "train.name=toy", "tracking.enabled=false", *extra])


def test_toy_extensions_validate_and_evaluate_in_one_process(tmp_path):
    cfg = validate(_toy_cfg(tmp_path))
    assert cfg.method.stage == "classifier"  # its export kind predicts classes
    evs = build_evaluations(cfg.train.evals, cfg)
    assert [m for ev in evs for m in ev.metric_names("val")] == ["val_acc_clean", "val_acc_sigma_0.25", "val_toy_confident"]
    with pytest.raises(ConfigError, match="train.select_metric"):
        validate(_toy_cfg(tmp_path, "train.evals=noisy"))  # the selected metric must be computed
    with pytest.raises(ConfigError, match="train.evals"):
        validate(_toy_cfg(tmp_path, "train.evals=nosuch"))


def test_sharded_counts_add_up_to_the_whole(tmp_path):
    from rayrcm.data import MultiView, build_splits
    from rayrcm.data.views import build_transform

    torch.manual_seed(0)
    model = build_classifier(model_config({"config": {"model": {"encoder": "vit_digits", "patch_size": 4}}}), 8, 10).eval()
    ds = MultiView(torch.utils.data.Subset(build_splits(_toy_cfg(tmp_path).data).test, range(40)), [build_transform("none", 8)])
    ev = [Confident(0.2)]
    whole = evaluate(ev, model, ds, prefix="test")
    shards = [ev[0].counts(model, ds, rank=r, world=3) for r in range(3)]
    assert whole == ev[0].metrics(sum(shards), "test")


def test_old_model_files_load_and_foreign_ones_fail_in_one_line(tmp_path):
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "data.image_size=8", "model.patch_size=4"])
    net = build_classifier(cfg.model, 8, 10)
    meta = model_meta(to_dict(cfg), "classifier", 10)
    old = {k: v for k, v in meta.items() if k != "export"}  # written before export kinds existed
    save_model(tmp_path / "old.pt", net, old)
    model, got = build_from_file(tmp_path / "old.pt")
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(model.eval()(x), net.eval()(x)) and got["stage"] == "classifier"
    with pytest.raises(ConfigError) as err:
        build_from_blob({"model": {}, "meta": {"code_version": "0.0.1"}})
    assert "rayrcm 0.0.1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not registered"):
        build_from_blob({"model": net.state_dict(), "meta": {**meta, "export": "nosuch"}})


SUITE_PLUGIN = """
from rayrcm.eval.suites import EVALUATE_SUITES
from rayrcm.eval.suites.clean import CleanSuite

EVALUATE_SUITES.register("toy-clean")(CleanSuite())
"""


def test_an_evaluate_suite_of_a_plugin_passes_validation(tmp_path, monkeypatch):
    """``rayrcm evaluate`` loads ``--plugin`` modules before it validates: a suite a plugin registers is
    accepted (the job then goes on to the model, missing here), and refused without the plugin."""
    import sys
    from dataclasses import replace

    from rayrcm.eval.suites import EVALUATE_SUITES
    from rayrcm.eval.suites.config import EvaluateConfig
    from rayrcm.orchestration.evaluate_prepare import prepare
    from rayrcm.sections import TrackingConfig

    monkeypatch.setattr(EVALUATE_SUITES, "_items", dict(EVALUATE_SUITES._items))  # the toy suite leaves with the test
    monkeypatch.setattr(sys, "path", list(sys.path))
    plugin = tmp_path / "toy_suite_plugin.py"
    plugin.write_text(SUITE_PLUGIN)
    cfg = EvaluateConfig(model=str(tmp_path / "missing.pt"), suite=("toy-clean",), out_dir=str(tmp_path / "out"),
                         tracking=TrackingConfig(enabled=False))
    try:
        with pytest.raises(ConfigError) as refused:
            prepare(cfg)
        assert refused.value.key == "suite" and "toy-clean" in str(refused.value)
        with pytest.raises(ConfigError) as past:
            prepare(replace(cfg, plugins=(str(plugin),)))
        assert past.value.key == "model", str(past.value)  # validation passed: the missing model is what stops it
    finally:
        sys.modules.pop("toy_suite_plugin", None)


@pytest.mark.slow
def test_toy_method_evaluation_and_export_through_ray_train_and_certification(tmp_path, ray_cluster):
    from rayrcm.orchestration import certify_job
    from rayrcm.orchestration.trainer import fit

    result = fit(_toy_cfg(tmp_path))
    m = result.metrics
    assert 0 <= m["val_toy_confident"] <= 1 and m["selected_step"] in (3.0, 6.0)
    assert m["selected_value"] >= m["val_toy_confident"]  # the best of steps 3 and 6 is kept, not the last
    assert "test_acc_clean" in m and "test_toy_confident" not in m  # test_evals stays the default
    model, meta = build_from_file(result.model_file)
    assert isinstance(model, Gain) and meta["export"] == "toy_gain_classifier" and meta["method"] == "toy_ce"
    cert = certify_job.run(certify_job.config_from_args([
        f"model={result.model_file}", f"plugins={PLUGIN}", f"out_dir={tmp_path / 'cert'}", "name=toy-cert",
        "tracking.enabled=false", "smoothing.sigma=0.25", "smoothing.n0=20", "smoothing.n=200", "smoothing.chunk=100",
        "smoothing.skip=60", "compute.workers=1", "compute.batch=100"]), show_table=False)
    assert len(cert.rows) == 6 and set(cert.rows["predict"]) <= set(range(-1, 10))
    assert (cert.rows["radius"] >= 0).all()
