"""APGD's step-size schedule against fra31/auto-attack's, transcribed line by line.

The reference is ``autoattack/autopgd_base.py`` of fra31/auto-attack at commit a392200
(``APGDAttack.check_oscillation`` and the "check step size" block of ``attack_single_run``, L-inf and
L2 branch). Its loss buffer ``loss_steps`` starts at zeros and ``check_oscillation`` indexes
``x[j - counter5 - 1]`` with ``j - counter5 - 1 = -1`` at the first checkpoint: the wrap-around reads
the buffer's still-zero last row, so the first step's loss is compared with 0, not with the starting
loss. :class:`rayrcm.attacks.apgd.StepSchedule` must halve the same samples at the same iterations,
and :func:`rayrcm.attacks.apgd_run` must follow a transcription of the whole L-inf run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.attacks.apgd import StepSchedule, apgd_run, dlr_targeted


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tensors are tiny, and threads waiting on each other on a busy machine
    make every small op slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- fra31's code, transcribed (names and order as in autopgd_base.py) ----

def fra31_check_oscillation(x, j, k, y5, k3=0.75):
    t = torch.zeros(x.shape[1])
    for counter5 in range(k):
        t += (x[j - counter5] > x[j - counter5 - 1]).float()
    return (t <= k * k3 * torch.ones_like(t)).float()


def fra31_halvings(start_loss: torch.Tensor, losses: torch.Tensor, rho: float = 0.75) -> dict[int, torch.Tensor]:
    """The iterations at which fra31 halves steps, and whose: ``{i: mask}`` for the loss sequence
    ``losses`` (``n_iter x B``, the loss after each step) from the starting loss ``start_loss``."""
    n_iter = losses.shape[0]
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    loss_steps = torch.zeros([n_iter, losses.shape[1]])
    loss_best = start_loss.clone()
    k = n_iter_2 + 0
    counter3 = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones_like(loss_best)
    out = {}
    for i in range(n_iter):
        y1 = losses[i].clone()
        loss_steps[i] = y1 + 0
        ind = (y1 > loss_best).nonzero().squeeze()
        loss_best[ind] = y1[ind] + 0
        counter3 += 1
        if counter3 == k:
            fl_oscillation = fra31_check_oscillation(loss_steps, i, k, loss_best, k3=rho)
            fl_reduce_no_impr = (1. - reduced_last_check) * (loss_best_last_check >= loss_best).float()
            fl_oscillation = torch.max(fl_oscillation, fl_reduce_no_impr)
            reduced_last_check = fl_oscillation.clone()
            loss_best_last_check = loss_best.clone()
            out[i] = fl_oscillation > 0
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return out


def ours_halvings(start_loss: torch.Tensor, losses: torch.Tensor, rho: float = 0.75) -> dict[int, torch.Tensor]:
    best = start_loss.clone()
    schedule = StepSchedule(losses.shape[0], best, rho)
    out = {}
    for i, loss in enumerate(losses):
        best = torch.maximum(best, loss)
        reduce = schedule.update(loss, best)
        if reduce is not None:
            out[i] = reduce
    return out


def assert_same(start: torch.Tensor, losses: torch.Tensor) -> dict[int, torch.Tensor]:
    theirs, ours = fra31_halvings(start, losses), ours_halvings(start, losses)
    assert list(ours) == list(theirs)  # the same checkpoint iterations
    for i in theirs:
        assert torch.equal(ours[i], theirs[i]), (i, ours[i], theirs[i])
    return theirs


def _sequences(n_iter: int, b: int, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    walk = torch.randn(n_iter, b, generator=g).cumsum(0) * 0.1
    trend = torch.linspace(0, 1, n_iter)[:, None] * torch.rand(1, b, generator=g)
    ce = (1.0 + walk + trend).clamp_min(0)  # CE-like: positive
    dlr = -0.5 + 0.2 * walk + trend * 0.3  # targeted DLR of correct points: negative
    flat = torch.full((n_iter, b), 0.5)  # ties: never a rise, never an improvement
    rounded = (torch.rand(n_iter, b, generator=g) * 4).round() / 4  # many ties
    start = torch.rand(b, generator=g) * 2 - 0.5
    return [("ce", start.abs() + 0.5, ce), ("dlr", start - 1, dlr), ("flat", torch.full((b,), 0.5), flat),
            ("rounded", start, rounded), ("dlr from above", start + 2, dlr)]


@pytest.mark.parametrize("n_iter", [1, 2, 3, 5, 10, 20, 37, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_halvings_equal_fra31_on_loss_sequences(n_iter, seed):
    for name, start, losses in _sequences(n_iter, 16, seed):
        assert assert_same(start, losses), name  # at least one checkpoint


def _first_checkpoint_case(first: float, start: float) -> tuple[torch.Tensor, torch.Tensor]:
    """100 iterations: the first checkpoint at iteration 21 counts 22 pairs against ``22 * 0.75 = 16.5``.
    Steps 2..22 rise 16 times out of 21; whether the first step counts decides the halving."""
    rises = [1.0] * 16 + [0.0] * 5
    losses = [first]
    for r in rises:
        losses.append(losses[-1] + (0.01 if r else -0.001))
    losses += [losses[-1] + 0.01 * (i + 1) for i in range(100 - len(losses))]
    return torch.tensor([start]), torch.tensor(losses)[:, None]


def test_first_checkpoint_compares_the_first_step_with_zero_not_the_start():
    # CE: the first step lowers the loss (2.0 -> 1.5) but 1.5 > 0 counts as a rise: 17 > 16.5, no halving
    start, losses = _first_checkpoint_case(first=1.5, start=2.0)
    theirs = assert_same(start, losses)
    assert not theirs[21].item()
    # targeted DLR: the first step raises the loss (-0.8 -> -0.6) but -0.6 <= 0 is no rise: 16, halving
    start, losses = _first_checkpoint_case(first=-0.6, start=-0.8)
    theirs = assert_same(start, losses)
    assert theirs[21].item()
    assert sorted(theirs)[:3] == [21, 40, 56]  # checkpoint lengths 22, 19, 16, ... down to 6


# ---- the whole L-inf run: fra31's attack_single_run, transcribed (no EOT, no verbose) ----

def fra31_attack_single_run(model, x, y, loss_fn, eps, n_iter, rho=0.75):
    """fra31's ``attack_single_run`` for ``norm='Linf'``; returns ``(acc, x_best)``."""
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    t = 2 * torch.rand(x.shape).detach() - 1
    x_adv = x + eps * torch.ones_like(x).detach() * (t / (t.abs().view(x.shape[0], -1).max(1)[0].view(-1, 1) + 1e-12))
    x_adv = x_adv.clamp(0., 1.)
    x_best = x_adv.clone()
    loss_steps = torch.zeros([n_iter, x.shape[0]])

    def forward(xa):
        xa.requires_grad_()
        with torch.enable_grad():
            logits = model(xa)
            loss_indiv = loss_fn(logits)
        return logits, loss_indiv.detach(), torch.autograd.grad(loss_indiv.sum(), [xa])[0].detach()

    logits, loss_indiv, grad = forward(x_adv)
    grad_best = grad.clone()
    acc = logits.detach().max(1)[1] == y
    loss_best = loss_indiv.detach().clone()
    step_size = 2. * eps * torch.ones([x.shape[0], 1])
    x_adv_old = x_adv.clone()
    k, counter3 = n_iter_2 + 0, 0
    loss_best_last_check, reduced_last_check = loss_best.clone(), torch.ones_like(loss_best)
    for i in range(n_iter):
        with torch.no_grad():
            x_adv = x_adv.detach()
            grad2 = x_adv - x_adv_old
            x_adv_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            x_adv_1 = x_adv + step_size * torch.sign(grad)
            x_adv_1 = torch.clamp(torch.min(torch.max(x_adv_1, x - eps), x + eps), 0.0, 1.0)
            x_adv_1 = torch.clamp(torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0)
            x_adv = x_adv_1 + 0.
        logits, loss_indiv, grad = forward(x_adv)
        pred = logits.detach().max(1)[1] == y
        acc = torch.min(acc, pred)
        with torch.no_grad():
            y1 = loss_indiv.detach().clone()
            loss_steps[i] = y1 + 0
            ind = (y1 > loss_best).nonzero().squeeze()
            x_best[ind], grad_best[ind], loss_best[ind] = x_adv[ind].clone(), grad[ind].clone(), y1[ind] + 0
            counter3 += 1
            if counter3 == k:
                fl_oscillation = fra31_check_oscillation(loss_steps, i, k, loss_best, k3=rho)
                fl_reduce_no_impr = (1. - reduced_last_check) * (loss_best_last_check >= loss_best).float()
                fl_oscillation = torch.max(fl_oscillation, fl_reduce_no_impr)
                reduced_last_check, loss_best_last_check = fl_oscillation.clone(), loss_best.clone()
                if fl_oscillation.sum() > 0:
                    ind_fl_osc = (fl_oscillation > 0).nonzero().squeeze()
                    step_size[ind_fl_osc] /= 2.0
                    x_adv[ind_fl_osc], grad[ind_fl_osc] = x_best[ind_fl_osc].clone(), grad_best[ind_fl_osc].clone()
                k = max(k - size_decr, n_iter_min)
                counter3 = 0
    return acc, x_best


@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
@pytest.mark.parametrize("n_iter", [10, 30])
def test_apgd_run_follows_fra31_step_for_step(loss, n_iter):
    """A small random network on random inputs (flat, as fra31's L-inf code takes any shape): the same
    robust mask and the same best point of every robust sample, from the same random start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    x = torch.rand(64, 24)
    with torch.no_grad():
        logits = model(x)
    y, target = logits.argmax(1), logits.sort(dim=1)[1][:, -2]
    loss_fn = ((lambda z: F.cross_entropy(z, y, reduction="none")) if loss == "ce"
               else (lambda z: dlr_targeted(z, y, target)))
    eps = 0.1
    torch.manual_seed(5)
    acc, x_best = fra31_attack_single_run(model, x, y, loss_fn, eps, n_iter)
    torch.manual_seed(5)
    robust, x_found = apgd_run(model, x, y, loss_fn, eps=eps, n_iter=n_iter)
    assert 0 < int(acc.sum()) < len(y)  # the budget breaks some points and not others
    assert torch.equal(robust, acc)
    assert torch.allclose(x_found[robust], x_best[robust], atol=1e-6, rtol=0)
