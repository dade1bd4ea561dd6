"""MoCo-v2 with non-semantic negatives (seed 004): hand values, the queue, momentum, shuffle BN,
patch negatives, resume, and two workers equal one worker with two BatchNorm groups."""

from __future__ import annotations

import math

import pytest
import torch

from rayrcm.config import ExperimentConfig, apply_overrides
from rayrcm.errors import ConfigError
from rayrcm.objectives import build_objective
from rayrcm.objectives.moco import (
    MoCoConfig,
    moco_logits,
    moco_loss,
    patch_bounds,
    patch_negatives,
    shuffle_permutation,
)

E = torch.eye(3)
Q = E[:, 1:]  # the queue (d, K) = [e2, e3]


@pytest.mark.parametrize("temperature, alpha, t, expected", [
    (1.0, 2.0, E[:1], 1.493812), (1.0, 0.0, E[:1], 0.743668), (0.2, 2.0, E[:1], 5.006806),
    (0.2, 3.0, E[:1], 10.000046), (0.2, 2.0, None, 0.013386),
    (0.2, 2.0, E[1:2], 0.020012), (0.2, 5.0, E[1:2], 0.020012),
])
def test_hand_values(temperature, alpha, t, expected):
    q = k = E[:1]
    logits = moco_logits(q, k, Q, [] if t is None else [t], alpha, temperature)
    assert moco_loss(logits).item() == pytest.approx(expected, abs=2e-6)
    if temperature == 1.0 and alpha == 2.0:
        assert moco_loss(logits).item() == pytest.approx(math.log(math.e + 2 + math.e**2) - 1, abs=1e-6)


def test_alpha_scales_only_the_own_negative_columns_before_the_temperature():
    g = torch.Generator().manual_seed(0)
    q, k, t1, t2 = (torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1) for _ in range(4))
    queue = torch.nn.functional.normalize(torch.randn(5, 6, generator=g), dim=0)
    logits = moco_logits(q, k, queue, [t1, t2], 3.0, 0.2)
    assert logits.shape == (4, 1 + 6 + 2)
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)
    torch.testing.assert_close(logits[:, 1:7], q @ queue / 0.2)
    torch.testing.assert_close(logits[:, 7], 3.0 * (q * t1).sum(1) / 0.2)  # query i against its own t_i only
    torch.testing.assert_close(logits[:, 8], 3.0 * (q * t2).sum(1) / 0.2)


def _cfg(*extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), ["method.name=moco", "data.image_size=8", "model.encoder=cifar_resnet8",
                                                "method.queue_size=8", "method.dim=6", "data.batch_size=4", *extra])


def _views(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 8, 8, generator=g) for _ in range(2)], torch.zeros(b, dtype=torch.long)


def test_queue_receives_the_keys_in_order_and_wraps():
    torch.manual_seed(0)
    obj = build_objective(_cfg(), 10)
    start = obj.queue.clone()
    keys = []
    for step in range(3):
        views, y = _views(seed=step)
        with torch.no_grad():
            twin_keys = obj.key_features(views[1], step, 0)  # the key encoder as it is now...
        obj(views, y, step)
        # ...moved by the momentum update (m = 0.999 of equal networks at init: no change) before the keys
        keys.append(obj.key_features(views[1], step, 0))
        torch.testing.assert_close(keys[-1], twin_keys, rtol=1e-4, atol=1e-5)
    assert int(obj.queue_ptr) == 4  # 3 batches of 4 into 8 slots: 0..3, 4..7, then 0..3 again
    torch.testing.assert_close(obj.queue[:, :4], keys[2].T)
    torch.testing.assert_close(obj.queue[:, 4:], keys[1].T)
    assert not torch.equal(obj.queue, start)


def test_eval_mode_leaves_queue_and_key_encoder_alone():
    torch.manual_seed(0)
    obj = build_objective(_cfg("method.momentum=0.5"), 10)
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    obj.eval()
    obj(*_views(), 0)
    for k, v in obj.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_zero_copies_the_query_encoder_and_one_keeps_the_key_encoder(m):
    torch.manual_seed(0)
    obj = build_objective(_cfg(f"method.momentum={m}"), 10)
    with torch.no_grad():
        for p in [*obj.encoder.parameters(), *obj.head.parameters()]:
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in obj.key_encoder.parameters()]
    obj(*_views(), 0)
    for pk, pq, p0 in zip(obj.key_encoder.parameters(), obj.encoder.parameters(), old):
        torch.testing.assert_close(pk, pq if m == 0 else p0)
    for pk, pq in zip(obj.key_head.parameters(), obj.head.parameters()):
        assert torch.equal(pk, pq) == (m == 0)


def test_gradients_reach_the_query_side_only():
    torch.manual_seed(0)
    obj = build_objective(_cfg("method.negatives=patch"), 10)
    out = obj(*_views(), 0)
    out.loss.backward()
    assert all(p.grad is not None for p in [*obj.encoder.parameters(), *obj.head.parameters()])
    assert all(not p.requires_grad for p in [*obj.key_encoder.parameters(), *obj.key_head.parameters()])
    assert obj.export() is obj.encoder
    assert {"pos_logit", "queue_logit", "nonsem_logit", "accuracy"} <= set(out.metrics)


def test_plain_moco_logs_the_nonsemantic_logit_only_when_monitored():
    torch.manual_seed(0)
    assert "nonsem_logit" not in build_objective(_cfg(), 10)(*_views(), 0).metrics
    assert "nonsem_logit" in build_objective(_cfg("method.monitor=true"), 10)(*_views(), 0).metrics


def test_shuffle_permutation_is_a_pure_function_of_seed_step_and_call():
    p = shuffle_permutation(3, 17, 0, 64)
    assert torch.equal(p, shuffle_permutation(3, 17, 0, 64))
    assert sorted(p.tolist()) == list(range(64))
    assert not torch.equal(p, shuffle_permutation(3, 18, 0, 64))
    assert not torch.equal(p, shuffle_permutation(3, 17, 1, 64))
    assert not torch.equal(p, shuffle_permutation(4, 17, 0, 64))
    x = torch.randn(64, 2)
    restored = torch.empty_like(x)
    restored[p] = x[p]  # the unshuffle of the shuffled batch
    assert torch.equal(restored, x)


def test_key_features_encode_shuffled_groups_and_unshuffle():
    """One worker, two groups: sample i is encoded with the BatchNorm statistics of the shuffled half
    it falls in, and comes back in its own row."""
    torch.manual_seed(0)
    obj = build_objective(_cfg(), 10)
    x = torch.rand(4, 3, 8, 8)
    got = obj.key_features(x, 5, 0)
    perm = shuffle_permutation(0, 5, 0, 4)
    want = torch.empty(4, 6)
    for half in perm.chunk(2):
        want[half] = obj.key_head(obj.key_encoder.forward_features(obj.normalize(x[half])))
    torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=1))
    whole = torch.nn.functional.normalize(obj.key_head(obj.key_encoder.forward_features(obj.normalize(x))), dim=1)
    assert not torch.allclose(got, whole, atol=1e-4)  # the groups' statistics differ from the whole batch's


def test_patch_bounds_scale_with_the_image_size():
    assert patch_bounds(224) == (16, 72)
    assert patch_bounds(32) == (2, 10)
    assert patch_bounds(16) == (1, 5)


def test_every_patch_cell_is_a_crop_of_its_query():
    torch.manual_seed(0)
    x = torch.randperm(2 * 3 * 20 * 20).float().view(2, 3, 20, 20)  # unique pixels: a crop is identified
    out, p, h, w = patch_negatives(x, 3, 7, params=True)
    assert out.shape == x.shape
    for b in range(2):
        s = int(p[b])
        assert 3 <= s <= 7
        for i in range(20 // s + 1):
            for j in range(20 // s + 1):
                cell = out[b, :, i * s:(i + 1) * s, j * s:(j + 1) * s]
                hi, wj = int(h[b, i, j]), int(w[b, i, j])
                assert 0 <= hi <= 20 - 1 - s and 0 <= wj <= 20 - 1 - s
                crop = x[b, :, hi:hi + s, wj:wj + s][:, :cell.shape[1], :cell.shape[2]]
                assert torch.equal(cell, crop)
    assert set(out.flatten().tolist()) <= set(x.flatten().tolist())
    assert not torch.equal(out, x)


def test_state_dict_holds_the_queue_so_resume_is_exact():
    torch.manual_seed(0)
    a = build_objective(_cfg("method.negatives=patch"), 10)
    torch.manual_seed(1)
    b = build_objective(_cfg("method.negatives=patch"), 10)
    a(*_views(seed=0), 0)
    assert {"queue", "queue_ptr"} <= set(a.state_dict())
    b.load_state_dict(a.state_dict(), strict=True)
    torch.manual_seed(7)
    la = a(*_views(seed=1), 1).loss
    torch.manual_seed(7)
    lb = b(*_views(seed=1), 1).loss
    assert torch.equal(la, lb) and torch.equal(a.queue, b.queue) and int(a.queue_ptr) == int(b.queue_ptr) == 0


@pytest.mark.parametrize("extra, key", [
    (["method.queue_size=10"], "method.queue_size"),
    (["method.temperature=0"], "method.temperature"),
    (["method.negatives=nonsem"], "method.negatives"),  # the old README's --robust value
    (["method.negatives=texture"], "data.name"),  # texture pairs are image files: imagefolder
    (["method.negatives=texture", "data.name=imagefolder"], "data.texture_path"),
    (["method.negatives=texture", "data.name=imagefolder", "data.texture_path=t", "method.n_negatives=2"],
     "method.n_negatives"),
    (["method.alpha=-1"], "method.alpha"),
    (["method.shuffle_groups=3"], "method.shuffle_groups"),
    (["train.workers=2", "train.sync_bn=true", "method.queue_size=8"], "train.sync_bn"),
])
def test_bad_values_are_one_line_errors(extra, key):
    cfg = _cfg(*extra)
    with pytest.raises(ConfigError, match=f"^{key}=") as err:
        cfg.method.validate(cfg)
    assert "\n" not in str(err.value)


def test_queue_must_be_a_multiple_of_the_global_batch():
    cfg = _cfg("data.batch_size=64", "method.queue_size=100")
    with pytest.raises(ConfigError, match="method.queue_size=100 is invalid: must be a multiple of the global batch"):
        MoCoConfig(queue_size=100).validate(cfg)
    MoCoConfig(queue_size=128).validate(cfg)


# --- two workers equal one worker with two BatchNorm groups ---------------------------------------

def _two_worker_inputs():
    g = torch.Generator().manual_seed(11)
    return [torch.rand(8, 3, 8, 8, generator=g) for _ in range(2)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        obj = build_objective(_cfg("method.queue_size=16", "data.batch_size=8", "method.shuffle_groups=1"), 10)
        xq, xk = _two_worker_inputs()
        rows = slice(rank * 4, (rank + 1) * 4)
        out = obj([xq[rows], xk[rows]], torch.zeros(4, dtype=torch.long), 3)
        torch.save({"loss": out.loss.detach(), "queue": obj.queue, "ptr": obj.queue_ptr}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_one_worker_with_two_groups(tmp_path):
    """After one step both workers' queues hold the 8 keys in rank order, equal to one worker's queue
    with two shuffle-BN groups and the same permutation; the mean loss is the one-worker loss."""
    import torch.multiprocessing as mp

    # spawn, not fork: a fork after this process ran OpenMP kernels (earlier tests) can deadlock the children
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    torch.manual_seed(0)
    one = build_objective(_cfg("method.queue_size=16", "data.batch_size=8", "method.shuffle_groups=2"), 10)
    xq, xk = _two_worker_inputs()
    ref = one([xq, xk], torch.zeros(8, dtype=torch.long), 3)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(got[r]["queue"], one.queue, rtol=1e-5, atol=1e-6)
        assert int(got[r]["ptr"]) == int(one.queue_ptr) == 8
    torch.testing.assert_close((got[0]["loss"] + got[1]["loss"]) / 2, ref.loss.detach(), rtol=1e-5, atol=1e-6)


# --- the digits recipe against the seed's command (moco-non-sem-neg.py, main_lincls.py) ----------------------

# --moco-t, --moco-dim, --mlp, --aug-plus (blur), alpha, negatives per query, --patch-ratio, momentum, wd, batch
SEED_PRETRAIN = (0.2, 128, True, "mocov2", 2.0, 1, (16, 72), 0.9, 1e-4, 128)
# main_lincls.py: lr, wd, batch, epochs, milestones
SEED_LINCLS = (10.0, 0.0, 128, 60, (30, 40, 50))


@pytest.mark.parametrize("negatives", ["none", "patch"])
def test_digits_recipe_keeps_the_seed_method_settings(negatives):
    from helpers import load_experiment

    from rayrcm.config import validate

    recipe = load_experiment("moco_digits")
    cfg = validate(recipe.pretrain_config(negatives), check_paths=False)
    m, o, d, t = cfg.method, cfg.optim, cfg.data, cfg.train
    temp, dim, mlp, view, alpha, n_neg, ratio, mom, wd, batch = SEED_PRETRAIN
    assert (m.name, m.temperature, m.dim, m.mlp, m.view) == ("moco", temp, dim, mlp, view)
    assert (m.alpha, m.n_negatives) == (alpha, n_neg)
    assert (m.patch_min, m.patch_max) == ratio and m.negatives == negatives
    assert m.monitor == (negatives == "none")  # plain MoCo logs the non-semantic logit for the comparison
    assert (o.name, o.momentum, o.weight_decay, o.schedule, o.warmup_steps) == ("sgd", mom, wd, "cosine", 0)
    assert d.batch_size == batch
    assert m.queue_size % d.batch_size == 0 and not t.sync_bn and t.workers == 2
    assert d.hflip  # the view flips anyway (--aug-plus); the probe's crop flips as main_lincls.py
    lr, lwd, lbatch, epochs, milestones = SEED_LINCLS
    probe = validate(recipe.probe_config("/tmp/encoder.pt"), check_paths=False)
    assert (probe.method.name, probe.method.protocol, probe.method.head_lrs(lbatch)) == ("linear_probe", "moco", (lr,))
    assert (probe.optim.name, probe.optim.weight_decay) == ("sgd", lwd)
    assert probe.data.batch_size == lbatch and probe.data.hflip  # main_lincls.py: RandomResizedCrop + flip
    assert probe.train.epochs == epochs and probe.optim.schedule == "step" and probe.optim.gamma == 0.1
    assert tuple(probe.optim.milestone_epochs) == milestones


# The default setting "table1" (the paper's Table 1, README checkpoints bs128_lr0.03): the README's command at
# 5fbdc4d, moco-non-sem-neg.py -a resnet50 ... --mlp --moco-t 0.2 --aug-plus --cos --moco-k 16384 --robust patch
# --num-nonsem 1 --alpha 2 --epochs 200 --patch-ratio 16 72, with --lr 0.03 --batch-size 128 and the default
# --moco-m 0.999 (the table's other rows: K 8192, alpha 3)
@pytest.mark.parametrize("queue, alpha", [(16384, 2.0), (16384, 3.0), (8192, 2.0)])
def test_imagenet100_recipe_equals_the_seed_commands(queue, alpha):
    from helpers import load_experiment

    from rayrcm.config import validate

    recipe = load_experiment("moco_imagenet100")
    cfg = validate(recipe.pretrain_config("patch", alpha, queue), check_paths=False)
    m, o, d, t = cfg.method, cfg.optim, cfg.data, cfg.train
    assert cfg.model.encoder == "resnet50" and d.image_size == 224 and d.batch_size == 128 and d.hflip
    assert (m.temperature, m.queue_size, m.momentum, m.dim, m.mlp, m.view) == (0.2, queue, 0.999, 128, True, "mocov2")
    assert (m.negatives, m.n_negatives, m.alpha, m.patch_min, m.patch_max) == ("patch", 1, alpha, 16, 72)
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.03, 0.9, 1e-4)
    assert (o.schedule, o.warmup_steps) == ("cosine", 0)
    assert t.epochs == 200 and not t.sync_bn and m.shuffle_groups == 1
    probe = validate(recipe.probe_config("/tmp/encoder.pt"), check_paths=False)
    assert (probe.method.head_lrs(128), probe.optim.weight_decay, probe.data.batch_size, probe.train.epochs) == ((10.0,), 0.0, 128, 60)
    assert tuple(probe.optim.milestone_epochs) == (30, 40, 50) and probe.method.name == "linear_probe"
    assert len(set(recipe.IMAGENET100)) == 100 and all(w.startswith("n") and len(w) == 9 for w in recipe.IMAGENET100)


# README: moco-non-sem-neg.py -a resnet50 ... --mlp --moco-t 0.2 --aug-plus --cos --moco-k 16384
#         --robust texture --num-nonsem 1 --alpha 2 --epochs 200 in the table1 setting (the table's texture
#         row: K 16384, alpha 2);
#         the dataset is the texture tree <imagenet-100>-texture/, each texture's photo beside it
def test_imagenet100_texture_recipe_equals_the_seed_command():
    from helpers import load_experiment

    from rayrcm.config import validate

    recipe = load_experiment("moco_imagenet100")
    cfg = validate(recipe.pretrain_config("texture", 2.0, 16384, texture_path="/data/imagenet100-texture"),
                   check_paths=False)
    m, o, d, t = cfg.method, cfg.optim, cfg.data, cfg.train
    assert (m.negatives, m.n_negatives, m.alpha, m.queue_size) == ("texture", 1, 2.0, 16384)
    assert (m.temperature, m.momentum, m.dim, m.mlp, m.view) == (0.2, 0.999, 128, True, "mocov2")
    assert m.views(d.augmentation) == ("mocov2", "mocov2", "mocov2@texture")  # the texture replays the query's draws
    assert (d.name, d.texture_path, d.image_size, d.batch_size, d.hflip) == (
        "imagefolder", "/data/imagenet100-texture", 224, 128, True)
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.03, 0.9, 1e-4)
    assert (o.schedule, o.warmup_steps) == ("cosine", 0)
    assert t.epochs == 200 and not t.sync_bn and t.name == "moco-imagenet100-k16384-texture-a2"
    with pytest.raises(ConfigError, match="^data.texture_path="):  # the texture tree is the user's to give
        validate(recipe.pretrain_config("texture"), check_paths=False)


# README at 5fbdc4d: moco-non-sem-neg.py -a resnet50 --lr 0.8 --batch-size 512 --moco-m 0.99 ... --mlp --moco-t 0.2
#   --aug-plus --cos --moco-k 16384 --robust patch --num-nonsem 1 --alpha 2 --epochs 200 --patch-ratio 16 72
#   (and --robust texture --num-nonsem 1 --alpha 2 without the patch ratio)
@pytest.mark.parametrize("negatives, queue", [("patch", 16384), ("texture", 16384), ("patch", 65536)])
def test_imagenet100_readme_setting_equals_the_readme_commands(negatives, queue):
    from helpers import load_experiment

    from rayrcm.config import validate

    recipe = load_experiment("moco_imagenet100")
    cfg = validate(recipe.pretrain_config(negatives, 2.0, queue, texture_path="/data/imagenet100-texture",
                                          setting="readme"), check_paths=False)
    m, o, d, t = cfg.method, cfg.optim, cfg.data, cfg.train
    assert (o.lr, d.batch_size, m.momentum) == (0.8, 512, 0.99)
    assert (m.temperature, m.queue_size, m.dim, m.mlp, m.view) == (0.2, queue, 128, True, "mocov2")
    assert (m.negatives, m.n_negatives, m.alpha) == (negatives, 1, 2.0)
    assert (m.patch_min, m.patch_max) == (16, 72)
    assert (o.name, o.momentum, o.weight_decay, o.schedule, o.warmup_steps) == ("sgd", 0.9, 1e-4, "cosine", 0)
    assert cfg.model.encoder == "resnet50" and d.image_size == 224 and d.hflip
    assert t.epochs == 200 and t.workers == 8 and not t.sync_bn and m.shuffle_groups == 1
    assert t.name == f"moco-imagenet100-readme-k{queue}-{negatives}-a2"
    assert cfg.tracking.alias == f"readme-k{queue}-{negatives}-a2"  # never the table1 runs' aliases
    with pytest.raises(ValueError, match="setting"):
        recipe.pretrain_config(setting="nonsem")


@pytest.mark.parametrize("argv, want", [
    ([], (0.03, 128, 0.999, "k16384-patch-a2")),  # the CLI as before: the table1 setting
    (["--setting", "table1", "--robust", "texture", "--set", "data.texture_path=/t"], (0.03, 128, 0.999, "k16384-texture-a2")),
    (["--setting", "readme", "--robust", "patch"], (0.8, 512, 0.99, "readme-k16384-patch-a2")),
    (["--setting", "readme", "--queue", "8192", "--alpha", "3"], (0.8, 512, 0.99, "readme-k8192-patch-a3")),
])
def test_imagenet100_cli_picks_the_setting(argv, want, capsys):
    import yaml
    from helpers import load_experiment

    recipe = load_experiment("moco_imagenet100")
    recipe.main(["pretrain", *argv, "--dry-run"])
    tree = yaml.safe_load(capsys.readouterr().out)
    got = (tree["optim"]["lr"], tree["data"]["batch_size"], tree["method"]["momentum"], tree["tracking"]["alias"])
    assert got == want


def test_imagenet100_cli_refuses_the_old_readmes_robust_values(capsys):
    from helpers import load_experiment

    recipe = load_experiment("moco_imagenet100")
    for value in ("nonsem", "texture_syn"):  # the README's --robust values before 5fbdc4d's parent 52e8ef1
        with pytest.raises(SystemExit):
            recipe.main(["pretrain", "--robust", value, "--dry-run"])
    with pytest.raises(SystemExit):
        recipe.main(["pretrain", "--setting", "ifm", "--dry-run"])


def test_resnet50_starts_from_torchvisions_init_not_timms_zero_init_last():
    """The authors' encoder is torchvision's resnet50 (moco-non-sem-neg.py:180-182, zero_init_residual=False):
    every BatchNorm weight 1 and bias 0, every convolution kaiming-normal (fan_out, relu). timm zero-initialises
    the last BatchNorm of each residual block (zero_init_last), which would start every block as the identity.
    The key encoder is a copy of the initialised query encoder (builder.py:34-36)."""
    from timm.models.resnet import Bottleneck

    torch.manual_seed(0)
    obj = build_objective(_cfg("model.encoder=resnet50"), 10)
    blocks = [m for m in obj.encoder.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 3 + 4 + 6 + 3
    for block in blocks:
        assert torch.equal(block.bn3.weight, torch.ones_like(block.bn3.weight))
    norms = [m for m in obj.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)
    for conv in (obj.encoder.model.conv1, blocks[0].conv2, blocks[-1].conv1):  # the stem: 3x3 CIFAR stem at 8 px
        w = conv.weight
        want = math.sqrt(2.0 / (w.shape[0] * w.shape[2] * w.shape[3]))  # kaiming_normal_(mode="fan_out")
        assert w.std().item() == pytest.approx(want, rel=0.1), conv
    key = obj.key_encoder.state_dict()
    assert all(torch.equal(key[k], v) for k, v in obj.encoder.state_dict().items())


def test_a_vit_encoder_keeps_its_own_init():
    from rayrcm.models import build_encoder

    cfg = _cfg("model.encoder=vit_digits", "model.patch_size=4")
    torch.manual_seed(0)
    plain = build_encoder(cfg.model, 8).state_dict()
    torch.manual_seed(0)
    got = build_objective(cfg, 10).encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in plain.items())


@pytest.mark.parametrize("hflip", [False, True])
def test_views_flip_as_the_authors_whatever_data_hflip(hflip):
    """--aug-plus (moco-non-sem-neg.py:244-256) always ends in RandomHorizontalFlip; data.hflip (off by
    default) neither removes it nor adds a second one; the texture view replays the query's flip."""
    from torchvision.transforms import v2

    from rayrcm.data.views import PairedView, data_transform

    cfg = _cfg(f"data.hflip={str(hflip).lower()}")
    names = cfg.method.views(cfg.data.augmentation)
    assert names == ("mocov2", "mocov2")
    for name in (*names, "mocov2@texture"):
        t = data_transform(name, cfg.data, large=False)
        t = t.transform if isinstance(t, PairedView) else t
        assert [type(s) for s in t.transforms].count(v2.RandomHorizontalFlip) == 1, name
    crop = data_transform("crop", cfg.data, large=False)  # other pipelines follow data.hflip as before
    assert any(isinstance(s, v2.RandomHorizontalFlip) for s in crop.transforms) == hflip


def test_the_mocov2_view_flips_half_the_images():
    """Behaviour, not structure: a left-right ramp through the view comes back reversed about half the time."""
    from rayrcm.data.views import data_transform

    cfg = _cfg()
    view = data_transform("mocov2", cfg.data, large=False)
    ramp = torch.linspace(0, 255, 8).round().to(torch.uint8).expand(3, 8, 8).contiguous()
    torch.manual_seed(0)
    flipped = 0
    for _ in range(200):
        x = view(ramp).float().mean(0)  # colour jitter and greyscale keep a ramp monotone per row
        flipped += int((x[:, 0] > x[:, -1]).float().mean() > 0.5)
    assert 60 < flipped < 140, flipped


@pytest.mark.slow
def test_patch_negatives_push_the_nonsemantic_logit_below_plain_mocos(tmp_path, ray_cluster, mlflow_server, capsys):
    """The digits recipe's whole table in one command (``moco_digits.py all``): plain MoCo (monitoring
    q.t of patch negatives it does not train on) against patch negatives, same steps and seed, on 2
    Ray Train workers per stage tracked in MLflow, each followed by a short linear probe: the patch
    run's mean non-semantic logit over its last logged points is the lower one (the issue's ordering;
    accuracy is not asserted at this scale); the exported model is the query encoder (no key encoder,
    no head); the table has a row per method with its k-NN and probe accuracy."""
    from helpers import load_experiment
    from mlflow import MlflowClient

    from rayrcm.orchestration.pipeline_job import run_all
    from rayrcm.train.checkpoint import load_model_file

    recipe = load_experiment("moco_digits")
    sets = [f"train.storage_path={tmp_path / 'storage'}", f"tracking.uri={mlflow_server}",
            "tracking.experiment=e2e-moco-order", "tracking.register_as=", "tracking.alias="]
    for alias in ("plain", "patch"):
        sets += [f"pretrain-{alias}:data.batch_size=64", f"pretrain-{alias}:train.steps=60",
                 f"pretrain-{alias}:train.checkpoint_every=60", f"pretrain-{alias}:train.log_every=10",
                 f"probe-{alias}:train.epochs=2", f"probe-{alias}:train.checkpoint_epochs=1"]
    result = run_all("moco-digits", recipe.table_stages(), sets)
    printed = capsys.readouterr().out
    logits = {}
    for alias in ("plain", "patch"):
        pre = result.outputs[f"pretrain-{alias}"]
        state = load_model_file(f"{tmp_path / 'storage'}/{pre.job}/model.pt")["model"]
        assert state and all(not k.startswith(("key_", "head.")) for k in state)
        history = MlflowClient(mlflow_server).get_metric_history(pre.run_id, "nonsem_logit")
        last = [m.value for m in sorted(history, key=lambda m: m.step)][-3:]
        assert len(last) == 3 and all(math.isfinite(v) for v in last)
        logits[alias] = sum(last) / len(last)
    table = result.table.table
    assert list(table.index) == ["MoCo v2", "MoCo v2 + patch negatives"] and "| MoCo v2 |" in printed
    assert table[["k-NN", "linear probe"]].notna().all().all()
    print(f"mean non-semantic logit over the last 30 steps: plain {logits['plain']:.4f}, patch {logits['patch']:.4f}")
    assert logits["patch"] < logits["plain"], logits
