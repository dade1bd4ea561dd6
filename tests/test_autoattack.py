"""The standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on a small model trained here in seconds
(an MLP on the bundled 8x8 digits): our APGD-CE and APGD-T match torchattacks' within a point, every
attack runs only on the points still robust and AA <= APGD-CE+APGD-T <= clean point by point, a model
whose answer cannot change keeps every point, and ``rayrcm evaluate --suite aa`` computes and names
"AutoAttack (standard)" (its pure half here; the Ray job in a slow test)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_model
from torch import nn
from torch.nn import functional as F

from rayrcm.attacks import apgd_ce, apgd_targeted, autoattack_robust, standard_autoattack
from rayrcm.attacks import autoattack as aa_mod

EPS = 16 / 255  # leaves about 2/3 of the points robust on the MLP below: a number both ways can miss


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared machine two threads waiting on each
    other make every small op (Square and FAB run thousands of them) ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp():
    """An MLP on the 8x8 digits (about 97% test accuracy after ~1 s of CPU), with 300 test points."""
    from rayrcm.data.datasets import digits_tensors

    x, y = digits_tensors(8)
    x = x.float() / 255
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    xtr, ytr, xte, yte = x[order[:1400]], y[order[:1400]], x[order[1400:1700]], y[order[1400:1700]]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 100):
            b = perm[i:i + 100]
            opt.zero_grad()
            F.cross_entropy(model(xtr[b]), ytr[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(xte).argmax(1) == yte).float().mean() > 0.9
    return model, xte, yte


def test_our_apgd_matches_torchattacks_within_a_point(mlp):
    import torchattacks

    model, x, y = mlp
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    torch.manual_seed(0)
    ours_ce = (clean & apgd_ce(model, x, y, eps=EPS, n_iter=100)).float().mean().item()
    torch.manual_seed(0)
    ours_t = (clean & apgd_targeted(model, x, y, eps=EPS, n_iter=100, n_targets=9)).float().mean().item()
    adv = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", seed=0)(x, y)
    theirs_ce = (model(adv).argmax(1) == y).float().mean().item()
    adv = torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, n_classes=10, seed=0)(x, y)
    theirs_t = (model(adv).argmax(1) == y).float().mean().item()
    assert 0.3 < theirs_ce < clean.float().mean().item() - 0.1  # the budget leaves something to find
    assert abs(ours_ce - theirs_ce) <= 0.01, (ours_ce, theirs_ce)
    assert abs(ours_t - theirs_t) <= 0.01, (ours_t, theirs_t)


def test_each_attack_runs_on_the_survivors_and_aa_is_below_the_upper_bound(mlp, monkeypatch):
    model, x, y = mlp
    x, y = x[:100], y[:100]
    seen: list[tuple[str, torch.Tensor]] = []

    def spy(name, fn):
        def wrapped(model_, xi, yi, **kw):
            seen.append((name, xi.clone()))
            with torch.no_grad():
                assert bool((model_(xi).argmax(1) == yi).all()), f"{name} got a point already broken"
            return fn(model_, xi, yi, **kw)
        return wrapped

    for name, attr in (("apgd-ce", "apgd_ce"), ("apgd-t", "apgd_targeted"), ("fab-t", "fab_targeted"),
                       ("square", "square")):
        monkeypatch.setattr(aa_mod, attr, spy(name, getattr(aa_mod, attr)))
    torch.manual_seed(3)
    result = standard_autoattack(model, x, y, eps=24 / 255, n_iter=20, n_targets=3, n_queries=300)
    torch.manual_seed(3)
    upper = autoattack_robust(model, x, y, eps=24 / 255, n_iter=20, n_targets=3)
    assert [n for n, _ in seen] == list(aa_mod.STANDARD)
    before = result.clean
    for name, xi in seen:  # each attack got exactly the points that survived the ones before it
        assert torch.equal(xi, x[before]), name
        assert result.attacked[name] == int(before.sum())
        assert not (result.after[name] & ~before).any()  # nothing comes back to life
        before = result.after[name]
    assert torch.equal(result.upper_bound, upper)  # the same draws as aa-apgd, point by point
    assert not (result.robust & ~upper).any() and not (upper & ~result.clean).any()
    clean, ub, aa = (float(t.float().mean()) for t in (result.clean, upper, result.robust))
    assert aa <= ub <= clean and ub < clean - 0.2


def test_fab_t_and_square_each_break_points_within_the_budget(mlp):
    model, x, y = mlp
    x, y = x[:60], y[:60]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    fab = aa_mod.fab_targeted(model, x, y, eps=24 / 255, n_iter=20, n_targets=3)
    sq = aa_mod.square(model, x, y, eps=24 / 255, n_queries=300, seed=0)
    assert fab.float().mean() < 0.8 and sq.float().mean() < 0.95  # both attacks find something
    assert torch.equal(aa_mod.square(model, x, y, eps=24 / 255, n_queries=300, seed=0), sq)  # seeded
    state = torch.random.get_rng_state()
    aa_mod.square(model, x[:4], y[:4], eps=24 / 255, n_queries=20, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # torchattacks' reseeding stays inside


class _Constant(nn.Module):
    """Logits that no input changes (zero gradient everywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(10, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0).flatten(1).sum(1, keepdim=True) + self.bias


def test_a_model_whose_answer_cannot_change_keeps_every_point():
    model = _Constant().eval()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.full((6,), 9)
    torch.manual_seed(0)
    result = standard_autoattack(model, x, y, eps=8 / 255)  # the standard settings, 5000 queries included
    assert result.robust.all() and result.attacked == {a: 6 for a in aa_mod.STANDARD}
    wrong = torch.zeros(6, dtype=torch.long)  # a clean error is broken before any attack
    assert not standard_autoattack(model, x, wrong, eps=8 / 255, n_queries=10).robust.any()


def _aa_job_cfg(model, out, name, *extra):
    from rayrcm.orchestration import evaluate_job

    return evaluate_job.config_from_args([
        f"model={model}", f"out_dir={out}", f"name={name}", "tracking.enabled=false", "suite=clean,aa,aa-apgd",
        "max_images=24", "shard_size=12", "batch=8", "aa_iters=5", "aa_targets=3", "aa_queries=50",
        "eps=0.1", "flush_every=1", *extra])


def test_the_evaluate_job_accepts_aa_and_names_it_autoattack_standard(tmp_path):
    import pandas as pd

    from rayrcm.eval.suites.shards import shard_correct, shard_images
    from rayrcm.models.export import build_from_file
    from rayrcm.orchestration import evaluate_job as ej

    model_file = make_model(tmp_path / "model.pt", seed=1)
    p = ej.prepare(_aa_job_cfg(model_file, tmp_path / "out", "aa"))
    assert [c.attack for c in p.cells] == ["none", "aa", "aa-apgd"] and p.protocol["aa_queries"] == 50
    model, _ = build_from_file(model_file)
    model.eval()
    rows = []
    for r in p.todo:  # what each actor does with a shard row
        x, y = shard_images(r, p.images, p.labels, p.settings)
        correct = shard_correct(model, x, y, r["attack"], p.settings, index=r["index"])
        rows.append({**r, "images": len(y), "correct": correct})
    by = {(r["attack"], r["shard"]): r["correct"] for r in rows}
    for shard in (0, 1):  # aa replays aa-apgd's draws, then FAB-T and Square: never above it
        assert by[("aa", shard)] <= by[("aa-apgd", shard)] <= by[("none", shard)]
    table = ej.results_table(pd.DataFrame(rows))
    md, tex = ej.to_markdown(table), ej.to_latex(table)
    head = ej.headline(table)
    assert {"AutoAttack (standard)", "APGD-CE+APGD-T (upper bound)"} <= set(head)
    assert "| AutoAttack (standard) |" in md and "| APGD-CE+APGD-T (upper bound) |" in md
    assert "AutoAttack (standard)" in tex
    assert ej.headline_metric("AutoAttack (standard)") == "autoattack_standard"
    assert ej.headline_metric("APGD-CE+APGD-T (upper bound)") == "apgdce_apgdt_upper_bound"


@pytest.mark.slow
def test_the_evaluate_job_runs_aa_on_ray(tmp_path, ray_cluster):
    from rayrcm.orchestration import evaluate_job as ej

    model_file = make_model(tmp_path / "model.pt", seed=1)
    result = ej.run(_aa_job_cfg(model_file, tmp_path / "out", "aa-ray", "workers=2"), show_table=False)
    t = result.table.set_index("attack")
    assert set(t.index) == {"none", "aa", "aa-apgd"}
    assert t.loc["aa"].correct <= t.loc["aa-apgd"].correct <= t.loc["none"].correct
    assert "| AutoAttack (standard) |" in (result.out / "table.md").read_text()
