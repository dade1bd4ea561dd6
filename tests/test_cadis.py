"""CADIS (FT-CADIS): the loss by hand, the residual attack against the authors' loop, the frozen
denoiser kept outside the trained weights, the exported denoised classifier, and a short Ray run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.errors import ConfigError
from rayrcm.models.denoised import DenoisedClassifier
from rayrcm.models.denoisers import EpsilonDiffusionDenoiser, WienerDenoiser
from rayrcm.models.export import build_from_blob
from rayrcm.objectives import build_objective
from rayrcm.objectives.cadis import (
    CADISObjective,
    attack_residual,
    cadis_loss,
    project_l2,
    recentre,
)
from rayrcm.train.checkpoint import model_meta


def _logits(*rows):
    return [torch.tensor([r], dtype=torch.float32) for r in rows]


Y0 = torch.tensor([0])


# --- the loss by hand (K = 2 classes, y = 0, M = 2) ---------------------------------------------


def test_one_correct_copy_counts_with_divisor_m():
    loss, terms = cadis_loss(_logits([2, 0], [0, 1]), _logits([0, 0], [0, 0]), Y0, lbd=4.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)) / 2, abs=1e-6)  # 0.063464
    assert loss.item() == pytest.approx(0.063464, abs=1e-6) and terms["madv"].item() == 0.0


@pytest.mark.parametrize("warm_start, expected", [(True, 0.656631), (False, 0.0)])
def test_no_correct_copy_keeps_the_lowest_ce_only_with_warm_start(warm_start, expected):
    loss, _ = cadis_loss(_logits([0, 1], [0, 2]), _logits([0, 0], [0, 0]), Y0, lbd=4.0, warm_start=warm_start)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    if warm_start:
        assert loss.item() == pytest.approx(math.log(1 + math.e) / 2, abs=1e-6)


def test_all_correct_adds_lbd_times_the_max_kl_to_the_mean_softmax():
    loss, terms = cadis_loss(_logits([2, 0], [1, 0]), _logits([0, 0], [1, 0]), Y0, lbd=4.0)
    assert loss.item() == pytest.approx(1.024387, abs=1e-6)
    assert terms["all_correct"].item() == 1.0


def test_the_mean_softmax_is_not_detached():
    """``F.kl_div`` backpropagates into its target: the adversarial term trains the clean logits too."""
    clean = [z.requires_grad_() for z in _logits([2, 0], [1, 0])]
    adv = _logits([0, 0], [1, 0])
    without, _ = cadis_loss(clean, adv, Y0, lbd=0.0)
    g0 = torch.autograd.grad(without, clean)
    with_adv, _ = cadis_loss(clean, adv, Y0, lbd=4.0)
    g1 = torch.autograd.grad(with_adv, clean)
    assert not torch.allclose(g0[0], g1[0]) and not torch.allclose(g0[1], g1[1])


# --- the attack ---------------------------------------------------------------------------------


class Linear(nn.Module):
    def __init__(self, d=48, k=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


def authors_attack(classifier, denoised_inputs, targets, clean, m, max_norm, steps):
    """``PGD.attack`` of FT-CADIS ``train.py`` (604-702), transcribed."""
    eta0 = denoised_inputs - clean
    eta = eta0.detach()
    b = denoised_inputs.size(0)
    mu0 = eta0.view(b, -1).mean(1).view(-1, 1, 1, 1)
    sigma0 = (eta0 ** 2).view(b, -1).mean(1).sqrt().view(-1, 1, 1, 1)
    alpha = max_norm / steps * 2
    for _ in range(steps):
        eta.requires_grad_()
        logits_chunk = torch.chunk(classifier(clean + eta), m, dim=0)
        loss = (sum(F.kl_div(F.log_softmax(z, dim=1), targets, reduction="none").sum(1) for z in logits_chunk) / m).sum()
        grad = torch.autograd.grad(loss, [eta])[0]
        grad = grad / (torch.norm(grad.reshape(b, -1), dim=1).view(-1, 1, 1, 1) + 1e-8)
        eta = eta + alpha * grad
        diff = (eta - eta0).renorm(p=2, dim=0, maxnorm=max_norm)
        eta = eta0 + diff
        mu = eta.view(b, -1).mean(1).view(-1, 1, 1, 1)
        sigma = (eta ** 2).view(b, -1).mean(1).sqrt().view(-1, 1, 1, 1)
        eta = mu0 + (eta - mu) / sigma * sigma0
        eta = eta.detach()
    return torch.cat(torch.chunk(eta, m, dim=0))


def _attack_inputs(m=2, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = (torch.rand(b, 3, 4, 4, generator=g) * 2 - 1).repeat(m, 1, 1, 1)
    denoised = (clean + 0.3 * torch.randn(clean.shape, generator=g)).clamp(-1, 1)
    p_bar = F.softmax(torch.randn(b, 3, generator=g), dim=1)
    return clean, denoised, p_bar


@pytest.mark.parametrize("steps, eps", [(1, 0.25), (4, 0.25), (3, 2.0)])
def test_attack_equals_the_authors_loop(steps, eps):
    f, (clean, denoised, p_bar) = Linear(), _attack_inputs()
    ours = attack_residual(f, clean, denoised - clean, p_bar, 2, eps, steps)
    theirs = authors_attack(f, denoised, p_bar, clean, 2, eps, steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_attack_preserves_the_residuals_mean_exactly_and_moves_it():
    f, (clean, denoised, p_bar) = Linear(), _attack_inputs()
    eta0 = denoised - clean
    eta = attack_residual(f, clean, eta0, p_bar, 2, 0.25, 4)
    torch.testing.assert_close(eta.flatten(1).mean(1), eta0.flatten(1).mean(1), rtol=0, atol=1e-6)
    assert (eta - eta0).flatten(1).norm(dim=1).min() > 1e-3
    kl = lambda e: sum(F.kl_div(F.log_softmax(z, 1), p_bar, reduction="none").sum(1) for z in f(clean + e).chunk(2))  # noqa: E731
    assert kl(eta).sum() > kl(eta0).sum()  # ascent on the attack's objective


def test_zero_steps_leave_the_denoised_inputs_unchanged():
    f, (clean, denoised, p_bar) = Linear(), _attack_inputs()
    eta0 = denoised - clean
    assert torch.equal(attack_residual(f, clean, eta0, p_bar, 2, 0.25, 0), eta0)


def test_projection_keeps_the_step_in_the_eps_ball_before_recentring():
    g = torch.Generator().manual_seed(3)
    eta0 = torch.randn(5, 3, 4, 4, generator=g)
    far = eta0 + 10 * torch.randn(5, 3, 4, 4, generator=g)
    near = eta0 + 1e-3 * torch.randn(5, 3, 4, 4, generator=g)
    assert ((project_l2(far, eta0, 0.25) - eta0).flatten(1).norm(dim=1) <= 0.25 + 1e-6).all()
    torch.testing.assert_close(project_l2(near, eta0, 0.25), near)  # inside the ball: unchanged
    mu0, s0 = eta0.flatten(1).mean(1).view(-1, 1, 1, 1), eta0.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)
    back = recentre(far, mu0, s0)
    torch.testing.assert_close(back.flatten(1).mean(1), mu0.flatten())
    # RMS is kept only when the mean is 0 (the code divides by the RMS, not the std)
    zero = recentre(far - far.flatten(1).mean(1).view(-1, 1, 1, 1), torch.zeros_like(mu0), s0)
    torch.testing.assert_close(zero.flatten(1).pow(2).mean(1).sqrt(), s0.flatten())


# --- the objective and its frozen denoiser --------------------------------------------------------


def _cfg(*extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), ["method.name=cadis", "method.sigma=0.5", "method.m=2", "method.steps=2",
                                                "data.image_size=8", "model.patch_size=4", "data.batch_size=4", *extra])


class Probe(nn.Module):
    """A classifier on [0, 1] images that records its mode and frozen state at every call."""

    def __init__(self, k=10):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, k)
        self.num_classes, self.calls = k, []

    def forward(self, x):
        self.calls.append((self.training, any(p.requires_grad for p in self.parameters())))
        return self.fc(x.flatten(1) * 4)


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 8, 8, generator=g)], torch.randint(0, 10, (b,), generator=g)


def test_classifier_is_frozen_in_eval_mode_during_the_attack_then_restored():
    clf = Probe()
    clf.fc.bias.requires_grad_(False)  # a frozen parameter stays frozen afterwards
    den = WienerDenoiser(torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.1))
    obj = CADISObjective(validate(_cfg(), check_paths=False).method, clf, den).train()
    views, y = _batch()
    out = obj(views, y, 0)
    assert clf.calls == [(True, True), (False, False), (False, False), (True, True)]  # clean, K=2 attack, adversarial
    assert clf.training and clf.fc.weight.requires_grad and not clf.fc.bias.requires_grad
    out.loss.backward()
    assert clf.fc.weight.grad is not None and math.isfinite(out.loss.item())


def test_zero_steps_feed_the_denoised_inputs_as_adversarial():
    torch.manual_seed(0)
    clf = Probe()
    seen = []
    clf.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    den = WienerDenoiser(torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.1))
    obj = CADISObjective(validate(_cfg("method.steps=0"), check_paths=False).method, clf, den)
    obj(*_batch(), 0)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=1e-6)  # x + (x_hat - x) = x_hat


def _tiny_ddpm_file(tmp_path):
    from rayrcm.models.denoisers import ddpm_denoiser
    from rayrcm.objectives.ddpm import DDPMConfig
    from rayrcm.train.checkpoint import save_model

    cfg = validate(apply_overrides(ExperimentConfig(), ["method.name=ddpm", "method.base_channels=4", "method.steps=100",
                                                        "method.channel_mults=1", "data.image_size=8"]), check_paths=False)
    assert isinstance(cfg.method, DDPMConfig)
    torch.manual_seed(0)
    den = ddpm_denoiser(cfg.method)
    path = tmp_path / "ddpm" / "model.pt"
    path.parent.mkdir()
    save_model(path, den, model_meta(to_dict(cfg), "denoiser", 10))
    return path, den


def test_diffusion_denoiser_gets_no_gradient_and_is_in_no_state_dict(tmp_path):
    path, saved = _tiny_ddpm_file(tmp_path)
    cfg = validate(_cfg(f"method.denoiser={path.parent}"), check_paths=False)
    obj = build_objective(cfg, 10)
    den = obj.denoiser
    assert isinstance(den, EpsilonDiffusionDenoiser)
    for a, b in zip(den.state_dict().values(), saved.state_dict().values()):
        assert torch.equal(a, b)
    den_ids = {id(p) for p in den.parameters()}
    assert den_ids and not den_ids & {id(p) for p in obj.parameters()}
    assert all(not p.requires_grad for p in den.parameters())
    out = obj(*_batch(), 0)
    out.loss.backward()
    assert all(p.grad is None for p in den.parameters())
    for state in (obj.state_dict(), obj.export().state_dict()):
        assert state and not any("eps_model" in k or "denoiser" in k for k in state)
    assert all(k.startswith("classifier.") for k in obj.export().state_dict())
    obj.double()  # .to() moves the held denoiser with the objective
    assert all(p.dtype == torch.float64 for p in den.parameters())
    den.train()
    obj.train()
    assert not den.training


def test_export_round_trips_as_a_denoised_classifier_that_refits_the_wiener(tmp_path):
    cfg = validate(_cfg(), check_paths=False)
    obj = build_objective(cfg, 10)
    model = obj.export()
    assert isinstance(model, DenoisedClassifier) and model.sigma == 0.5
    blob = {"model": model.state_dict(), "meta": model_meta(to_dict(cfg), cfg.method.export, 10)}
    assert blob["meta"]["export"] == "denoised_classifier" and blob["meta"]["stage"] == "classifier"
    rebuilt, _ = build_from_blob(blob)
    assert isinstance(rebuilt, DenoisedClassifier)
    torch.testing.assert_close(rebuilt.denoiser.mean, model.denoiser.mean)
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


def test_init_from_a_whole_classifier_loads_its_head(tmp_path):
    from rayrcm.models import build_classifier
    from rayrcm.train.checkpoint import save_model

    base = validate(apply_overrides(ExperimentConfig(), ["method.name=gaussian", "data.image_size=8", "model.patch_size=4"]),
                    check_paths=False)
    torch.manual_seed(5)
    clf = build_classifier(base.model, 8, 10)
    path = tmp_path / "clf.pt"
    save_model(path, clf, model_meta(to_dict(base), "classifier", 10))
    obj = build_objective(validate(_cfg(f"model.init_from={path}"), check_paths=False), 10)
    for k, v in clf.state_dict().items():
        assert torch.equal(obj.classifier.state_dict()[k], v), k


@pytest.mark.parametrize("extra, key", [
    (["method.m=0"], "method.m"),
    (["method.sigma=0"], "method.sigma"),
    (["method.steps=-1"], "method.steps"),
    (["method.eps=-0.1"], "method.eps"),
    (["method.denoiser=models:/ddpm@x"], "method.denoiser"),
    (["method.denoiser=adm:pkg.mod:make"], "method.denoiser_weights"),
])
def test_bad_values_are_one_line_errors(extra, key):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(*extra), check_paths=False)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_missing_denoiser_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="method.denoiser"):
        build_objective(validate(_cfg(f"method.denoiser={tmp_path / 'none.pt'}"), check_paths=False), 10)


def test_digits_recipe_keeps_the_cifar10_seed_values():
    """``train_cifar10.sh``: --num_noises 4 --lbd 4.0 --eps 64 (/256) --num-steps 4 --warm_start, blr 1e-4 at
    an effective batch of 128, --weight_decay 0.04 --weight_decay_end 0.4 --layer_decay 0.65 --clip_grad 0.3, 30 epochs, 3 of warm-up."""
    from helpers import load_experiment

    recipe = load_experiment("cadis_digits")
    cfg = validate(recipe.finetune_config("base.pt"), check_paths=False)
    m, o, t, d = cfg.method, cfg.optim, cfg.train, cfg.data
    assert (m.name, m.m, m.lbd, m.eps, m.steps, m.warm_start, m.sigma, m.denoiser) == \
        ("cadis", 4, 4.0, 0.25, 4, True, 0.5, "wiener_cov")
    assert (o.name, o.lr, o.weight_decay, o.weight_decay_end, o.layer_decay, o.grad_clip) == (
        "adamw", 1e-4 * 128 / 256, 0.04, 0.4, 0.65, 0.3)
    assert d.batch_size == 128 and t.epochs == 30 and o.warmup_epochs == 3
    assert tuple(t.eval_sigmas) == (0.5,) and cfg.model.init_from == "base.pt"
    assert validate(recipe.base_config(), check_paths=False).method.export == "classifier"


# --- a short real run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_run_on_ray_trains_and_exports_a_denoised_classifier(tmp_path, ray_cluster, mlflow_server):
    """A few steps on the bundled digits with a Wiener denoiser on two Ray Train workers (DDP around
    the classifier only), tracked in MLflow: the loss is finite and the exported model.pt rebuilds as
    a denoised classifier holding the classifier's weights only."""
    from rayrcm.models.export import build_from_file
    from rayrcm.orchestration.trainer import fit
    from rayrcm.train.checkpoint import load_model_file

    cfg = _cfg("data.batch_size=16", "train.steps=4", "train.workers=2", "train.checkpoint_every=2",
               "train.log_every=2", "train.eval_sigmas=0.5", f"train.storage_path={tmp_path / 'storage'}",
               "train.name=cadis-e2e", f"tracking.uri={mlflow_server}", "tracking.experiment=e2e-cadis")
    result = fit(cfg)
    assert math.isfinite(result.metrics["loss"]) and "sce" in result.metrics
    model, meta = build_from_file(result.model_file)
    assert meta["export"] == "denoised_classifier" and isinstance(model, DenoisedClassifier)
    assert isinstance(model.denoiser, WienerDenoiser) and model.sigma == 0.5
    assert all(k.startswith("classifier.") for k in load_model_file(result.model_file)["model"])
    logits = model.eval()(torch.rand(2, 3, 8, 8))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_digits_recipe_runs_the_whole_seed_pipeline_stage_by_stage(capsys):
    """denoiser (a ddpm trained here) -> DDS certify of the base classifier through it -> CADIS
    fine-tune -> certify of the fine-tuned f(D): each stage resolves (dry run), nothing reaches Ray."""
    from helpers import load_experiment

    recipe = load_experiment("cadis_digits")
    den = validate(recipe.denoiser_config(), check_paths=False)
    assert (den.method.name, den.method.schedule, den.method.steps, den.method.export) == ("ddpm", "cosine", 1000,
                                                                                          "denoiser")
    assert den.data.image_size == validate(recipe.base_config(), check_paths=False).data.image_size == 16
    recipe.main(["certify", "--from", "models:/cadis-digits@base", "--denoiser", "den/model.pt", "--dry-run"])
    dds = capsys.readouterr().out
    assert "model='models:/cadis-digits@base'" in dds and "denoiser='den/model.pt'" in dds and "sigma=0.5," in dds
    recipe.main(["certify", "--sigma", "0.25", "--dry-run"])
    tuned = capsys.readouterr().out
    assert "model='models:/cadis-digits@cadis-sigma-0_25'" in tuned and "denoiser=''" in tuned
    recipe.main(["finetune", "--denoiser", "den/model.pt", "--dry-run"])
    assert "denoiser: den/model.pt" in capsys.readouterr().out
