"""Gradient accumulation (``train.accum_iter``) and the cosine weight decay (``optim.weight_decay_end``)
that the FT-CADIS commands use: an update from ``A`` micro-batches equals one from the whole batch,
on one process and on two DDP processes; epochs count updates of ``batch x A`` images; the weight
decay follows the authors' cosine step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayrcm.config import ExperimentConfig, apply_overrides, resolve_epochs, validate
from rayrcm.errors import ConfigError
from rayrcm.objectives import build_objective
from rayrcm.train.loop import Loop
from rayrcm.train.optim import CosineWeightDecay, build_optimizer, build_scheduler

BASE = ["method.name=gaussian", "method.sigma=0.25", "data.image_size=8", "model.patch_size=4", "optim.name=sgd",
        "optim.lr=0.5", "optim.momentum=0", "optim.weight_decay=0"]


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(n, 3, 8, 8, generator=g)], torch.randint(0, 10, (n,), generator=g)


def _objective() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """A ViT classifier under cross-entropy (LayerNorm only: no statistic couples a batch's images);
    sigma 1e-12 makes the objective's own noise draws negligible, so every run sees the same inputs."""
    cfg = apply_overrides(ExperimentConfig(), [*BASE, "method.sigma=1e-12"])
    torch.manual_seed(0)
    obj = build_objective(cfg, 10)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    return obj, opt, build_scheduler(opt, cfg.optim, 10)


def test_one_update_from_micro_batches_equals_one_from_the_whole_batch():
    batch = _batch()
    got = {}
    for accum in (1, 2, 4):
        obj, opt, sched = _objective()
        before = [p.detach().clone() for p in obj.parameters()]
        out = Loop(obj, obj, opt, sched, torch.device("cpu"), accum=accum).step(3, batch)
        got[accum] = (out["loss"], [p.detach().clone() for p in obj.parameters()])
        assert any(not torch.equal(a, b) for a, b in zip(before, got[accum][1], strict=True))
    for accum in (2, 4):
        assert got[accum][0] == pytest.approx(got[1][0], rel=1e-6)  # the mean of equal micro-batch means
        for a, b in zip(got[accum][1], got[1][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        views, target = _batch()
        per = 8 // world
        obj, opt, sched = _objective()
        model = DistributedDataParallel(obj, find_unused_parameters=True)
        loop = Loop(model, obj, opt, sched, torch.device("cpu"), accum=2)
        loop.step(3, ([views[0][rank * per:(rank + 1) * per]], target[rank * per:(rank + 1) * per]))
        torch.save([p.detach() for p in obj.parameters()], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_accumulating_equal_one_process_on_the_whole_batch(tmp_path):
    """2 gloo processes x 2 micro-batches of 2 images: DDP all-reduces once, on the last micro-batch,
    and the update equals one process's on the 8 images (no accumulation)."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    obj, opt, sched = _objective()
    Loop(obj, obj, opt, sched, torch.device("cpu")).step(3, _batch())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(got, obj.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_an_epoch_counts_updates_of_batch_times_accum_images():
    cfg = apply_overrides(ExperimentConfig(), [*BASE, "data.batch_size=32", "train.epochs=2", "optim.warmup_epochs=1",
                                               "train.accum_iter=4"])
    out = resolve_epochs(validate(cfg, check_paths=False), 1000)
    assert out.train.steps == 2 * (1000 // 128) and out.optim.warmup_steps == 1000 // 128
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(ExperimentConfig(), ["train.accum_iter=0"]), check_paths=False)
    assert "train.accum_iter" in str(err.value) and "\n" not in str(err.value)


def _authors_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
    """FT-CADIS ``utils/utils.py`` ``cosine_scheduler`` without warm-up (as their call), transcribed."""
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


def test_weight_decay_follows_the_authors_cosine_on_decaying_groups_only():
    cfg = apply_overrides(ExperimentConfig(), ["data.image_size=8", "model.patch_size=4", "optim.name=adamw",
                                               "optim.weight_decay=0.04", "optim.weight_decay_end=0.4"])
    obj = build_objective(cfg, 10)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    sched = CosineWeightDecay(build_scheduler(opt, cfg.optim, 30), opt, 0.04, 0.4, 30)
    expected = _authors_cosine_scheduler(0.04, 0.4, 3, 10)
    zero = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert zero and len(sched.groups) == len(opt.param_groups) - len(zero)
    for step in range(30):
        sched.step_update(step)
        assert all(g["weight_decay"] == pytest.approx(expected[step], rel=1e-12) for g in sched.groups)
        assert all(g["weight_decay"] == 0.0 for g in zero)
    assert sched.weight_decay(0) == pytest.approx(0.04) and sched.weight_decay(15) == pytest.approx(0.22)
    assert sched.weight_decay(99) == pytest.approx(0.4) and math.isfinite(sched.weight_decay(30))
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(cfg, ["optim.weight_decay_end=-0.5"]), check_paths=False)
    assert "optim.weight_decay_end" in str(err.value)
