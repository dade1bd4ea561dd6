"""DDPM denoiser objective: hand-computed eps-MSE values, training lowers it, the export is a DDS denoiser."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rayrcm.data.datasets import digits_tensors
from rayrcm.errors import ConfigError
from rayrcm.models.denoisers import EpsilonDiffusionDenoiser, ddpm_denoiser, denoiser_from_meta
from rayrcm.models.unet import SmallUNet, timestep_embedding
from rayrcm.objectives.ddpm import DDPMConfig, DDPMObjective, ddpm_loss
from rayrcm.train.checkpoint import load_model_file, model_meta, save_model


class Const(torch.nn.Module):
    """eps_theta(x_t, t) = x_t (``identity``) or 0."""

    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.identity = identity

    def forward(self, x_t, t):
        return x_t if self.identity else torch.zeros_like(x_t)


def test_ddpm_loss_hand_values():
    abar = DDPMConfig().diffusion().alphas_cumprod()
    noise = torch.tensor([1.0, -2.0, 0.0, 3.0]).view(1, 1, 2, 2)
    x = torch.full((1, 1, 2, 2), 0.75)
    # eps_theta = 0: L = mean(eps^2) = (1 + 4 + 0 + 9) / 4
    assert ddpm_loss(Const(False), x, torch.tensor([5]), noise, abar).item() == pytest.approx(3.5, rel=1e-7)
    # eps_theta = x_t, one pixel, x~ = 2 * 0.75 - 1 = 0.5, eps = 1, t = 0 of the cosine T = 1000:
    # abar_0 = cos(0.009/1.008 pi/2)^2 / cos(0.008/1.008 pi/2)^2; L = (sqrt(abar) 0.5 + sqrt(1 - abar) - 1)^2
    f = [math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2 for s in (0.0, 0.001)]
    a = f[1] / f[0]
    expected = (math.sqrt(a) * 0.5 + math.sqrt(1 - a) - 1) ** 2
    got = ddpm_loss(Const(True), torch.tensor([[[[0.75]]]]), torch.tensor([0]), torch.ones(1, 1, 1, 1), abar)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # linear T = 1000 at t = 1: abar_1 = (1 - 1e-4)(1 - 1e-4 - 0.0199/999)
    lin = DDPMConfig(schedule="linear").diffusion().alphas_cumprod()
    a = (1 - 1e-4) * (1 - 1e-4 - 0.0199 / 999)
    expected = (math.sqrt(a) * 0.5 + math.sqrt(1 - a) - 1) ** 2
    got = ddpm_loss(Const(True), torch.tensor([[[[0.75]]]]), torch.tensor([1]), torch.ones(1, 1, 1, 1), lin)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_objective_draws_t_uniformly_then_noise_fixed_seed():
    cfg = DDPMConfig(steps=10, base_channels=4, channel_mults=(1,))
    obj = DDPMObjective(cfg)
    torch.nn.init.normal_(obj.denoiser.eps_model.out.weight, std=0.1)  # not the zero init
    x = torch.rand(3, 3, 4, 4)
    torch.manual_seed(7)
    out = obj([x], torch.zeros(3, dtype=torch.long), 0)
    torch.manual_seed(7)
    t = torch.randint(0, 10, (3,))
    noise = torch.randn_like(x)
    a = obj.denoiser.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * (2 * x - 1) + (1 - a).sqrt() * noise).float()
    expected = ((obj.denoiser.eps_model(x_t, t) - noise) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.metrics["eps_mse"].item() == pytest.approx(expected.item(), rel=1e-6)
    # the zero-initialised output layer: an untrained model predicts eps = 0
    fresh = DDPMObjective(cfg)
    assert torch.equal(fresh.denoiser.eps_model(x, t), torch.zeros_like(x))


def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = digits_tensors(size)[0].float() / 255
    return x[:1400], x[1400:]


def _train(obj: DDPMObjective, images: torch.Tensor, steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.Adam(obj.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(images), (64,))
        loss = obj([images[idx]], torch.zeros(64, dtype=torch.long), step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    train, _ = _digits(8)
    obj = DDPMObjective(DDPMConfig(base_channels=8))
    g = torch.Generator().manual_seed(1)
    x, t = train[:256], torch.randint(0, 1000, (256,), generator=g)
    noise = torch.randn(x.shape, generator=g)

    def held() -> float:
        with torch.no_grad():
            return ddpm_loss(obj.denoiser.eps_model, x, t, noise, obj.denoiser.alphas_cumprod).item()

    before = held()
    assert before == pytest.approx((noise**2).mean().item(), rel=1e-6)  # eps = 0 at init
    _train(obj, train, 40)
    assert held() < 0.6 * before


def test_trained_denoiser_denoises_through_the_dds_path():
    torch.manual_seed(0)
    train, test = _digits(8)
    obj = DDPMObjective(DDPMConfig(base_channels=16))
    _train(obj, train, 200)
    den = obj.export().eval()
    assert isinstance(den, EpsilonDiffusionDenoiser) and den is obj.export()
    g = torch.Generator().manual_seed(0)
    y = test + 0.5 * torch.randn(test.shape, generator=g)  # sigma 0.5, noise from outside the model
    with torch.no_grad():
        mse = ((den(y, 0.5) - test) ** 2).mean().item()
    assert mse < 0.5 * ((y.clamp(0, 1) - test) ** 2).mean().item()


def test_export_rebuilds_from_a_model_file_strictly(tmp_path):
    # what the proposed "denoiser" export kind does: denoiser_from_meta(meta), then strict weights
    cfg = DDPMConfig(base_channels=8, channel_mults=(1, 2), steps=50)
    obj = DDPMObjective(cfg)
    torch.nn.init.normal_(obj.denoiser.eps_model.out.weight, std=0.1)
    assert all(k.startswith("eps_model.") for k in obj.export().state_dict())
    method = {"name": "ddpm", "schedule": "cosine", "steps": 50, "base_channels": 8, "channel_mults": [1, 2],
              "channels": 3}
    cfg_dict = {"method": method, "model": {"encoder": "vit_digits"}, "data": {"image_size": 8}}
    save_model(tmp_path / "model.pt", obj.export(), model_meta(cfg_dict, "denoiser", 10))
    blob = load_model_file(tmp_path / "model.pt")
    assert blob["meta"]["export"] == "denoiser" and blob["meta"]["stage"] == "pretrain"
    rebuilt = denoiser_from_meta(blob["meta"])
    rebuilt.load_state_dict(blob["model"], strict=True)
    y = torch.rand(2, 3, 8, 8)
    assert torch.equal(rebuilt.eval()(y, 0.3), obj.export().eval()(y, 0.3))
    with pytest.raises(RuntimeError):
        ddpm_denoiser({**method, "base_channels": 4}).load_state_dict(blob["model"], strict=True)
    with pytest.raises(ConfigError) as err:
        denoiser_from_meta({**blob["meta"], "config": {**cfg_dict, "method": {"name": "gaussian"}}})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value,key", [("schedule", "sqrt", "method.schedule"), ("steps", 1, "method.steps"),
                                             ("base_channels", 0, "method.base_channels"),
                                             ("channel_mults", (), "method.channel_mults"),
                                             ("channel_mults", (1, 2, 2, 2), "data.image_size")])
def test_bad_config_is_one_line(field, value, key):
    cfg = DDPMConfig(**{field: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate(SimpleNamespace(data=SimpleNamespace(image_size=12)))
    assert str(err.value).startswith(key + "=") and "\n" not in str(err.value)


def test_unet_shapes_and_time_embedding():
    net = SmallUNet(3, 8, (1, 2, 2), out_channels=6)
    assert net(torch.rand(2, 3, 16, 16), torch.tensor([0, 999])).shape == (2, 6, 16, 16)
    emb = timestep_embedding(torch.tensor([0.0, 2.5]), 6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert emb[1, 0].item() == pytest.approx(math.cos(2.5)) and emb[1, 3].item() == pytest.approx(math.sin(2.5))
    with pytest.raises(ConfigError):
        net(torch.rand(1, 3, 10, 10), torch.tensor([1]))
    assert DDPMConfig().stage == "pretrain"
