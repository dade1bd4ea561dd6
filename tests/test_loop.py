"""The pure training loop: resumable data order, mixed precision, layer-wise lr decay, schedule."""

from __future__ import annotations

import pytest
import torch

from rayrcm.config import ExperimentConfig, OptimConfig, apply_overrides
from rayrcm.data.datasets import TensorImages
from rayrcm.data.views import MultiView
from rayrcm.objectives import build_objective
from rayrcm.train.loop import Loop, batches_from
from rayrcm.train.optim import build_optimizer, build_scheduler


def _dataset(n=40):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return MultiView(TensorImages(images, torch.arange(n) % 10), [lambda im: im.float()])


def test_batches_resume_mid_epoch_without_loading_skipped_batches():
    ds = _dataset()
    full = batches_from(ds, 4, rank=1, world=2, seed=3, start_step=0)
    first = [next(full)[1].tolist() for _ in range(12)]  # 5 batches per epoch: crosses two epochs
    resumed = batches_from(ds, 4, rank=1, world=2, seed=3, start_step=7)
    assert [next(resumed)[1].tolist() for _ in range(5)] == first[7:]
    ranks = [[next(batches_from(ds, 4, r, 2, 3, s))[0][0][:, 0, 0, 0].tolist() for s in range(5)] for r in (0, 1)]
    idx0, idx1 = {int(v) for b in ranks[0] for v in b}, {int(v) for b in ranks[1] for v in b}
    assert not idx0 & idx1 and len(idx0) == len(idx1) == 20  # disjoint shards of one epoch


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step(precision):
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "data.image_size=8", "model.patch_size=4"])
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    loop = Loop(obj, obj, opt, build_scheduler(opt, cfg.optim, 10), torch.device("cpu"), precision, 1.0, scaler)
    before = [p.clone() for p in obj.parameters()]
    for step in range(5):  # fp16: the scaler may skip the first steps while it finds its scale
        out = loop.step(step, ([torch.rand(4, 3, 8, 8)], torch.randint(0, 10, (4,))))
        assert torch.isfinite(torch.tensor(out["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, obj.parameters()))


def _mae_param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
    """A transcription of MAE's ``util/lr_decay.py`` ``param_groups_lrd`` (as FT-CADIS ``utils/lr_decay.py``
    and rRCM's param-group function use it): ``{name: (lr_scale, weight_decay)}``."""
    num_layers = len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))

    def get_layer_id_for_vit(name, num_layers):
        if name in ["cls_token", "pos_embed"]:
            return 0
        elif name.startswith("patch_embed"):
            return 0
        elif name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        else:
            return num_layers

    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        this_decay = 0.0 if (p.ndim == 1 or n in no_weight_decay_list) else weight_decay
        out[n] = (layer_scales[get_layer_id_for_vit(n, num_layers)], this_decay)
    return out


@pytest.mark.parametrize("decay", [0.5, 0.65])
def test_layer_decay_is_the_authors_param_groups_lrd(decay):
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "data.image_size=8", "model.patch_size=4",
                                               f"optim.layer_decay={decay}", "optim.weight_decay=0.05"])
    obj = build_objective(cfg, 10)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    got = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    vit = obj.classifier.encoder.model
    want = _mae_param_groups_lrd(vit, 0.05, vit.no_weight_decay(), decay)
    for name, p in vit.named_parameters():
        assert got[id(p)] == pytest.approx(want[name]), name
    depth = len(vit.blocks)
    assert got[id(vit.blocks[-1].mlp.fc1.weight)][0] == pytest.approx(decay)  # the last block at d, not 1
    assert got[id(vit.blocks[0].mlp.fc1.weight)][0] == pytest.approx(decay ** depth)
    assert got[id(obj.classifier.head.weight)][0] == pytest.approx(1.0)
    assert len(got) == sum(1 for p in obj.parameters() if p.requires_grad)


def test_timm_layer_decay_style_keeps_the_last_block_at_full_lr():
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "data.image_size=8", "model.patch_size=4",
                                               "optim.layer_decay=0.5", "optim.layer_decay_style=timm"])
    obj = build_objective(cfg, 10)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    vit = obj.classifier.encoder.model
    blocks = [scale_of[id(b.mlp.fc1.weight)] for b in vit.blocks]
    assert all(b / a == pytest.approx(2.0) for a, b in zip(blocks, blocks[1:]))  # one decay factor per layer
    assert blocks[-1] == pytest.approx(1.0)  # timm: the last block shares the top group


def test_schedule_is_a_function_of_the_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=10, min_lr=0.0), total_steps=110)
    lrs = {}
    for s in (0, 5, 10, 60, 110, 5):
        sched.step_update(s)
        lrs.setdefault(s, opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[s])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5, abs=1e-6) and lrs[110] == pytest.approx(0.0, abs=1e-6)


def _dino_clip_gradients(model, clip):
    """A transcription of FT-CADIS's ``utils/utils.py`` ``clip_gradients`` (from DINO)."""
    norms = []
    for _name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def test_per_parameter_clipping_is_the_authors_and_differs_from_the_global_norm():
    from rayrcm.train.loop import clip_gradients

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)) for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    x = torch.randn(32, 8) * 5
    for net in nets:
        net(x).pow(2).sum().backward()
    _dino_clip_gradients(nets[0], 0.3)
    clip_gradients([p for p in nets[1].parameters()], 0.3, "per_param")
    clip_gradients([p for p in nets[2].parameters()], 0.3, "global")
    ours, theirs, glob = ([p.grad.flatten() for p in n.parameters()] for n in nets)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(ours, theirs))
    assert all(g.norm() <= 0.3 + 1e-5 for g in ours)  # each parameter within the bound
    cos = torch.nn.functional.cosine_similarity(torch.cat(ours), torch.cat(glob), dim=0)
    assert cos < 0.999  # another direction than the global clip


def test_the_cadis_recipes_clip_per_parameter():
    from helpers import load_experiment

    digits = load_experiment("cadis_digits")
    assert digits.SEED_OPTIM["clip_mode"] == "per_param"
