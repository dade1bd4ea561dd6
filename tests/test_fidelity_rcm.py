"""RCM pretraining and fine-tuning against the authors' code (jiachenlei/rRCM), transcribed here.

Each test compares rayrcm with a short transcription of the authors' function (``rRCMloss`` and
``contrastive_loss`` of ``rrcm/rrcm_denoiser.py``, ``utils.ema``, ``moco_init_weights`` and
``_build_mlp`` of ``rrcm/vit.py``, ``reload_forward`` and ``FinetuneModel.find_nearest`` of
``rrcm_tune.py``, ``center_crop_arr`` and the MoCo v3 views of ``dataset.py``), or with values
computed by hand. Units: the authors' data and sigmas are on [-1, 1], ours on [0, 1] pixels
(``x_n = 2 x - 1``, ``sigma_n = 2 sigma``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.data.views import PILGaussianBlur, ShortSideCenterCrop, build_transform
from rayrcm.errors import ConfigError
from rayrcm.models import Classifier, MoCoV3Projector, build_encoder
from rayrcm.objectives import build_objective
from rayrcm.objectives.rcm import RCMConfig, ema_rate, level_index, num_levels, rcm_input_scale
from rayrcm.sections import ModelConfig


def _cfg(*extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), ["method.name=rcm", "data.image_size=8", "model.patch_size=4",
                                                "model.proj_hidden_dim=16", "model.proj_dim=8", *extra])


def _views(b: int = 8, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 8, 8, generator=g) for _ in range(3)], torch.zeros(b, dtype=torch.long)


# ----------------------------------------------------------------------------- the loss (items 1, 2)


def authors_contrastive_loss(f: torch.Tensor, f_target: torch.Tensor, tau: float) -> torch.Tensor:
    """``RepresentationKarrasDenoiser.contrastive_loss`` on one process: per-sample InfoNCE."""
    f = F.normalize(f.flatten(1), dim=1)
    f_target = F.normalize(f_target.flatten(1), dim=1)
    logits = torch.einsum("nc,ck->nk", [f, f_target.T])
    return torch.logsumexp(logits.float() / tau, dim=1) - logits.diagonal(0) / tau


def authors_rrcm_loss(model, target_model, x_start, x_aug, x_aug2, noise, indices, num_scales, *,
                      sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5, tau=0.2):
    """``rRCMloss`` (without the time token: rayrcm's encoders take none). Data on [-1, 1];
    ``model(x) -> (projection, cls)``. Returns (loss, contrastive, consistency), batch means."""

    def denoise(m, x_t, sigmas):
        c_in = 1 / (sigmas**2 + sigma_data**2) ** 0.5  # get_scalings_for_boundary_condition
        return m(c_in[:, None, None, None] * x_t)

    def karras(i):
        return (sigma_max ** (1 / rho) + i / (num_scales - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho

    t, t2, t0 = karras(indices), karras(indices + 1), karras(torch.full_like(indices, num_scales - 1))
    x_t0 = x_aug + noise * t0[:, None, None, None]
    x_t0_target = x_aug2 + noise * t0[:, None, None, None]
    h = denoise(model, x_t0, t0)[0]
    with torch.no_grad():
        h_target = denoise(target_model, x_t0_target, t0)[0]
    contrast = authors_contrastive_loss(h, h_target, tau)
    h = denoise(model, x_t0_target, t0)[0]
    with torch.no_grad():
        h_target = denoise(target_model, x_t0, t0)[0]
    contrast = contrast + authors_contrastive_loss(h, h_target, tau)
    x_t = x_start + noise * t[:, None, None, None]
    x_t2 = x_start + noise * t2[:, None, None, None]
    h = denoise(model, x_t, t)[1]
    h_target = denoise(model, x_t2, t2)[1].detach()
    consistency = authors_contrastive_loss(h, h_target, tau)
    return (contrast + consistency).mean(), contrast.mean(), consistency.mean()


def test_rcm_loss_equals_the_authors_rrcm_loss_with_its_symmetric_contrastive_term():
    cfg = _cfg("train.steps=100", "train.seed=3")
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    with torch.no_grad():  # a teacher different from the online network, so the two directions differ
        for p in obj.teacher_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (x, a1, a2), y = _views()
    step = 40
    torch.manual_seed(11)
    out = obj([x, a1, a2], y, step)
    torch.manual_seed(11)
    noise = torch.randn_like(x)  # the objective's first draw: one noise for every term

    def model(z):
        f = obj.encoder.forward_features(z)
        return obj.projector(f), f

    def teacher(z):
        f = obj.teacher_encoder.forward_features(z)
        return obj.teacher_projector(f), f

    levels = num_levels(step, 100, 20, 80)
    n = level_index(3, step, levels)
    idx = torch.full((x.shape[0],), n, dtype=torch.long)
    loss, contrast, consistency = authors_rrcm_loss(model, teacher, 2 * x - 1, 2 * a1 - 1, 2 * a2 - 1, noise, idx, levels)
    assert out.metrics["contrastive"].item() == pytest.approx(contrast.item(), rel=1e-5)
    assert out.metrics["consistency"].item() == pytest.approx(consistency.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    one_way = authors_contrastive_loss(model((2 * a1 - 1 + 0.002 * noise) / math.sqrt(0.002**2 + 0.25))[0],
                                       teacher((2 * a2 - 1 + 0.002 * noise) / math.sqrt(0.002**2 + 0.25))[0], 0.2).mean()
    assert abs(out.metrics["contrastive"].item() - one_way.item()) > 0.1  # the old, one-way term differs


def test_noise_level_index_is_one_per_step_for_the_whole_job():
    """Two workers (same train.seed, different global RNG states) use the same level at each step."""
    cfg = _cfg("train.steps=60", "train.seed=5")
    torch.manual_seed(0)
    a, b = build_objective(cfg, 10), build_objective(cfg, 10)
    views, y = _views(b=4)
    for step in range(0, 60, 3):
        torch.manual_seed(100 + step)
        level_a = a(views, y, step).metrics["sigma_level"]
        torch.manual_seed(999 + 7 * step)
        level_b = b(views, y, step).metrics["sigma_level"]
        assert level_a.item() == level_b.item()
    # uniform on {0, ..., N-2}, a function of (seed, step) only, different across seeds
    draws = [level_index(5, k, 21) for k in range(4000)]
    counts = np.bincount(draws, minlength=20)
    assert len(counts) == 20 and counts.min() > 150 and counts.max() < 250
    torch.manual_seed(1)
    assert [level_index(5, k, 21) for k in range(50)] == draws[:50]
    assert [level_index(6, k, 21) for k in range(50)] != draws[:50]


def test_teacher_ema_moves_parameters_only_and_keeps_its_own_batchnorm_statistics():
    """``utils.ema`` iterates ``named_parameters``: BatchNorm buffers of the target are its own."""
    cfg = _cfg("train.steps=100")
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    views, y = _views()
    obj(views, y, 0)  # both projectors run in training mode and move their running statistics
    online_bn = [m for m in obj.projector.modules() if isinstance(m, nn.BatchNorm1d)]
    teacher_bn = [m for m in obj.teacher_projector.modules() if isinstance(m, nn.BatchNorm1d)]
    teacher_stats = [m.running_mean.clone() for m in teacher_bn]
    before = [p.clone() for p in obj.teacher_projector.parameters()]
    with torch.no_grad():
        for p in obj.projector.parameters():
            p.add_(1.0)
    obj.on_step_end(0)
    rate = ema_rate(0, 100)
    for t0, t1, o in zip(before, obj.teacher_projector.parameters(), obj.projector.parameters()):
        assert torch.allclose(t1, rate * t0 + (1 - rate) * o, atol=1e-6)
    for m, stats, online in zip(teacher_bn, teacher_stats, online_bn):
        assert torch.equal(m.running_mean, stats) and not torch.equal(m.running_mean, online.running_mean)


def test_projector_is_the_authors_three_layer_bn_mlp():
    """``rRCMViT._build_mlp(3, D, hidden, out)``: Linear-BN-ReLU-Linear-BN-ReLU-Linear, no biases."""
    obj = build_objective(_cfg("model.proj_hidden_dim=32", "model.proj_dim=8"), 10)
    assert isinstance(obj.projector, MoCoV3Projector)
    layers = list(obj.projector.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    d = obj.encoder.num_features
    assert [(m.in_features, m.out_features, m.bias) for m in layers if isinstance(m, nn.Linear)] == [(d, 32, None), (32, 32, None), (32, 8, None)]


# ----------------------------------------------------------------------------- views (item 4)


def _steps(t):
    return list(t.transforms)


def test_mocov3_views_are_the_authors_asymmetric_pair():
    assert RCMConfig().views("mocov3") == ("center", "mocov3_1", "mocov3_2")
    assert RCMConfig().views("strong") == ("weak", "strong", "strong")  # the digits quickstart's views
    for kind, blur_p, solarize in (("mocov3_1", 1.0, False), ("mocov3_2", 0.1, True)):
        steps = _steps(build_transform(kind, 32, hflip=True))
        crop = next(s for s in steps if isinstance(s, v2.RandomResizedCrop))
        assert crop.size == (32, 32) and crop.scale == (0.08, 1.0) and v2.InterpolationMode(crop.interpolation) == v2.InterpolationMode.BILINEAR
        jitter = next(s for s in steps if isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], v2.ColorJitter))
        j = jitter.transforms[0]
        assert jitter.p == 0.8 and (j.brightness, j.contrast, j.saturation, j.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert next(s for s in steps if isinstance(s, v2.RandomGrayscale)).p == 0.2
        blur = next(s for s in steps if isinstance(s, v2.RandomApply) and isinstance(s.transforms[0], PILGaussianBlur))
        assert blur.p == blur_p and blur.transforms[0].sigma == (0.1, 2.0)
        sol = [s for s in steps if isinstance(s, v2.RandomSolarize)]
        assert (len(sol) == 1) == solarize and all(s.p == 0.2 and s.threshold == 128 for s in sol)
        assert next(s for s in steps if isinstance(s, v2.RandomHorizontalFlip)).p == 0.5
        order = [type(s).__name__ for s in steps]
        assert order.index("RandomResizedCrop") < order.index("RandomGrayscale") < order.index("RandomHorizontalFlip")


def test_blur_is_pils_gaussian_blur_with_the_radius_as_sigma():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for r in (0.1, 1.3, 2.0):
        ours = PILGaussianBlur((r, r))(img)
        assert np.array_equal(np.asarray(ours), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=r))))


def authors_center_crop_arr(pil_image, image_size):
    """``dataset.center_crop_arr`` (and ``rrcm_tune.ShortSideResizeCenterCrop``)."""
    if pil_image.size[0] == image_size and pil_image.size[1] == image_size:
        return np.array(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def test_center_view_is_the_authors_x_start():
    rng = np.random.default_rng(1)
    for w, h, size in ((300, 230, 64), (500, 375, 224), (48, 40, 24), (32, 32, 32)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert np.array_equal(np.asarray(ShortSideCenterCrop(size)(img)), authors_center_crop_arr(img, size))
        x = build_transform("center", size)(img)  # without flip: exactly the crop, as [0, 1] floats
        assert torch.allclose(x, torch.from_numpy(authors_center_crop_arr(img, size)).permute(2, 0, 1).float() / 255, atol=1e-6)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # CIFAR: identity plus flip
    plain = build_transform("none", 32)(img)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        x = build_transform("center", 32, hflip=True)(img)
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
        seen.add(torch.equal(x, plain))
    assert seen == {True, False}


# ----------------------------------------------------------------------------- encoder (item 5)


def test_mocov3_init_is_the_authors_moco_init_weights():
    torch.manual_seed(0)
    vit = build_encoder(ModelConfig(encoder="vit_digits", init="mocov3"), 16).model  # D = 128, patch 4
    d, p = 128, 4

    def check_uniform(w, bound):
        assert w.abs().max().item() <= bound + 1e-7 and w.abs().max().item() > 0.97 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)

    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):  # qkv as three (D, D) matrices; the rest xavier-uniform
            fan_out = m.weight.shape[0] // 3 if "qkv" in name else m.weight.shape[0]
            check_uniform(m.weight, math.sqrt(6.0 / (fan_out + m.weight.shape[1])))
            assert m.bias is None or not m.bias.any()
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    check_uniform(vit.patch_embed.proj.weight, math.sqrt(6.0 / (3 * p * p + d)))
    assert not vit.patch_embed.proj.bias.any()
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.1) and vit.cls_token.abs().max().item() < 1e-5
    timm_vit = build_encoder(ModelConfig(encoder="vit_digits"), 16).model  # timm's init is another one
    assert timm_vit.blocks[0].attn.qkv.weight.std().item() < 0.5 * math.sqrt(6.0 / (2 * d)) / math.sqrt(3)


def test_frozen_patch_embedding_gets_no_gradient_and_no_optimizer_slot():
    from rayrcm.train.optim import build_optimizer

    cfg = _cfg("model.freeze_patch_embed=true", "optim.weight_decay_all=true", "optim.weight_decay=0.03")
    obj = build_objective(cfg, 10)
    frozen = {n for n, q in obj.encoder.named_parameters() if not q.requires_grad}
    assert frozen == {"model.patch_embed.proj.weight", "model.patch_embed.proj.bias"}
    views, y = _views()
    obj(views, y, 0).loss.backward()
    assert obj.encoder.model.patch_embed.proj.weight.grad is None
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    in_opt = {id(q) for g in opt.param_groups for q in g["params"]}
    assert id(obj.encoder.model.patch_embed.proj.weight) not in in_opt
    assert id(obj.encoder.model.blocks[0].norm1.bias) in in_opt  # one group: every other parameter decays
    assert all(g["weight_decay"] == 0.03 for g in opt.param_groups)


def test_vit_options_are_refused_on_other_encoders():
    with pytest.raises(ConfigError, match="model.init"):
        build_encoder(ModelConfig(encoder="cifar_resnet8", init="mocov3"), 16)
    with pytest.raises(ConfigError, match="model.freeze_patch_embed"):
        build_encoder(ModelConfig(encoder="resnet18", freeze_patch_embed=True), 16)


# ----------------------------------------------------------------------------- fine-tuning (items 6, 7)


def authors_reload_forward(vit, x, layernorm):
    """``rrcm_tune.reload_forward`` on a timm ViT (no time token): the CLS token after the blocks,
    through the pretrained final norm only when ``layernorm``."""
    x = vit.patch_embed(x)
    x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + vit.pos_embed
    for blk in vit.blocks:
        x = blk(x)
    x = x[:, 0]
    return vit.norm(x) if layernorm else x


def test_final_norm_is_the_authors_layernorm_flag():
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(encoder="vit_digits"), 16)
    with torch.no_grad():  # a trained final norm, so that leaving it out is visible
        enc.model.norm.weight.uniform_(0.5, 2.0)
        enc.model.norm.bias.normal_()
    enc.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        for flag in (True, False):
            assert torch.allclose(enc.forward_features(x, final_norm=flag), authors_reload_forward(enc.model, x, flag), atol=1e-5)
        assert torch.allclose(enc.forward_features(x), enc.model(x), atol=1e-6)  # the default path is timm's
        pre = Classifier(enc, 10, final_norm=False).eval()
        post = Classifier(enc, 10, final_norm=True).eval()
        post.head.load_state_dict(pre.head.state_dict())
        z = 2 * x - 1
        assert torch.allclose(pre(x), pre.head(authors_reload_forward(enc.model, z, False)), atol=1e-5)
        assert torch.allclose(post(x), post.head(authors_reload_forward(enc.model, z, True)), atol=1e-5)
        assert not torch.allclose(pre(x), post(x), atol=1e-3)
    assert set(pre.state_dict()) == set(post.state_dict())  # same keys: files load either way
    with pytest.raises(ConfigError, match="model.final_norm"):
        Classifier(build_encoder(ModelConfig(encoder="cifar_resnet8"), 16), 10, final_norm=False)


class AuthorsFinetuneGrid:
    """``rrcm_tune.FinetuneModel``'s grid, ``find_nearest`` and ``get_sigma`` ([-1, 1] units)."""

    def __init__(self, num_scales, sigma_max=80.0, sigma_min=0.002):
        self.num_scales, self.sigma_max, self.sigma_min, self.rho = num_scales, sigma_max, sigma_min, 7
        self.sigmas = torch.tensor([self.sigma_max ** (1 / self.rho) + i / (num_scales - 1) * (
            self.sigma_min ** (1 / self.rho) - self.sigma_max ** (1 / self.rho)) for i in range(num_scales)]) ** self.rho

    def get_sigma(self, n):
        sigma = self.sigma_max ** (1 / self.rho) + n / (self.num_scales - 1) * (
            self.sigma_min ** (1 / self.rho) - self.sigma_max ** (1 / self.rho))
        return sigma**self.rho

    def find_nearest(self, t):
        return (t[:, None].expand(-1, self.num_scales) - self.sigmas[None, :].expand(t.shape[0], -1)).abs().argmin(dim=1)

    def c_in(self, noise_aug):  # FinetuneModel.forward: noise_aug 0 (clean) is the last level
        idx = self.find_nearest(torch.full((1,), noise_aug)) if noise_aug else torch.full((1,), self.num_scales - 1)
        t = self.get_sigma(idx)
        return float(1 / (t**2 + 0.5**2) ** 0.5)


def test_input_scale_uses_the_nearest_level_of_the_pretraining_grid():
    grid = AuthorsFinetuneGrid(81)
    for sigma in (0.0, 0.25, 0.5, 1.0):
        assert rcm_input_scale(sigma) == pytest.approx(grid.c_in(2 * sigma), rel=1e-6)
    small = AuthorsFinetuneGrid(41)  # another pretraining length: another grid
    assert rcm_input_scale(0.5, levels=41) == pytest.approx(small.c_in(1.0), rel=1e-6)
    exact = 1 / math.sqrt(1.0**2 + 0.25)  # the old c_in at the exact sigma is 2.8 % off at sigma 0.5
    assert rcm_input_scale(0.5) / exact - 1 == pytest.approx(0.0283, abs=5e-4)


def test_a_classifier_without_the_final_norm_is_rebuilt_without_it():
    """An exported ``final_norm=False`` classifier certifies as it trained: the file rebuilds it
    with the CLS token before the final LayerNorm; a file written before the option keeps the norm."""
    from rayrcm.config import to_dict
    from rayrcm.models.export import build_from_blob
    from rayrcm.train.checkpoint import model_meta

    cfg = apply_overrides(ExperimentConfig(), ["method.name=consistency", "model.final_norm=false"])
    torch.manual_seed(0)
    clf = build_objective(cfg, 10).export().eval()
    with torch.no_grad():
        clf.encoder.model.norm.weight.mul_(3.0)  # a final norm that changes the features
    meta = model_meta(to_dict(cfg), "classifier", 10)
    blob = {"model": clf.state_dict(), "meta": meta}
    rebuilt, _ = build_from_blob(blob)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), clf(x))
    assert rebuilt.final_norm is False
    old = {**meta, "config": {**meta["config"], "model": {k: v for k, v in meta["config"]["model"].items() if k != "final_norm"}}}
    assert build_from_blob({"model": clf.state_dict(), "meta": old})[0].final_norm is True
