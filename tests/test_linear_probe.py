"""The linear-probe stage (``method.name=linear_probe``): a frozen encoder in eval mode, H linear
heads trained in parallel with their own learning rates, the best head selected on the held-out
split and exported as a plain classifier; one short run on a real Ray cluster and MLflow server,
a child of its pretraining run."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides, from_dict, to_dict, validate
from rayrcm.distributed import Collectives
from rayrcm.errors import ConfigError
from rayrcm.objectives import build_objective
from rayrcm.objectives.linear_probe import STABLEREP_LRS, fold_head, recipe
from rayrcm.train.checkpoint import model_meta, save_model
from rayrcm.train.loop import Loop
from rayrcm.train.optim import build_optimizer, build_scheduler


def _cfg(*extra: str, encoder: str = "cifar_resnet8") -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), ["method.name=linear_probe", "data.image_size=8", f"model.encoder={encoder}",
                                                "data.batch_size=64", "optim.name=sgd", "optim.weight_decay=0",
                                                "train.eval_sigmas=", *extra])


def _build(cfg: ExperimentConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_objective(cfg, 10)


def _batch(b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 8, 8, generator=g)], torch.randint(0, 10, (b,), generator=g)


def test_encoder_is_bit_identical_after_training_steps():
    """Weights and BatchNorm statistics of the encoder never move; the heads do."""
    cfg = _cfg("method.use_bn=true")
    obj = _build(cfg)
    encoder = copy.deepcopy(obj.classifier.encoder.state_dict())
    heads = copy.deepcopy(obj.heads.state_dict())
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    loop = Loop(obj, obj, opt, build_scheduler(opt, cfg.optim, 10), torch.device("cpu"))
    for step in range(3):
        loop.step(step, _batch(seed=step))
    assert not obj.classifier.encoder.training and obj.heads.training
    after = obj.classifier.encoder.state_dict()
    assert encoder.keys() == after.keys() and any("running_mean" in k for k in after)
    assert all(torch.equal(encoder[k], after[k]) for k in encoder)
    assert all(not p.requires_grad for p in obj.classifier.parameters())
    assert any(not torch.equal(heads[k], v) for k, v in obj.heads.state_dict().items())


def test_each_head_gets_exactly_the_gradient_of_its_own_cross_entropy():
    obj = _build(_cfg("method.use_bn=true"))
    (x,), y = _batch()
    obj([x], y, 0).loss.backward()
    for h, head in enumerate(obj.heads):
        alone = copy.deepcopy(head)
        F.cross_entropy(alone(obj.features(x)), y).backward()
        for p, q in zip(head.parameters(), alone.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-7), h


def test_param_group_lrs_are_the_base_lrs_times_the_global_batch_over_256():
    cfg = _cfg()  # the StableRep protocol: its 10 base lrs, lr = blr * B / 256
    obj = _build(cfg)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    assert len(opt.param_groups) == 10
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 64 / 256 for b in STABLEREP_LRS])
    assert all(g["nesterov"] is False and g["momentum"] == 0.9 and g["weight_decay"] == 0 for g in opt.param_groups)
    sched = build_scheduler(opt, cfg.optim, 100)  # per-step cosine: every group scaled alike
    sched.step_update(50)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * b * 64 / 256 for b in STABLEREP_LRS])
    # MoCo: one head at lr 10, no batch scaling, x0.1 at each milestone
    moco = _cfg("method.protocol=moco", "optim.schedule=step", "optim.milestones=5,8")
    obj = _build(moco)
    opt = build_optimizer(obj, obj.export(), moco.optim)
    sched = build_scheduler(opt, moco.optim, 10)
    assert [g["lr"] for g in opt.param_groups] == [10.0]
    sched.step_update(6)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    # overridable: two heads, lrs scaled by B / 128
    obj = _build(_cfg("method.base_lrs=0.1,0.4", "method.lr_batch=128"))
    assert obj.lrs == pytest.approx((0.05, 0.2)) and len(obj.heads) == 2


def _constant_heads(obj, classes: list[int]) -> None:
    """Head h always predicts class classes[h] (zero weights, one large bias)."""
    with torch.no_grad():
        for head, c in zip(obj.heads, classes):
            head[-1].weight.zero_()
            head[-1].bias.zero_()
            head[-1].bias[c] = 5.0


def _split(label: int, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.rand(3, 8, 8, generator=g),), label) for _ in range(n)]


def test_best_head_is_selected_on_validation_never_on_test(tmp_path):
    """Head 0 is right on the validation split, head 1 on the test split: the validator selects and
    exports head 0, and the test accuracy reported is head 0's (0), not the best head's on test (1)."""
    from rayrcm.train.selection import Validator, test_metrics

    cfg = _cfg("method.base_lrs=0.1,0.2", "train.select_metric=val_acc_clean")
    obj = _build(cfg)
    _constant_heads(obj, [3, 7])
    s = SimpleNamespace(cfg=cfg, val_set=_split(3), test_set=_split(7, seed=1), bank_set=None, objective=obj, device="cpu", rank=0, world=1,
                        comm=Collectives(), meta=model_meta(to_dict(cfg), "classifier", 10), work_dir=tmp_path)
    val = Validator(s)(1)
    assert val["val_head0_acc"] == 1.0 and val["val_head1_acc"] == 0.0
    assert (val["val_selected_head"], val["val_selected_lr"]) == (0.0, pytest.approx(0.1 * 64 / 256))
    assert val["val_acc_clean"] == 1.0
    assert test_metrics(s)["test_acc_clean"] == 0.0
    assert (obj.export()(torch.rand(4, 3, 8, 8)).argmax(1) == 3).all()


def test_batchnorm_without_affine_is_there_iff_enabled():
    with_bn, without = _build(_cfg("method.use_bn=true")), _build(_cfg())
    for head in with_bn.heads:
        bn = head[0]
        assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6 and len(head) == 2
    assert all(len(head) == 1 and isinstance(head[0], torch.nn.Linear) for head in without.heads)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in without.heads.modules())


def test_heads_start_from_normal_0_01_with_zero_bias():
    obj = _build(_cfg(encoder="vit_digits"))
    w = torch.cat([h[-1].weight.flatten() for h in obj.heads])
    assert w.numel() > 5000 and w.std().item() == pytest.approx(0.01, rel=0.05) and abs(w.mean().item()) < 1e-3
    assert all(torch.count_nonzero(h[-1].bias) == 0 for h in obj.heads)


def test_exported_classifier_equals_the_selected_head_with_batchnorm_folded():
    cfg = _cfg("method.use_bn=true")
    obj = _build(cfg)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    loop = Loop(obj, obj, opt, build_scheduler(opt, cfg.optim, 10), torch.device("cpu"))
    for step in range(3):
        loop.step(step, _batch(seed=step))
    obj.select(4)
    (x,), _ = _batch(seed=9)
    obj.eval()
    expected = obj.heads[4](obj.features(x))
    assert torch.allclose(obj.export()(x), expected, atol=1e-5)
    w, b = fold_head(obj.heads[4])
    assert torch.equal(obj.export().head.weight, w) and torch.equal(obj.export().head.bias, b)
    loop.step(3, _batch(seed=3))  # a step makes the exported head follow the selected head again
    obj.eval()
    assert torch.allclose(obj.export()(x), obj.heads[4](obj.features(x)), atol=1e-5)


def test_exported_model_predicts_classes_and_loads_through_the_certification_loader(tmp_path):
    from rayrcm.models.encoders import build_encoder
    from rayrcm.models.export import build_from_file
    from rayrcm.orchestration import certify_job

    torch.manual_seed(5)
    encoder = build_encoder(_cfg().model, 8)  # a "pretrained" encoder file, as a pretraining run exports it
    save_model(tmp_path / "encoder.pt", encoder, model_meta(to_dict(_cfg()), "encoder", 10))
    cfg = validate(_cfg("method.use_bn=true", f"model.init_from={tmp_path / 'encoder.pt'}"), check_paths=False)
    obj = _build(cfg)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in obj.classifier.encoder.state_dict().items())
    obj.select(2)
    path = tmp_path / "model.pt"
    save_model(path, obj.export(), model_meta(to_dict(cfg), cfg.method.export, 10))
    model, meta = build_from_file(path)
    assert meta["export"] == "classifier" and cfg.method.stage == "classifier"
    (x,), _ = _batch()
    model.eval()
    obj.eval()
    assert torch.allclose(model(x), obj.export()(x), atol=1e-6) and model(x).shape == (16, 10)
    p = certify_job.prepare(certify_job.config_from_args([f"model={path}", f"out_dir={tmp_path / 'cert'}",
                                                          "tracking.enabled=false", "smoothing.max=10"]))
    assert p.meta["num_classes"] == 10


@pytest.mark.parametrize("extra, key", [
    (["method.protocol=simclr"], "method.protocol"),
    (["method.base_lrs=0.1,-1"], "method.base_lrs"),
    (["method.lr_batch=-2"], "method.lr_batch"),
    (["method.init_std=-1"], "method.init_std"),
    (["model.init_from="], "model.init_from"),
    (["model.head_hidden_dim=32"], "model.head_hidden_dim"),
    (["data.mixup=0.2"], "data.mixup"),
    (["data.val_fraction=0"], "data.val_fraction"),  # 10 heads need a held-out split to choose among them
])
def test_bad_values_are_one_line_errors(extra, key):
    with pytest.raises(ConfigError) as err:
        validate(_cfg("model.init_from=enc.pt", *extra), check_paths=False)
    assert err.value.key == key and "\n" not in str(err.value)


def test_one_head_needs_no_validation_split():
    cfg = validate(_cfg("model.init_from=enc.pt", "method.protocol=moco", "data.val_fraction=0"), check_paths=False)
    assert cfg.method.head_lrs(128) == (10.0,)


@pytest.mark.parametrize("protocol", ["moco", "stablerep"])
def test_recipe_runs_the_seed_protocol(protocol):
    cfg = validate(from_dict(recipe(protocol, init_from="enc.pt", encoder="cifar_resnet20", data={"name": "digits"})),
                   check_paths=False)
    o = cfg.optim
    assert (cfg.method.name, o.name, o.momentum, o.weight_decay) == ("linear_probe", "sgd", 0.9, 0.0)
    assert cfg.train.select_metric == "val_acc_clean" and cfg.method.stage == "classifier"
    if protocol == "moco":
        assert (cfg.train.epochs, cfg.data.batch_size, o.schedule, o.milestone_epochs) == (60, 128, "step", (30, 40, 50))
        assert cfg.method.head_lrs(cfg.data.batch_size) == (10.0,)
    else:
        assert (cfg.train.epochs, cfg.data.batch_size, o.schedule, o.warmup_steps) == (90, 1024, "cosine", 0)
        assert cfg.method.head_lrs(cfg.data.batch_size) == pytest.approx(tuple(b * 4 for b in STABLEREP_LRS))
    short = from_dict(recipe(protocol, init_from="enc.pt", encoder="cifar_resnet20", epochs=6))
    if protocol == "moco":
        assert short.optim.milestone_epochs == (3, 4, 5)


@pytest.mark.slow
def test_probe_on_a_ray_cluster_is_a_child_of_its_pretraining_run(tmp_path, ray_cluster, mlflow_server):
    """2 steps of SimCLR pretraining (Ray Train local mode), then the StableRep-protocol probe (3 heads, BatchNorm) on 2 Ray
    Train workers from the pretraining's run id: the probe's MLflow run is a child of the pretraining
    run and logs each head's validation accuracy, the selected head and its test accuracy; the
    exported encoder is the pretrained one, bit for bit."""
    from mlflow import MlflowClient

    from rayrcm.models.export import build_from_file
    from rayrcm.orchestration.trainer import fit
    from rayrcm.train.checkpoint import load_model_file

    common = ["data.image_size=8", "model.encoder=vit_digits", "model.patch_size=4", "data.batch_size=64",
              f"train.storage_path={tmp_path / 'storage'}", f"tracking.uri={mlflow_server}",
              "tracking.experiment=e2e-linear-probe", "train.log_every=2", "train.eval_sigmas="]
    pre = fit(apply_overrides(ExperimentConfig(), [*common, "method.name=simclr", "train.steps=2",
                                                   "train.workers=0", "train.checkpoint_every=2", "optim.warmup_steps=0",
                                                   "train.name=lp-pretrain"]))
    cfg = apply_overrides(from_dict(recipe("stablerep", init_from=pre.run_id, encoder="vit_digits", use_bn=True,
                                           base_lrs=(0.05, 0.5, 5.0))),
                          [*common, "data.augmentation=none", "train.epochs=1", "train.checkpoint_epochs=0.5",
                           "train.workers=2", "train.name=lp-probe"])
    probe = fit(cfg)
    client = MlflowClient(mlflow_server)
    run = client.get_run(probe.run_id)
    assert run.data.tags["mlflow.parentRunId"] == pre.run_id
    m = run.data.metrics
    assert 0.0 <= m["test_acc_clean"] <= 1.0 and math.isfinite(m["test_acc_clean"])
    assert {"val_head0_acc", "val_head1_acc", "val_head2_acc", "val_selected_head", "val_selected_lr"} <= set(m)
    history = client.get_metric_history(probe.run_id, "val_acc_clean")
    assert len(history) >= 2  # every epoch and the end
    heads = [{p.step: p.value for p in client.get_metric_history(probe.run_id, f"val_head{h}_acc")} for h in range(3)]
    for point in client.get_metric_history(probe.run_id, "val_selected_head"):  # the best head on validation
        accs = [acc[point.step] for acc in heads]
        assert accs[int(point.value)] == max(accs)
    model, meta = build_from_file(probe.model_file)
    assert meta["export"] == "classifier" and model(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    pretrained = load_model_file(pre.model_file)["model"]
    probed = {k[len("encoder."):]: v for k, v in load_model_file(probe.model_file)["model"].items() if k.startswith("encoder.")}
    assert probed.keys() == pretrained.keys() and all(torch.equal(probed[k], pretrained[k]) for k in probed)
