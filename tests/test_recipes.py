"""The recipes reproduce the RCM seed's commands: a table copied from the seed's README and
config files, checked value by value against the configs the recipes build."""

from __future__ import annotations

import pytest
from helpers import load_experiment

from rayrcm.config import validate

# (dataset, sigma): eta, lbd, noise_aug, epochs, layernorm, lr_layer_decay, lr, wd, batch, augmentation,
#                   mixup, cutmix, label_smoothing  -- the README's fine-tuning commands
SEED_FINETUNE = {
    ("imagenet", 0.25): (0.5, 10.0, 0.5, 150, True, 0.65, 2e-4, 0.0, 1024, "autoaug", 0.8, 1.0, 0.1),
    ("imagenet", 0.5): (0.5, 20.0, 1.0, 50, True, 0.65, 2e-4, 0.0, 2048, "strong", 0.8, 1.0, 0.0),
    ("imagenet", 1.0): (0.5, 20.0, 2.0, 150, True, 0.65, 1e-4, 0.0, 256, "weak", 0.8, 1.0, 0.0),
    ("cifar10", 0.25): (0.5, 10.0, 0.5, 100, False, 0.75, 2e-4, 0.0, 1024, "weak", 0.0, 0.0, 0.0),
    ("cifar10", 0.5): (0.5, 20.0, 1.0, 100, False, 0.75, 2e-4, 0.0, 1024, "weak", 0.0, 0.0, 0.0),
    ("cifar10", 1.0): (0.5, 20.0, 2.0, 100, False, 0.65, 2e-4, 0.0, 1024, "weak", 0.0, 0.0, 0.0),
}
# configs/*_finetune.py: warmup epochs, cosine length in epochs, image size, patch
SEED_FT_CONFIG = {"imagenet": (5, 150, 224, 16), "cifar10": (10, 100, 32, 4)}
OUR_AUG = {("imagenet", "autoaug"): "autoaug", ("imagenet", "strong"): "crop", ("imagenet", "weak"): "center",
           ("cifar10", "weak"): "none"}
# configs/*_pretrain*.py: steps, batch, lr, wd, warmup, gradclip, ema A, encoder, patch, proj hidden, GPUs
SEED_PRETRAIN = {
    ("imagenet", "b"): (600_000, 4096, 2e-4, 0.03, 15_000, 2.0, 10, "rcm_b", 16, 4096, 32),
    ("imagenet", "s"): (600_000, 4096, 1e-4, 0.01, 10_000, 2.0, 10, "rcm_s", 16, 2048, 16),
    ("cifar10", "b"): (300_000, 2048, 1e-4, 0.0, 10_000, 2.0, 15, "rcm_b", 4, 2048, 8),
}
# configs/*_pretrain*.py nnet: stop_grad_conv1, moco_initialization
SEED_PRETRAIN_VIT = {("imagenet", "b"): (True, True), ("imagenet", "s"): (True, True), ("cifar10", "b"): (False, False)}


def _load(name):
    return load_experiment(name, "recipe")


@pytest.mark.parametrize("dataset, sigma", list(SEED_FINETUNE))
def test_finetune_recipes_equal_the_seed_commands(dataset, sigma):
    eta, lbd, noise_aug, epochs, ln, decay, lr, wd, batch, aug, mixup, cutmix, ls = SEED_FINETUNE[(dataset, sigma)]
    warmup, schedule, size, patch = SEED_FT_CONFIG[dataset]
    cfg = validate(_load(f"rcm_{dataset}").finetune_config(sigma), check_paths=False)
    m, o, d, t = cfg.method, cfg.optim, cfg.data, cfg.train
    assert (m.name, m.m, m.eta, m.lbd, m.train_head) == ("consistency", 2, eta, lbd, False)
    assert m.sigma == noise_aug / 2 == sigma  # the seed's noise is on [-1, 1] data
    assert (t.epochs, o.layer_decay, o.name, o.weight_decay) == (epochs, decay, "adamw", wd)
    # reload_forward(layernorm): the pretrained final norm on the CLS token or not; no extra LayerNorm
    assert (cfg.model.final_norm, cfg.model.layernorm) == (ln, False)
    # c_in at the level nearest noise_aug of the 81-level grid the seed's pretraining ends with (find_nearest)
    grid = [(80 ** (1 / 7) + i / 80 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(81)]
    nearest = min(grid, key=lambda g: abs(g - noise_aug))
    assert cfg.model.input_scale == pytest.approx(1 / (nearest**2 + 0.25) ** 0.5, rel=1e-6)
    assert o.lr == pytest.approx(lr * batch / 256)  # scale_lr=True in the seed's fine-tuning configs
    assert (o.warmup_epochs, o.schedule_epochs, d.image_size, cfg.model.patch_size) == (warmup, schedule, size, patch)
    assert (d.batch_size, d.augmentation, d.mixup, d.cutmix, d.label_smoothing) == (batch, OUR_AUG[(dataset, aug)], mixup, cutmix, ls)
    assert d.hflip == (aug != "weak" or dataset == "imagenet")  # every seed pipeline but CIFAR's "weak" flips
    if mixup:
        assert d.mixup_switch_prob == 0.5
    assert cfg.model.encoder == "rcm_b" and t.workers == 8 and t.precision == "fp32"
    assert t.select_metric == f"val_acc_sigma_{sigma:g}" and d.val_fraction > 0  # never the test set
    assert cfg.tracking.alias == f"sigma-{sigma:.2f}".replace(".", "_")
    if dataset == "imagenet":
        assert cfg.model.proj_hidden_dim == 4096 and d.crop_pct == 1.0  # --config.nnet.hidden_dim=4096, short-side crop


@pytest.mark.parametrize("dataset, size", list(SEED_PRETRAIN))
def test_pretrain_recipes_equal_the_seed_configs(dataset, size):
    steps, batch, lr, wd, warmup, clip, ema_a, encoder, patch, hidden, gpus = SEED_PRETRAIN[(dataset, size)]
    cfg = validate(_load(f"rcm_{dataset}").pretrain_config(size), check_paths=False)
    m, o = cfg.method, cfg.optim
    assert (cfg.train.steps, cfg.data.batch_size, o.lr, o.weight_decay, o.warmup_steps, o.grad_clip) == (steps, batch, lr, wd, warmup, clip)
    assert (m.name, m.ema_sharpness, m.ema_start, m.ema_end, m.levels_start, m.levels_end, m.temperature) == ("rcm", ema_a, 0.99, 0.9999, 20, 80, 0.2)
    assert (m.sigma_min, m.sigma_max) == (0.001, 40.0)  # the seed's 0.002 / 80 on [-1, 1] data
    assert (cfg.model.encoder, cfg.model.patch_size, cfg.model.proj_hidden_dim, cfg.model.proj_dim) == (encoder, patch, hidden, 256)
    assert cfg.train.workers == gpus and cfg.train.use_gpu
    # dataset.py: MoCo v3's asymmetric views and a centre-cropped, flipped x_start
    assert (cfg.data.augmentation, cfg.data.hflip) == ("mocov3", True)
    assert m.views(cfg.data.augmentation) == ("center", "mocov3_1", "mocov3_2")
    stop_grad_conv1, moco_init = SEED_PRETRAIN_VIT[(dataset, size)]
    assert (cfg.model.freeze_patch_embed, cfg.model.init) == (stop_grad_conv1, "mocov3" if moco_init else "timm")
    # gradclip_method="after_warmup"; AdamW(model.parameters()): every parameter decays
    assert o.clip_after_warmup and o.weight_decay_all


def test_certify_recipes_use_the_papers_protocol():
    from rayrcm.certify.protocol import select_indices
    from rayrcm.orchestration.certify_job import config_from_args

    # certify.py: CIFAR-10 test images 0-499; ImageNet every 100th (its first 500 cover 10 classes only)
    for dataset, skip, size, expected in (("cifar10", 1, 10_000, list(range(500))), ("imagenet", 100, 50_000, list(range(0, 50_000, 100)))):
        args = _load(f"rcm_{dataset}").certify_config(0.5)
        assert {"smoothing.n0=100", "smoothing.n=100000", "smoothing.alpha=0.001", "smoothing.sigma=0.5",
                f"smoothing.skip={skip}"} <= set(args)
        assert select_indices(size, config_from_args(args).smoothing) == expected


def test_digits_recipe_validates_for_every_sigma():
    digits = _load("rcm_digits")
    for sigma in (0.25, 0.5, 1.0):
        cfg = validate(digits.finetune_config(sigma))
        assert cfg.method.name == "consistency" and cfg.method.sigma == sigma and cfg.train.select_metric


def test_recipe_override_with_an_unknown_key_is_one_line(capsys):
    cifar = _load("rcm_cifar10")

    with pytest.raises(SystemExit) as exit_:
        cifar.main(["finetune", "--sigma", "0.5", "--set", "optim.nosuch=1", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "optim.nosuch" in err and "unknown key" in err


def test_recipe_certify_stage_validates_before_any_work(capsys, tmp_path):
    digits = _load("rcm_digits")

    with pytest.raises(SystemExit) as exit_:
        digits.main(["certify", "--set", "smoothing.sigma=-1", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == "rayrcm: error: sigma=-1.0 is invalid: must be > 0 (pixel units, data in [0, 1])"


def test_epochs_become_steps_and_a_longer_schedule_cuts_the_cosine_short():
    import torch

    from rayrcm.config import ExperimentConfig, apply_overrides, resolve_epochs
    from rayrcm.train.optim import build_scheduler

    cfg = apply_overrides(ExperimentConfig(), ["data.batch_size=128", "train.epochs=50", "train.checkpoint_epochs=5",
                                               "optim.warmup_epochs=5", "optim.schedule_epochs=150", "optim.lr=1.0"])
    r = resolve_epochs(cfg, 1293)  # floor(1293 / 128) = 10 steps per epoch (last partial batch dropped)
    assert (r.train.steps, r.train.checkpoint_every, r.optim.warmup_steps, r.optim.schedule_steps) == (500, 50, 50, 1500)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, r.optim, r.train.steps)
    sched.step_update(500)  # the seed at sigma 0.5 on ImageNet: 50 of 150 epochs, lr not yet at 0
    import math

    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 450 / 1450)), rel=1e-6)


# seed 001: the authors' pretraining flags per method: (method.name, pgd steps, dynamic, lambda1, lambda2, rcs fraction)
SEED_ACL = {"cl": ("simclr", None, None, None, None, 1.0), "acl": ("acl", 5, True, None, None, 1.0),
            "air": ("air", 5, True, 0.5, 0.5, 1.0), "acl_rcs": ("acl", 5, True, None, None, 0.2)}
# finetuning.py setup_hyperparameter on CIFAR-100: batch, lr, epochs, milestones, after --pretraining DynACL (CL, ACL,
# ACL + RCS) and DynACL-AIR (AIR)
SEED_ACL_FT = {"slf": (512, 0.05, 25, (10, 20)), "alf": (512, 0.05, 25, (10, 20)), "aff": (128, 0.1, 25, (15, 20))}
SEED_AIR_FT = {"slf": (512, 0.1, 25, (10, 20)), "alf": (512, 0.1, 25, (10, 20)), "aff": (128, 0.1, 25, (15, 20))}


@pytest.mark.parametrize("method", sorted(SEED_ACL))
def test_acl_cifar10_pretraining_matches_the_seed(method):
    name, steps, dynamic, l1, l2, fraction = SEED_ACL[method]
    cfg = validate(_load("acl_cifar10").pretrain_config(method), check_paths=False)
    m = cfg.method
    assert (m.name, cfg.model.encoder, cfg.data.batch_size, cfg.train.epochs) == (name, "resnet18", 512, 1000)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, m.temperature) == ("lars", 5.0, 1e-6, 0.5)
    # LARS(model.parameters(), weight_decay=1e-6); cosine_annealing(warmup_steps=10 * len(train_loader), lr_min=1e-6)
    assert (cfg.optim.weight_decay_all, cfg.optim.warmup_epochs, cfg.optim.min_lr, cfg.optim.schedule) == (True, 10, 1e-6, "cosine")
    assert (cfg.model.proj_hidden_dim, cfg.model.proj_dim, m.two_layer_proj) == (512, 512, False)  # proj_head(512), 3 layers
    assert cfg.data.augmentation == "simclr" and cfg.data.hflip
    # DynACL_RCS.py holds out 1% for RCS and halves the loss; pretraining.py trains on everything
    assert (cfg.data.val_fraction, m.scale) == ((0.01, 0.5) if fraction < 1 else (0.0, 1.0))
    if steps is not None:
        assert (m.pgd_steps, m.eps, m.step_size, m.dynamic, m.dual_bn, m.export_bn) == (steps, 8 / 255, 2 / 255, dynamic, True, "adv")
    if l1 is not None:
        assert (m.lambda1, m.lambda2) == (l1, l2)
    assert getattr(m, "rcs_fraction", 1.0) == fraction
    if fraction < 1:
        assert (m.rcs_warmup_epochs, m.rcs_interval_epochs, m.rcs_lr) == (100, 20, 0.01)


@pytest.mark.parametrize("method", ["acl", "air"])
@pytest.mark.parametrize("mode", sorted(SEED_ACL_FT))
def test_acl_transfer_to_cifar100_matches_the_seed(mode, method):
    batch, lr, epochs, milestones = (SEED_AIR_FT if method == "air" else SEED_ACL_FT)[mode]
    cfg = validate(_load("acl_cifar10").finetune_config(mode, method), check_paths=False)
    assert (cfg.data.name, cfg.data.batch_size, cfg.optim.lr, cfg.train.epochs) == ("cifar100", batch, lr, epochs)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.schedule) == ("sgd", 0.9, 2e-4, "step")
    assert not cfg.optim.nesterov  # finetuning_utils.py: optim.SGD(..., momentum=args.momentum), no Nesterov
    assert cfg.optim.milestone_epochs == milestones and cfg.model.init_from == f"models:/acl-cifar10@{method}"
    m = cfg.method
    assert (m.mode, m.eps, m.step_size, m.pgd_steps, m.beta, m.eval_pgd_steps) == (mode, 8 / 255, 2 / 255, 10, 6.0, 20)
    assert m.dual_bn  # AFF: finetuning.py --dualBN 1 (trades_loss_dual)


def test_acl_imagenet32_rcs_uses_the_rcs_authors_imagenet32_script():
    # ACL_RCS/ImageNet_32/ACL_RCS.py: WRN-28-10, proj_head_module(640) (two layers), --lr 0.6, 200 epochs,
    # warmup_steps = 2 * len(train_loader), nt_xent(t=0.1), no DynAug, loss halved, --warmup 20 --fre 10
    # --fraction 0.05 --Coreset_lr 0.01, 99.5% / 0.5% split
    cfg = validate(_load("acl_imagenet32").pretrain_config("acl_rcs"), check_paths=False)
    m, o = cfg.method, cfg.optim
    assert (cfg.model.encoder, cfg.data.image_size, cfg.model.proj_hidden_dim, cfg.model.proj_dim, m.two_layer_proj) == (
        "wrn28_10", 32, 640, 640, True)
    assert (o.name, o.lr, o.weight_decay, o.weight_decay_all, o.warmup_epochs, o.min_lr, cfg.train.epochs) == (
        "lars", 0.6, 1e-6, True, 2, 1e-6, 200)
    assert (m.temperature, m.dynamic, m.weight, m.scale, m.pgd_steps, m.eps, m.step_size) == (0.1, False, 0.0, 0.5, 5, 8 / 255, 2 / 255)
    assert (m.rcs_fraction, m.rcs_warmup_epochs, m.rcs_interval_epochs, m.rcs_lr, cfg.data.val_fraction) == (0.05, 20, 10, 0.01, 0.005)


@pytest.mark.parametrize("mode", ["slf", "alf", "aff"])
def test_acl_imagenet32_transfer_uses_nesterov_momentum_as_the_authors(mode):
    # ACL_RCS/ImageNet_32/transfer.py and adv_tune.py: optim.SGD(..., nesterov=True)
    cfg = validate(_load("acl_imagenet32").finetune_config(mode, "acl_rcs"), check_paths=False)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.nesterov) == ("sgd", 0.9, True)
