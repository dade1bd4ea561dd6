"""Adversarial contrastive family, pure layer: losses against hand computations, attack properties,
dual BatchNorm, fine-tuning modes and one-line errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.attacks import PGDConfig, apgd_ce, autoattack_robust, pgd, pgd_ce, pgd_kl
from rayrcm.config import ExperimentConfig, apply_overrides, validate
from rayrcm.errors import ConfigError
from rayrcm.eval.robust import RobustEvalConfig, check_protocol, robust_counts
from rayrcm.models import DualBatchNorm, bn_route, build_encoder, convert_dual_bn, single_bn_state
from rayrcm.objectives import EpochContext, build_objective
from rayrcm.objectives.acl import acl_loss, dynacl_strength
from rayrcm.objectives.air import air_robust, air_standard
from rayrcm.objectives.contrastive import nt_xent


def _seed_cl(zi: torch.Tensor, zj: torch.Tensor, t: float) -> float:
    """The CL loss of seed 001, computed one view at a time with numpy."""
    z = np.concatenate([zi.numpy(), zj.numpy()])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    b, total = len(zi), 0.0
    for u in range(2 * b):
        pos = u + b if u < b else u - b
        sims = np.array([z[u] @ z[v] / t for v in range(2 * b) if v != u])
        total += -(z[u] @ z[pos] / t - np.log(np.exp(sims).sum()))
    return total / (2 * b)


def test_nt_xent_hand_values():
    b = 4
    z = torch.eye(b, 8)
    assert nt_xent(z, z.clone(), 1.0).item() == pytest.approx(-math.log(math.e / (math.e + 2 * b - 2)), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    zi, zj = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert nt_xent(zi, zj, 0.5).item() == pytest.approx(_seed_cl(zi, zj, 0.5), rel=1e-5)


def _np_log_softmax(s):
    s = s - s.max()
    return s - np.log(np.exp(s).sum())


def _cos_diag(a, b):
    a, b = a.numpy(), b.numpy()
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_air_terms_equal_the_seed_formulas_by_hand():
    g = torch.Generator().manual_seed(3)
    zo, zi, zj, zia, zja = (torch.randn(4, 3, generator=g) for _ in range(5))
    t = 0.5
    p_i, p_j = np.exp(_np_log_softmax(_cos_diag(zo, zi) / t)), np.exp(_np_log_softmax(_cos_diag(zo, zj) / t))
    assert air_standard(zo, zi, zj, t).item() == pytest.approx(float((p_i * np.log(p_i / p_j)).sum()), rel=1e-5)
    big_i = np.exp(_np_log_softmax(_cos_diag(zo, zia) / t)) * np.exp(_np_log_softmax(_cos_diag(zia, zi) / t))
    big_j = np.exp(_np_log_softmax(_cos_diag(zo, zja) / t)) * np.exp(_np_log_softmax(_cos_diag(zja, zj) / t))
    assert air_robust(zo, zi, zj, zia, zja, t).item() == pytest.approx(float((big_i * np.log(big_i / big_j)).sum()), rel=1e-5)
    assert air_standard(zo, zi, zi.clone(), t).item() == pytest.approx(0.0, abs=1e-7)  # identical views: no KL


def test_acl_loss_hand_value():
    assert acl_loss(torch.tensor(2.0), torch.tensor(3.0), 0.5).item() == pytest.approx(0.5 * 2 + 1.5 * 3)


def _cfg(name: str, *extra: str) -> ExperimentConfig:
    return validate(apply_overrides(ExperimentConfig(), [f"method.name={name}", "data.image_size=8", "model.encoder=cifar_resnet8",
                                                         "model.proj_hidden_dim=16", "model.proj_dim=8", *extra]))


def _views(n, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 8, 8, generator=g) for _ in range(n)]


def test_acl_with_weight_minus_one_is_cl_on_natural_views():
    """(1 - w) CL(nat) + (1 + w) CL(adv) at w = -1 is 2 CL(nat): CL's loss and gradient, doubled."""
    torch.manual_seed(0)
    cfg = _cfg("acl", "method.weight=-1", "method.dual_bn=false")
    acl = build_objective(cfg, 10)
    simclr = build_objective(_cfg("simclr"), 10)
    simclr.load_state_dict(acl.state_dict(), strict=True)
    xi, xj = _views(2)
    y = torch.zeros(6, dtype=torch.long)
    out, ref = acl([xi, xj], y, 0), simclr([xi, xj], y, 0)
    assert out.loss.item() == pytest.approx(2 * ref.loss.item(), rel=1e-6)
    # CL is NT-Xent of the natural projections (one batch of 2B views through the network)
    with torch.no_grad():
        zi, zj = copy.deepcopy(simclr).project(torch.cat([xi, xj])).split(6)
    assert ref.loss.item() == pytest.approx(nt_xent(zi, zj, 0.5).item(), rel=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for (name, a), (_, b) in zip(acl.named_parameters(), simclr.named_parameters()):
        assert torch.allclose(a.grad, 2 * b.grad, atol=1e-6), name


def test_air_with_zero_lambdas_equals_acl():
    torch.manual_seed(0)
    acl = build_objective(_cfg("acl", "method.weight=0.3"), 10)
    air = build_objective(_cfg("air", "method.weight=0.3", "method.dynamic=false", "method.lambda1=0", "method.lambda2=0"), 10)
    air.load_state_dict(acl.state_dict(), strict=True)
    xi, xj, x = _views(3)
    y = torch.zeros(6, dtype=torch.long)
    torch.manual_seed(5)
    a = acl([xi, xj], y, 0).loss
    torch.manual_seed(5)
    b = air([xi, xj, x], y, 0)
    assert b.loss.item() == pytest.approx(a.item(), rel=1e-6)
    assert b.metrics["air_standard"].item() > 0  # the terms are computed, only weighted by 0


def test_dynacl_schedule_matches_the_authors(tmp_path):
    # authors: strength = 1 - int((epoch - 1) / 50) * 50 / epochs for 1-based epochs; weight = 2/3 (1 - strength)
    for e1 in (1, 50, 51, 100, 101, 951, 1000):
        assert dynacl_strength(e1 - 1, 1000, 50) == pytest.approx(1 - int((e1 - 1) / 50) * 50 / 1000)
    obj = build_objective(_cfg("acl", "method.dynamic=true"), 10)
    assert obj.on_epoch(100, EpochContext(1000, [], [], tmp_path)).augmentation_strength == pytest.approx(0.9)
    assert obj.weight == pytest.approx(2 / 3 * 0.1)


def test_dual_bn_keeps_separate_statistics_and_exports_one_branch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    plain = copy.deepcopy(net)
    assert convert_dual_bn(net) == 1 and isinstance(net[1], DualBatchNorm)
    net.train()
    with bn_route(net, "adv"):
        net(torch.randn(8, 3, 6, 6) * 5 + 3)
    net(torch.randn(8, 3, 6, 6))
    assert not torch.allclose(net[1].nat.running_mean, net[1].adv.running_mean)
    plain.load_state_dict(single_bn_state(net, "adv"), strict=True)
    net.eval()
    plain.eval()
    x = torch.randn(2, 3, 6, 6)
    with bn_route(net, "adv"):
        assert torch.allclose(net(x), plain(x))
    assert net[1].route == "nat"  # the context restores the route


def test_acl_export_is_a_plain_encoder_with_the_adversarial_branch():
    cfg = _cfg("acl")
    obj = build_objective(cfg, 10)
    obj.train()
    obj(_views(2), torch.zeros(6, dtype=torch.long), 0)
    enc = obj.export()
    fresh = build_encoder(cfg.model, 8)
    fresh.load_state_dict(enc.state_dict(), strict=True)
    obj.eval()
    enc.eval()
    x = _views(1)[0]
    with torch.no_grad(), bn_route(obj, "adv"):
        assert torch.allclose(obj.encoder.forward_features(obj.normalize(x)), enc(obj.normalize(x)), atol=1e-6)


@pytest.mark.parametrize("norm,eps,step", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
def test_pgd_stays_in_the_ball_and_pixel_range_and_raises_the_loss(norm, eps, step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    x_adv = pgd_ce(model, x, y, PGDConfig(norm, eps, step, 10))
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.1
    x_kl = pgd_kl(model, x, PGDConfig(norm, eps, step, 5))
    assert ((x_kl - x).flatten(1).abs().amax(1) <= eps + 1e-6).all()


def test_contrastive_pgd_raises_the_contrastive_loss_of_the_pair():
    obj = build_objective(_cfg("acl"), 10)
    obj.eval()
    xi, xj = _views(2, b=8)
    with torch.no_grad(), bn_route(obj, "adv"):
        before = nt_xent(obj.project(xi), obj.project(xj), 0.5)
    torch.manual_seed(0)
    ai, aj = obj.adversarial_views(xi, xj)
    with torch.no_grad(), bn_route(obj, "adv"):
        after = nt_xent(obj.project(ai), obj.project(aj), 0.5)
    assert after > before
    assert (ai - xi).abs().max() <= 8 / 255 + 1e-6 and (aj - xj).abs().max() <= 8 / 255 + 1e-6
    assert not obj.training  # the attack restores the mode it found


def test_pgd_with_zero_steps_or_zero_eps_returns_the_input():
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(pgd(lambda a: a.sum(), [x], PGDConfig(steps=0))[0], x)
    assert torch.equal(pgd(lambda a: a.sum(), [x], PGDConfig(eps=0.0))[0], x)


@pytest.fixture(scope="module")
def digits_model():
    """A small BatchNorm classifier trained on the bundled digits for a few seconds (seeded)."""
    from rayrcm.data import MultiView, build_splits
    from rayrcm.data.views import build_transform
    from rayrcm.models import build_classifier

    torch.manual_seed(0)
    cfg = apply_overrides(ExperimentConfig(), ["model.encoder=cifar_resnet8"])
    splits = build_splits(cfg.data)
    tf = [build_transform("none", 16)]
    train = torch.utils.data.DataLoader(MultiView(splits.train, tf), batch_size=64, shuffle=True)
    model = build_classifier(cfg.model, 16, 10)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        for (x,), y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    test = MultiView(splits.test, tf)
    x, y = next(iter(torch.utils.data.DataLoader(test, batch_size=200)))
    return model, x[0], y


def test_apgd_is_at_least_as_strong_as_pgd_on_a_trained_model(digits_model):
    model, x, y = digits_model
    eps = 2 / 255
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    torch.manual_seed(0)
    pgd_acc = (model(pgd_ce(model, x, y, PGDConfig("linf", eps, eps / 4, 20))).argmax(1) == y).float().mean().item()
    torch.manual_seed(0)
    apgd_acc = ((model(x).argmax(1) == y) & apgd_ce(model, x, y, eps=eps, n_iter=20)).float().mean().item()
    torch.manual_seed(0)
    aa_acc = autoattack_robust(model, x, y, eps=eps, n_iter=20).float().mean().item()
    assert clean > 0.8
    assert 0.05 < pgd_acc < clean  # the budget leaves something to find
    assert apgd_acc <= pgd_acc and aa_acc <= apgd_acc


def test_robust_eval_protocol_refuses_misuse(digits_model):
    model, x, y = digits_model
    with pytest.raises(ValueError, match="probabilities"):
        check_protocol(nn.Sequential(model, nn.Softmax(1)).eval(), x[:8])
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            check_protocol(model, x[:8])
    finally:
        model.eval()
    ds = torch.utils.data.TensorDataset(x[:20], y[:20])
    counts = robust_counts(model, ds, RobustEvalConfig(eps=2 / 255, pgd_steps=5, aa_iters=5, aa_targets=3, aa_queries=50))
    assert counts[0] == 20 and counts[1] >= counts[2] >= counts[3] >= counts[4]  # SA, PGD, APGD bound, AutoAttack
    assert not model.training


def test_frozen_encoder_is_unchanged_by_slf_and_alf_steps():
    for mode in ("slf", "alf", "aff"):
        torch.manual_seed(0)
        obj = build_objective(_cfg("adv_finetune", f"method.mode={mode}", "method.pgd_steps=2"), 10)
        before = copy.deepcopy(obj.classifier.encoder.state_dict())
        opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.1)
        obj.train()
        out = obj(_views(1), torch.randint(0, 10, (6,)), 0)
        out.loss.backward()
        opt.step()
        after = obj.classifier.encoder.state_dict()
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (mode != "aff"), mode  # weights and BatchNorm statistics
        if mode == "aff":
            assert {"trades_natural", "trades_kl"} <= set(out.metrics)


@pytest.mark.parametrize("override,key", [
    ("method.eps=-0.1", "method.eps"),
    ("method.norm=l3", "method.norm"),
    ("method.lambda1=-1", "method.lambda1"),
    ("method.lambda2=-0.5", "method.lambda2"),
    ("method.pgd_steps=-1", "method.pgd_steps"),
    ("method.temperature=0", "method.temperature"),
])
def test_bad_contrastive_inputs_fail_with_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        _cfg("air", override)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


@pytest.mark.parametrize("override,key", [("method.mode=all", "method.mode"), ("method.eps=-1", "method.eps"),
                                          ("method.norm=linf2", "method.norm"), ("method.beta=-1", "method.beta")])
def test_bad_finetune_inputs_fail_with_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        _cfg("adv_finetune", override)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
