"""RCS coreset selection: exact size, no duplicates, determinism, gradient alignment, and a real
2-worker run whose epochs after the warm-up train on the selected coreset."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

from rayrcm.config import ExperimentConfig, apply_overrides, resolve_epochs, validate
from rayrcm.errors import ConfigError
from rayrcm.train.loop import batches_from
from rayrcm.train.rcs import RDGradient, coreset_size, greedy_select, select_coreset


def _toy(n=60, p=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, p, generator=g)
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, generator=g))
        layer.bias.zero_()
    a_nat, a_adv = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
    return grads, RDGradient(a_nat, a_adv, layer)


@pytest.mark.parametrize("fraction,unit", [(0.2, 1), (0.2, 7), (0.5, 4), (1.0, 9), (0.01, 3)])
def test_coreset_has_exactly_the_fraction_without_duplicates_and_is_deterministic(fraction, unit):
    n = 60
    grads = torch.randn(n, 12, generator=torch.Generator().manual_seed(1))
    val = lambda delta: torch.ones(12) - delta  # noqa: E731

    def run(seed):
        return select_coreset(lambda idx: grads[idx].sum(0), lambda: val, n, fraction=fraction, unit=unit, lr=0.1, seed=seed)

    a, b = run(3), run(3)
    assert len(a) == coreset_size(n, fraction) == max(1, round(fraction * n))
    assert len(set(a)) == len(a) and all(0 <= i < n for i in a)
    assert a == b == sorted(a)


def test_sharded_scoring_gives_the_single_process_coreset():
    """Two 'workers' scoring alternate units, joined by a gather, choose what one process chooses."""
    n, grads = 50, torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    val = lambda delta: torch.linspace(-1, 1, 8) - delta  # noqa: E731
    kw = dict(fraction=0.3, unit=3, lr=0.05, seed=4)
    single = select_coreset(lambda idx: grads[idx].sum(0), lambda: val, n, **kw)
    blocks, barrier, out = {}, threading.Barrier(2), {}

    def worker(rank):
        def gather(block):
            blocks[rank] = block
            barrier.wait()
            return torch.cat([blocks[0], blocks[1]])
        out[rank] = select_coreset(lambda idx: grads[idx].sum(0), lambda: val, n, rank=rank, world=2, gather=gather, **kw)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    sharded = out[1]
    assert out[0] == out[1]
    assert sharded == single


def test_greedy_picks_align_with_the_validation_gradient_better_than_random():
    grads, rd = _toy(n=200, p=12)
    q_u = rd(torch.zeros(12))
    picked = greedy_select(grads, rd, 20, lr=1e-3)
    align = lambda rows: torch.nn.functional.cosine_similarity(grads[rows], q_u[None], dim=1).mean().item()  # noqa: E731
    rand = [align(torch.randperm(200, generator=torch.Generator().manual_seed(s))[:20].tolist()) for s in range(20)]
    assert align(picked) > max(rand)
    assert len(set(picked)) == 20


def test_rd_gradient_matches_autograd_of_the_kl():
    _, rd = _toy()
    delta = torch.randn(12) * 0.1
    w = (rd.weight + delta.view(3, 4)).requires_grad_(True)
    p = torch.log_softmax(rd.a_nat @ w.T, 1)
    q = torch.log_softmax(rd.a_adv @ w.T, 1)
    kl = (p.exp() * (p - q)).sum()
    assert torch.allclose(rd(delta), torch.autograd.grad(kl, w)[0].flatten(), atol=1e-5)


def test_rcs_steps_and_epoch_pools():
    cfg = validate(apply_overrides(ExperimentConfig(), ["method.name=acl", "method.rcs_fraction=0.2", "method.rcs_warmup_epochs=2",
                                                        "train.epochs=5", "data.batch_size=10"]))
    out = resolve_epochs(cfg, 100)
    assert out.train.steps == 2 * 10 + 3 * 2  # warm-up epochs of 10 steps, coreset epochs of 20 samples
    pools = {}
    ds = torch.utils.data.TensorDataset(torch.arange(100))
    core = list(range(0, 100, 5))
    it = batches_from(ds, 10, 0, 1, 0, 0, on_epoch=lambda e: pools.setdefault(e, None if e < 2 else core),
                      epoch_samples=lambda e: cfg.method.epoch_samples(e, 100))
    seen = [next(it)[0] for _ in range(26)]
    assert all(set(b.tolist()) <= set(core) for b in seen[20:])
    # resuming at step 21 lands in epoch 2's second batch
    resumed = batches_from(ds, 10, 0, 1, 0, 21, on_epoch=lambda e: None if e < 2 else core,
                           epoch_samples=lambda e: cfg.method.epoch_samples(e, 100))
    assert torch.equal(next(resumed)[0], seen[21])


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5"])
def test_fraction_outside_unit_interval_fails_with_one_line(value):
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(ExperimentConfig(), ["method.name=acl", f"method.rcs_fraction={value}"]))
    assert str(err.value).startswith("method.rcs_fraction=") and "\n" not in str(err.value)


@pytest.mark.slow
def test_acl_rcs_on_two_workers_trains_on_the_selected_coreset(ray_cluster, tmp_path):
    from rayrcm.orchestration.trainer import fit

    cfg = apply_overrides(ExperimentConfig(), [
        "method.name=acl", "model.encoder=cifar_resnet8", "model.proj_hidden_dim=32", "model.proj_dim=16",
        "data.augmentation=simclr", "data.batch_size=64", "method.pgd_steps=1", "method.rcs_fraction=0.2",
        "method.rcs_warmup_epochs=1", "method.rcs_interval_epochs=1", "method.rcs_val_images=64", "train.epochs=3",
        "train.workers=2", "train.checkpoint_every=1000", "train.log_every=5", "tracking.enabled=false",
        f"train.storage_path={tmp_path}", "train.name=acl-rcs-test"])
    result = fit(cfg)
    files = sorted((tmp_path / "acl-rcs-test" / "coreset").glob("coreset_epoch_*.json"))
    assert [f.name for f in files] == ["coreset_epoch_00001.json", "coreset_epoch_00002.json"]
    n = 1293
    for f in files:
        idx = json.loads(f.read_text())["indices"]
        assert len(idx) == round(0.2 * n) and len(set(idx)) == len(idx)
    assert result.metrics["step"] == 20 + 2 * 4  # 20 full-set steps, then two coreset epochs of 259 // 64 = 4 steps
