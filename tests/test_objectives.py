"""Objectives: hand-computed values, properties, and a contract test over the whole registry."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.data.noise import add_gaussian_noise, karras_sigmas
from rayrcm.objectives import OBJECTIVES, build_objective
from rayrcm.objectives.contrastive import info_nce
from rayrcm.objectives.gaussian import soft_cross_entropy
from rayrcm.objectives.rcm import ema_rate, num_levels, rcm_input_scale


def test_info_nce_orthogonal_hand_value():
    b = 5
    q = torch.eye(b, 8)
    # each query matches its key (cos 1) and is orthogonal to the other b-1 keys (cos 0)
    assert info_nce(q, q.clone(), temperature=1.0).item() == pytest.approx(-math.log(math.e / (math.e + b - 1)), rel=1e-6)


def test_info_nce_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    q, k, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), 0.2
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(6):
        sims = torch.stack([qn[i] @ kn[j] for j in range(6)]) / t
        expected += -(sims[i] - torch.logsumexp(sims, 0))
    assert info_nce(q, k, t).item() == pytest.approx(expected.item() / 6, rel=1e-5)


def test_info_nce_rejects_bad_shapes():
    with pytest.raises(ValueError):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4), 0.2)


def test_karras_schedule_endpoints_and_order():
    s = karras_sigmas(21, 0.001, 40.0, 7.0)
    assert s[0].item() == pytest.approx(40.0, rel=1e-5) and s[-1].item() == pytest.approx(0.001, rel=1e-4)
    assert torch.all(s[1:] < s[:-1])
    # the seed's schedule on [-1, 1] data is exactly twice ours in pixel units
    assert torch.allclose(karras_sigmas(21, 0.002, 80.0) / 2, s, rtol=1e-5)


def test_num_levels_doubles_21_41_81():
    total = 300
    seen = [num_levels(k, total, 20, 80) for k in range(total + 1)]
    assert seen[0] == 21 and seen[-1] == 81
    assert sorted(set(seen)) == [21, 41, 81]
    assert all(a <= b for a, b in zip(seen, seen[1:]))


def test_ema_rate_ramp():
    assert ema_rate(0, 100) == pytest.approx(0.99)
    assert ema_rate(100, 100) == pytest.approx(0.9999)
    rates = [ema_rate(k, 100) for k in range(101)]
    assert all(a <= b + 1e-12 for a, b in zip(rates, rates[1:]))


def test_rcm_input_scale_matches_seed_preconditioning():
    # seed: c_in = 1/sqrt(s^2 + 0.25) with s the std on [-1, 1] data = 2 * pixel sigma, taken at the
    # nearest of the 81 pretraining levels: 0.5 -> level 53 = 0.4927073; clean (0) -> sigma_min 0.002
    assert rcm_input_scale(0.25) == pytest.approx(1 / math.sqrt(0.4927073**2 + 0.25), rel=1e-6)
    assert rcm_input_scale(0.0) == pytest.approx(1 / math.sqrt(0.002**2 + 0.25), rel=1e-6)


def test_gaussian_noise_has_the_configured_std():
    x = torch.full((64, 3, 16, 16), 0.5)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        noisy = add_gaussian_noise(x, sigma, generator=torch.Generator().manual_seed(1))
        assert (noisy - x).std().item() == pytest.approx(sigma, rel=0.02)
        assert (noisy - x).mean().abs().item() < 0.01 * sigma + 0.01


def _cfg(name: str, *extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [f"method.name={name}", "data.image_size=8", "model.patch_size=4",
                                                "model.proj_hidden_dim=16", "model.proj_dim=8", *extra])


def _views(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(cfg.method.views(cfg.data.augmentation))
    return [torch.rand(b, 3, 8, 8, generator=g) for _ in range(n)], torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_contract(name):
    """Every registered objective: finite loss, gradients reach every trainable parameter, seeded determinism."""
    cfg = _cfg(name)
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    twin = copy.deepcopy(obj)  # same state (BatchNorm statistics move during a training forward)
    views, y = _views(cfg)
    torch.manual_seed(1)
    out = obj(views, y, 0)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.metrics.values())
    out.loss.backward()
    missing = [n for n, p in obj.named_parameters() if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    torch.manual_seed(1)
    again = twin(views, y, 0)
    assert torch.equal(again.loss.detach(), out.loss.detach())
    if missing:  # a zero-initialised output layer (a diffusion UNet's) passes gradients upstream once it moved
        with torch.no_grad():
            for p in obj.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        obj.zero_grad()
        torch.manual_seed(1)
        obj(views, y, 0).loss.backward()
        missing = [n for n, p in obj.named_parameters() if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert not missing, f"no gradient reaches {missing[:5]}"


def test_rcm_terms_sum_and_teacher_gets_no_gradient_but_follows_ema():
    cfg = _cfg("rcm")
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    views, y = _views(cfg)
    out = obj(views, y, step=0)
    assert out.loss.item() == pytest.approx((out.metrics["contrastive"] + out.metrics["consistency"]).item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in obj.teacher_encoder.parameters())
    teacher_before = [p.clone() for p in obj.teacher_encoder.parameters()]
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(1.0)
    obj.on_step_end(0)
    rate = ema_rate(0, cfg.train.steps)
    for t0, t1, o in zip(teacher_before, obj.teacher_encoder.parameters(), obj.encoder.parameters()):
        assert torch.allclose(t1, rate * t0 + (1 - rate) * o, atol=1e-6)


def test_gaussian_sigma_zero_is_plain_cross_entropy():
    cfg = _cfg("gaussian", "method.sigma=0")
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    views, y = _views(cfg)
    expected = F.cross_entropy(obj.classifier(views[0]), y)
    assert obj(views, y, 0).loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gaussian_objective_adds_noise_of_its_sigma():
    cfg = _cfg("gaussian", "method.sigma=0.5")
    obj = build_objective(cfg, 10)
    seen = []
    obj.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x = torch.full((32, 3, 8, 8), 0.5)
    obj([x], torch.zeros(32, dtype=torch.long), 0)
    assert (seen[0] - x).std().item() == pytest.approx(0.5, rel=0.05)


def test_soft_cross_entropy_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    # softmax = [1/4, 3/4]; soft target [0.5, 0.5] -> -(0.5 log 1/4 + 0.5 log 3/4)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(logits, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(expected, rel=1e-6)
    assert soft_cross_entropy(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_method_config_switch_keeps_typed_fields():
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "method.sigma=0.5"])
    assert cfg.method.sigma == 0.5 and cfg.method.stage == "classifier"
    assert replace(cfg.method, sigma=1.0).sigma == 1.0
