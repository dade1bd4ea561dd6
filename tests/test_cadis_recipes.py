"""The CADIS recipes (seed 002) reproduce the authors' launch commands: every value is compared with
a table copied from their README, ``train_cifar10.sh``, ``train_imagenet.sh``, ``train.py`` and
``certify.py``, and the batch and learning-rate arithmetic is checked by hand."""

from __future__ import annotations

import copy
import random

import pytest
from helpers import load_experiment

from rayrcm.config import from_dict, validate

# README:  bash train_cifar10.sh --ngpus [NUM OF GPUS] --noise 1.00 --blr 1e-4 --batch 32 --accum_iter 4 --lbd 4.0
# train_cifar10.sh:93-107 (GPUS=4):  train.py --dataset cifar10 --arch cifar10_vit_base --ft_method full-ft
#   --weight_decay 0.04 --weight_decay_end 0.4 --layer_decay 0.65 --drop_path 0.2 --blr $BLR --batch $BATCH
#   --accum_iter $ACCUM_ITER --warmup_epochs 3 --epochs 30 --eps 64 --num-steps 4 --train_noise_sd $NOISE
#   --test_noise_sd $NOISE --num_noises 4 --lbd $LBD --clip_grad 0.3 --use_fp16 true --warm_start
# README:  bash train_imagenet.sh --ngpus [NUM OF GPUS] --noise 1.00 --blr 4e-4 --batch 16 --accum_iter 4 --lbd 2.0
#          --weight_decay 0.01 --weight_decay_end 0.1 --layer_decay 0.9
# train_imagenet.sh:108-122 (GPUS=4):  train.py --dataset imagenet --arch imagenet_vit_base --ft_method lora
#   --weight_decay $WEIGHT_DECAY --weight_decay_end $WEIGHT_DECAY_END --layer_decay $LAYER_DECAY --drop_path 0.0
#   --blr $BLR --batch $BATCH --accum_iter $ACCUM_ITER --warmup_epochs 1 --epochs 10 --eps 64 --num-steps 1
#   --train_noise_sd $NOISE --test_noise_sd $NOISE --num_noises 2 --lbd $LBD --clip_grad 1.0 --use_fp16 true
#   --warm_start
# train.py: --min_lr 1e-6; args.eps /= 256; classifier.py: interpolate to 224 (CIFAR) / 384 (ImageNet), bicubic;
#   LoRA_ViT_timm(r=4, alpha=4)
# (recipe): gpus, noise, blr, batch, accum, lbd, M, eps, K, epochs, warmup, wd, wd_end, layer decay, clip, resize
SEED = {
    "cadis_cifar10": (4, 1.0, 1e-4, 32, 4, 4.0, 4, 64, 4, 30, 3, 0.04, 0.4, 0.65, 0.3, 224),
    "cadis_imagenet": (4, 1.0, 4e-4, 16, 4, 2.0, 2, 64, 1, 10, 1, 0.01, 0.1, 0.9, 1.0, 384),
}
LORA = {"cadis_cifar10": None, "cadis_imagenet": (4, 4.0)}  # --ft_method full-ft / lora (r, alpha)
DENOISER_SCHEDULE = {"cadis_cifar10": "cifar10-cosine-4000", "cadis_imagenet": "imagenet-linear-1000"}
ENCODER = {"cadis_cifar10": "vit_base_patch16_224", "cadis_imagenet": "vit_base_patch16_clip_384"}


def _recipe(name):
    return load_experiment(name, "cadis_recipe")


def _validated(tree):
    return validate(from_dict(copy.deepcopy(tree)), check_paths=False)


@pytest.mark.parametrize("name", sorted(SEED))
def test_finetune_tree_equals_the_seed_command(name):
    gpus, noise, blr, batch, accum, lbd, m, eps, k, epochs, warmup, wd, wd_end, ld, clip, resize = SEED[name]
    tree = _recipe(name).finetune_tree_for(1.0, "offtheshelf.pt")
    method, optim, train, data, model = (tree[s] for s in ("method", "optim", "train", "data", "model"))
    assert (method["name"], method["sigma"], method["lbd"], method["m"], method["steps"], method["warm_start"]) == \
        ("cadis", noise, lbd, m, k, True)
    assert method["eps"] == eps / 256 == 0.25  # [-1, 1] units, as the authors' args.eps
    assert method["denoiser_schedule"] == DENOISER_SCHEDULE[name] and method["denoiser"].startswith("adm:")
    assert (optim["name"], optim["weight_decay"], optim["weight_decay_end"], optim["layer_decay"]) == \
        ("adamw", wd, wd_end, ld)
    assert (optim["grad_clip"], optim["warmup_epochs"], optim["min_lr"], train["epochs"]) == \
        (clip, warmup, 1e-6, epochs)
    assert (train["workers"], train["use_gpu"], train["accum_iter"], train["precision"]) == (gpus, True, accum, "fp16")
    assert data["batch_size"] == gpus * batch // m  # unique images per micro-batch, all workers
    assert (model["input_resize"], model["patch_size"], model["init_from"]) == (resize, 16, "offtheshelf.pt")
    assert model["encoder"] == ENCODER[name]  # the authors' timm architecture (architecture.py:102, 164)
    lora = LORA[name]
    assert (None if "lora_rank" not in model else (model["lora_rank"], model["lora_alpha"])) == lora
    assert data["hflip"] and data["augmentation"] == "weak"  # RandomCrop(32, 4) / RandomResizedCrop(224), flip
    assert tree["tracking"]["register_as"] == name.replace("_", "-") and tree["tracking"]["alias"] == "sigma-1_00"


@pytest.mark.parametrize("name, gpus, batch, accum, m, blr, lr", [
    ("cadis_cifar10", 4, 32, 4, 4, 1e-4, 5e-5),  # int(32 * 4 * 4 / 4) = 128; 1e-4 * 128 / 256
    ("cadis_imagenet", 4, 16, 4, 2, 4e-4, 2e-4),  # int(16 * 4 * 4 / 2) = 128; 4e-4 * 128 / 256
])
def test_effective_batch_and_lr_follow_train_py_202(name, gpus, batch, accum, m, blr, lr):
    from _cadis_seed import effective_batch, seed_lr  # on sys.path while the recipe loads

    recipe = _recipe(name)
    cmd = recipe.CIFAR10 if name == "cadis_cifar10" else recipe.IMAGENET
    assert effective_batch(cmd) == int(batch * accum * gpus / m) == 128
    assert seed_lr(cmd) == pytest.approx(lr, rel=1e-12)
    cfg = _validated(recipe.finetune_tree_for(1.0, "offtheshelf.pt"))
    assert cfg.data.batch_size * cfg.train.accum_iter == 128  # unique images per optimizer step
    assert cfg.optim.lr == pytest.approx(blr * cfg.data.batch_size * cfg.train.accum_iter / 256, rel=1e-12)
    assert cfg.optim.lr == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize("name", sorted(SEED))
@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_every_sigma_validates_and_keeps_the_sigma_one_values(name, sigma):
    recipe = _recipe(name)
    tree, seed = recipe.finetune_tree_for(sigma, "offtheshelf.pt"), recipe.finetune_tree_for(1.0, "offtheshelf.pt")
    cfg = _validated(tree)
    assert cfg.method.sigma == sigma and tuple(cfg.train.eval_sigmas) == (sigma,)
    assert cfg.tracking.alias == f"sigma-{sigma:.2f}".replace(".", "_")
    for section in ("data", "model", "optim"):
        assert tree[section] == seed[section]  # the paper's per-sigma values are not guessed
    assert {k: v for k, v in tree["method"].items() if k != "sigma"} == \
        {k: v for k, v in seed["method"].items() if k != "sigma"}


def _authors_one_per_class(targets, seed=0):
    """``utils.sample_1_per_class_imagenet`` after ``fix_random_seeds(0)``, transcribed."""
    random.seed(seed)
    class_groups = [[] for _ in range(1000)]
    for i, value in enumerate(targets):
        class_groups[value].append(i)
    sampled = []
    for group in class_groups:
        random.shuffle(group)
        sampled.extend(group[:1])
    return sampled


def test_certify_stages_use_the_authors_protocol():
    from rayrcm.certify.protocol import select_indices
    from rayrcm.orchestration.certify_job import config_from_args

    # README: certify.py --seed 0 --dataset cifar10 --sigma 0.50 --skip 1 --N0 100 --N 100000 (alpha 0.001 default)
    args = _recipe("cadis_cifar10").certify_config(0.5)
    assert {"smoothing.n0=100", "smoothing.n=100000", "smoothing.alpha=0.001", "smoothing.skip=1",
            "smoothing.sigma=0.5", "model=models:/cadis-cifar10@sigma-0_50", "dataset=cifar10"} <= set(args)
    assert select_indices(10_000, config_from_args(args).smoothing) == list(range(10_000))
    # README: certify.py --seed 0 --dataset imagenet --sigma 0.50 --skip 1 --N0 100 --N 10000; one image per class
    args = _recipe("cadis_imagenet").certify_config(1.0)
    assert {"smoothing.n0=100", "smoothing.n=10000", "smoothing.alpha=0.001", "smoothing.skip=1",
            "model=models:/cadis-imagenet@sigma-1_00", "dataset=imagefolder"} <= set(args)
    picked = select_indices(50_000, config_from_args(args).smoothing)
    assert picked == _authors_one_per_class([i // 50 for i in range(50_000)])
    assert sorted(i // 50 for i in picked) == list(range(1000))


def _run(name, argv, monkeypatch):
    """The recipe's command line with training and certification replaced by failures (a dry run
    must reach neither, so Ray never starts)."""
    import rayrcm.orchestration.certify_job as certify_job
    import rayrcm.orchestration.trainer as trainer

    def never(*_a, **_k):
        raise AssertionError("a dry run started work")

    monkeypatch.setattr(trainer, "fit", never)
    monkeypatch.setattr(certify_job, "run", never)
    recipe = _recipe(name)
    recipe.main(argv)


@pytest.mark.parametrize("name", sorted(SEED))
def test_dry_run_prints_the_resolved_config_without_starting_work(name, monkeypatch, capsys, tmp_path):
    import yaml

    _run(name, ["finetune", "--from", str(tmp_path / "clf.pt"), "--denoiser", "adm:pkg.mod:make", "--denoiser-weights",
                str(tmp_path / "w.pt"), "--set", f"data.path={tmp_path}", "--dry-run"], monkeypatch)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"]["denoiser"] == "adm:pkg.mod:make" and printed["data"]["path"] == str(tmp_path)
    assert printed["model"]["input_resize"] == SEED[name][-1] and printed["train"]["accum_iter"] == 4
    _run(name, ["certify", "--sigma", "0.5", "--set", f"data_path={tmp_path}", "--dry-run"], monkeypatch)
    out = capsys.readouterr().out
    assert "sigma=0.5" in out and "n0=100" in out


@pytest.mark.parametrize("stage", [["finetune", "--from", "clf.pt"], ["certify"]])
def test_a_bad_sigma_is_one_line(stage, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("cadis_cifar10", [*stage, "--sigma", "0.3", "--dry-run"], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("rayrcm: error: --sigma=0.3") and "0.25, 0.5 or 1.0" in err


def test_imagenet_lora_trains_about_the_authors_092m_parameters():
    """``LoRA_ViT_timm(r=4, alpha=4)``: A (768 x 4) and B (4 x 768) on q and v of 12 blocks = 147,456, plus the
    head 768 x 1000 + 1000 = 769,000: 916,456 trainable (the authors' "about 1 %")."""
    from rayrcm.models import build_classifier

    tree = _recipe("cadis_imagenet").finetune_tree_for(1.0, "offtheshelf.pt")
    tree["model"].pop("init_from")
    cfg = _validated(tree)
    model = build_classifier(cfg.model, cfg.data.image_size, 1000)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 12 * 4 * 4 * 768 + 769_000 == 916_456
