"""Consistency regularization (Jeong & Shin 2020) as the RCM seed fine-tunes with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.objectives import build_objective
from rayrcm.objectives.consistency import consistency_loss
from rayrcm.train.optim import build_optimizer


def _cfg(name, *extra):
    return apply_overrides(ExperimentConfig(), [f"method.name={name}", "data.image_size=8", "model.patch_size=4", *extra])


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_consistency_loss_equals_a_hand_computation():
    z1 = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    z2 = np.array([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    y = np.array([0, 2])
    p1, p2 = _softmax(z1), _softmax(z2)
    mean = (p1 + p2) / 2
    ce = (-np.log(p1[[0, 1], y]).mean() - np.log(p2[[0, 1], y]).mean()) / 2
    kl = ((mean * (np.log(mean) - np.log(p1))).sum(1) + (mean * (np.log(mean) - np.log(p2))).sum(1)) / 2
    ent = -(mean * np.log(mean)).sum(1)
    expected = ce + 10.0 * kl.mean() + 0.5 * ent.mean()
    loss, terms = consistency_loss([torch.tensor(z1), torch.tensor(z2)], torch.tensor(y), lbd=10.0, eta=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms["kl"].item() == pytest.approx(kl.mean(), rel=1e-6) and terms["entropy"].item() == pytest.approx(ent.mean(), rel=1e-6)


def test_identical_copies_have_zero_kl_and_soft_targets_work():
    z = torch.randn(4, 5)
    soft = torch.softmax(torch.randn(4, 5), 1)
    loss, terms = consistency_loss([z, z.clone()], soft, lbd=3.0, eta=0.0)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx((-(soft * torch.log_softmax(z, 1)).sum(1)).mean().item(), rel=1e-6)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_with_lbd_and_eta_zero_it_is_gaussian_augmentation(m):
    torch.manual_seed(0)
    cons = build_objective(_cfg("consistency", "method.sigma=0.5", f"method.m={m}", "method.lbd=0", "method.eta=0"), 10)
    gauss = build_objective(_cfg("gaussian", "method.sigma=0.5"), 10)
    gauss.classifier.load_state_dict(cons.classifier.state_dict())
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    torch.manual_seed(7)
    got = cons([x], y, 0).loss
    torch.manual_seed(7)  # the same m draws, as one batch of m copies
    want = gauss([x.repeat(m, 1, 1, 1)], y.repeat(m), 0).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_the_m_copies_are_independent_draws_of_the_configured_pixel_std():
    obj = build_objective(_cfg("consistency", "method.sigma=0.25", "method.m=3"), 10)
    seen = []
    obj.classifier.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    x = torch.rand(64, 3, 8, 8)
    obj([x], torch.zeros(64, dtype=torch.long), 0)
    noise = (seen[0] - x.repeat(3, 1, 1, 1)).view(3, -1)  # measured from the batch the model saw
    assert noise.std(1).tolist() == pytest.approx([0.25] * 3, rel=0.02)
    corr = torch.corrcoef(noise)
    assert corr[~torch.eye(3, dtype=torch.bool)].abs().max().item() < 0.02


def test_head_stays_out_of_the_optimizer_unless_asked():
    for train_head in (False, True):
        cfg = _cfg("consistency", f"method.train_head={train_head}", "optim.layer_decay=0.65")
        torch.manual_seed(0)
        obj = build_objective(cfg, 10)
        opt = build_optimizer(obj, obj.export(), cfg.optim)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        head = [id(p) for p in obj.classifier.head.parameters()]
        assert all((h in in_opt) == train_head for h in head)
        before = [p.clone() for p in obj.classifier.head.parameters()]
        enc_before = [p.clone() for p in obj.classifier.encoder.parameters()]
        obj([torch.rand(8, 3, 8, 8)], torch.randint(0, 10, (8,)), 0).loss.backward()
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, obj.classifier.head.parameters())) != train_head
        assert any(not torch.equal(a, b) for a, b in zip(enc_before, obj.classifier.encoder.parameters()))


@pytest.mark.parametrize("override, needle", [("method.m=0", "method.m=0"), ("method.lbd=-1", "method.lbd=-1.0"),
                                              ("method.sigma=-0.5", "method.sigma=-0.5")])
def test_bad_consistency_values(override, needle):
    from rayrcm.config import validate
    from rayrcm.errors import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(_cfg("consistency", override))


def _fine_tune(method_overrides, steps=200):
    from rayrcm.data import MultiView, build_splits, build_transform
    from rayrcm.eval.accuracy import accuracies, count_correct
    from rayrcm.train.loop import Loop, batches_from, run_steps
    from rayrcm.train.optim import build_scheduler

    cfg = _cfg("gaussian", "data.batch_size=64", "optim.lr=1e-3", "optim.warmup_steps=20", f"train.steps={steps}",
               *method_overrides)
    splits = build_splits(cfg.data)
    train = MultiView(splits.train, [build_transform("none", 8)])
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    loop = Loop(obj, obj, opt, build_scheduler(opt, cfg.optim, steps), torch.device("cpu"), "fp32")
    run_steps(loop, batches_from(train, 64, 0, 1, 0, 0), start=0, total=steps, seed=0, rank=0, batch_size=64,
              log_every=steps, checkpoint_every=steps, on_log=lambda s, m: None, on_checkpoint=lambda s, m: None)
    counts = count_correct(obj.export(), MultiView(splits.test, [build_transform("none", 8)]), (0.5,), seed=3)
    return accuracies(counts, (0.5,))


@pytest.mark.slow
def test_noise_fine_tuning_beats_clean_fine_tuning_under_noise_on_digits():
    """Same data, steps, seed and initial weights: consistency fine-tuning at sigma = 0.5 is more
    accurate on sigma = 0.5 noisy test digits than plain fine-tuning without noise."""
    noisy = _fine_tune(["method.name=consistency", "method.sigma=0.5", "method.lbd=20", "method.eta=0.5"])
    clean = _fine_tune(["method.sigma=0"])
    assert noisy["test_acc_sigma_0.5"] > clean["test_acc_sigma_0.5"] + 0.1, (noisy, clean)
    assert clean["test_acc_clean"] > 0.5  # the clean model did learn
