"""The contract of every registered ``rayrcm evaluate`` suite (:mod:`rayrcm.eval.suites`): it builds
its cells for a tiny config, owns exactly those cells' rows, and a shard of it runs on a tiny model
and tiny tensors giving one hit per image; the existing suites score a batch as they did before the
registry (the formulas spelled out here); a new suite is one class plus a registry line. And the one
attack budget (:class:`rayrcm.attacks.AttackBudget`) behind every config that names one, whose user
keys stay flat."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rayrcm.attacks import AttackBudget, PGDConfig
from rayrcm.errors import ConfigError
from rayrcm.eval.robust import RobustEvalConfig, autoattack_masks, pgd_correct
from rayrcm.eval.suite import SUITES, build_cells, config_from_args, plan_shards, validate
from rayrcm.eval.suites import EVALUATE_SUITES, Suite
from rayrcm.eval.suites.base import ShardSettings
from rayrcm.eval.suites.shards import row_hits, shard_hits, shard_images

N, SIZE = 10, 8
BUDGET = {"eps": 0.06, "step_size": 0.02, "pgd_steps": 2, "aa_iters": 2, "aa_targets": 2, "aa_queries": 10}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def _data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels the model mostly gets right (so an attack has something to break)."""
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(N, 3, SIZE, SIZE, generator=g) * 255).to(torch.uint8)
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(1)
    labels[::4] = (labels[::4] + 1) % 10
    return images, labels


def _cifar10_1(root) -> str:
    root.mkdir()
    rng = np.random.RandomState(0)
    np.save(root / "cifar10.1_v6_data.npy", (rng.rand(6, SIZE, SIZE, 3) * 255).astype(np.uint8))
    np.save(root / "cifar10.1_v6_labels.npy", rng.randint(0, 10, 6).astype(np.int64))
    return str(root)


def _job(tmp_path, suite: str):
    cfg = validate(config_from_args([
        "model=m.pt", f"out_dir={tmp_path}", f"suite={suite}", "severities=1,3", "corruptions=gaussian_noise,contrast",
        "seed=5", *([f"shift_path={_cifar10_1(tmp_path / 'c101')}"] if suite == "shift" else []),
        *[f"{k}={v}" for k, v in BUDGET.items()]]))
    settings = ShardSettings(seed=cfg.seed, batch=4, eps=cfg.eps, step_size=cfg.step_size, pgd_steps=cfg.pgd_steps,
                             aa_iters=cfg.aa_iters, aa_targets=cfg.aa_targets, aa_queries=cfg.aa_queries,
                             image_size=SIZE, shift_path=cfg.shift_path)
    return cfg, settings


def test_the_suites_keep_their_names_and_order():
    assert SUITES == EVALUATE_SUITES.ordered() == ("clean", "corruptions", "pgd", "aa-apgd", "aa", "shift")


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_builds_its_cells_and_a_shard_gives_one_hit_per_image(tmp_path, name):
    cfg, settings = _job(tmp_path, name)
    suite = EVALUATE_SUITES.get(name)
    shifted: dict = {}
    cells = build_cells(cfg, "cifar10", 10, shifted=shifted)
    assert cells and all(c.source in suite.sources for c in cells)
    assert (name == "shift") == bool(shifted)  # only a read set is recorded for the protocol
    rows = plan_shards(cells, list(range(N)), 6, "m.pt")
    model = _model()
    images, labels = _data(model)
    for row in rows:
        assert EVALUATE_SUITES.of_row(row) is suite  # its rows are its own, and no earlier suite's
        y, hits = row_hits(model, row, images, labels, settings)
        x, _ = shard_images(row, images, labels, settings)
        assert x.dtype == torch.uint8 and x.shape == (len(row["index"]), 3, SIZE, SIZE)
        assert hits.dtype == torch.bool and hits.shape == y.shape == (len(row["index"]),)
        assert 0 <= int(hits.sum()) <= len(y)
        if row is rows[0]:  # the compatible entry point (by attack) agrees with the actor's (by row)
            assert torch.equal(hits, shard_hits(suite.model(model, row, settings), x, y, row["attack"], settings,
                                                index=row["index"]))


def _before(model, x, y, idx, attack, s: ShardSettings) -> torch.Tensor:
    """How a batch was scored before the registry (``eval.robust.attack_correct``'s if-chain)."""
    if attack == "none":
        with torch.no_grad():
            return model(x).argmax(1) == y
    if attack.startswith("pgd"):
        return pgd_correct(model, x, y, idx, PGDConfig(s.norm, s.eps, s.step_size, s.pgd_steps, True), s.seed)
    return autoattack_masks(model, x, y, idx, seed=s.seed, eps=s.eps, norm=s.norm, aa_iters=s.aa_iters,
                            aa_targets=s.aa_targets, aa_queries=s.aa_queries, standard=attack == "aa")[0]


@pytest.mark.parametrize("attack", ["none", "pgd2", "aa-apgd", "aa"])
def test_the_existing_suites_score_a_shard_as_before(tmp_path, attack):
    _, s = _job(tmp_path, "clean")
    model = _model()
    images, labels = _data(model)
    index = [3, 4, 5, 6, 7, 8, 9]  # not from 0: the seeds are the images' indices
    x_u8, y = images[3:], labels[3:]
    before = torch.cat([_before(model, x_u8[lo:lo + 4].float() / 255, y[lo:lo + 4], index[lo:lo + 4], attack, s)
                        for lo in range(0, len(y), 4)])
    after = shard_hits(model, x_u8, y, attack, s, index=index)
    assert torch.equal(after, before)
    if attack != "none":
        clean = shard_hits(model, x_u8, y, "none", s, index=index)
        assert int(after.sum()) < int(clean.sum())  # the budget leaves something to find


def test_generated_corruptions_are_read_as_before(tmp_path):
    from rayrcm.data.corruptions import corrupt_tensor

    cfg, settings = _job(tmp_path, "corruptions")
    images, labels = _data(_model())
    row = plan_shards(build_cells(cfg, "cifar10", 10), list(range(N)), 6, "m.pt")[-1]  # contrast, severity 3, 2nd shard
    x, y = shard_images(row, images, labels, settings)
    assert torch.equal(x, corrupt_tensor(images[6:], list(range(6, N)), "contrast", 3, seed=5))
    assert torch.equal(y, labels[6:])


class _Flipped(Suite):
    """A suite of one module: the clean images upside down."""

    sources = ("flipped",)

    def cells(self, ctx):
        from rayrcm.eval.suites.base import NONE, Cell

        return [Cell(ctx.dataset, "flip", 0, False, NONE, "flipped")]

    def images(self, row, images, labels, settings):
        start, stop = int(row["start"]), int(row["stop"])
        return images[start:stop].flip(2), labels[start:stop]


def test_a_new_suite_is_one_class_and_a_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(EVALUATE_SUITES._items, "flipped", _Flipped())  # the registry line, undone after the test
    cfg, settings = _job(tmp_path, "clean")
    cfg = validate(config_from_args(["suite=clean,flipped"], cfg))
    rows = plan_shards(build_cells(cfg, "cifar10", 10), list(range(N)), 6, "m.pt")
    assert [r["source"] for r in rows] == ["clean", "clean", "flipped", "flipped"]
    model = _model()
    images, labels = _data(model)
    flipped = [row_hits(model, r, images, labels, settings)[1] for r in rows[2:]]
    with torch.no_grad():
        expected = model(images.flip(2).float() / 255).argmax(1) == labels
    assert torch.equal(torch.cat(flipped), expected)
    with pytest.raises(ConfigError, match="suite='bogus' is invalid: choose from: clean, .*, shift, flipped"):
        validate(config_from_args(["suite=bogus"], cfg))


# ----------------------------------------------------------------------------- the attack budget


def test_one_budget_behind_every_config_and_the_user_keys_stay_flat():
    from rayrcm.config import ExperimentConfig, apply_overrides

    assert PGDConfig("l2", 0.5, 0.1, 7, False) == PGDConfig.of(AttackBudget("l2", 0.5, 0.1, 7), random_start=False)
    assert isinstance(PGDConfig(), AttackBudget) and PGDConfig().steps == 10 and PGDConfig().random_start
    job = config_from_args(["eps=0.1", "step_size=0.02", "pgd_steps=3"])
    assert job.budget == AttackBudget("linf", 0.1, 0.02, 3)
    s = ShardSettings(eps=0.1, step_size=0.02, pgd_steps=3)
    assert s.budget == job.budget
    ev = RobustEvalConfig(eps=0.1, step_size=0.02, pgd_steps=3, batch_size=8)
    assert ev.budget == job.budget and RobustEvalConfig.of(job.budget, batch_size=8) == ev
    cfg = apply_overrides(ExperimentConfig(), ["method.name=adv_finetune", "method.eps=0.05", "method.step_size=0.01",
                                               "method.pgd_steps=4", "method.eval_pgd_steps=9", "method.eval_aa_iters=7"])
    m = cfg.method
    assert m.attack() == PGDConfig("linf", 0.05, 0.01, 4, True)
    r = m.robust_eval()
    assert r.budget == AttackBudget("linf", 0.05, 0.01, 9) and r.aa_iters == 7 and r.aa_version == "standard"


@pytest.mark.parametrize("budget, key, needle", [
    (AttackBudget(norm="l3"), "attack.norm", "choose one of: linf, l2"),
    (AttackBudget(eps=-0.1), "attack.eps", "must be >= 0"),
    (AttackBudget(step_size=0.0), "attack.step_size", "must be > 0"),
    (AttackBudget(steps=-1), "attack.steps", "must be >= 0"),
])
def test_the_budget_validates_in_one_line_naming_the_key(budget, key, needle):
    with pytest.raises(ConfigError) as err:
        budget.validate()
    assert str(err.value).startswith(key + "=") and needle in str(err.value) and "\n" not in str(err.value)


def test_a_flat_config_names_its_own_keys():
    with pytest.raises(ConfigError, match=r"^step_size=0\.0 is invalid"):
        validate(config_from_args(["model=m.pt", "step_size=0"]))
    with pytest.raises(ConfigError, match=r"^pgd_steps=-1 is invalid"):
        AttackBudget(steps=-1).validate("", steps="pgd_steps")
    with pytest.raises(ConfigError, match=r"^method\.eval_pgd_steps=0 is invalid"):
        RobustEvalConfig(pgd_steps=0).validate("method.eval")
