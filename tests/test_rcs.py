"""RCS coreset selection against the authors' code (GodXuxilie/Efficient_ACL_via_RCS,
``ACL_RCS/small_scale_datasets/RCS.py``, transcribed below): the RD loss, the fc gradient vectors,
the RD attack and gradient, the per-unit loss, the greedy loop with its one-step updates, the
validation rows, the selection epochs and the epoch-indexed lr; then exact size, determinism,
sharding, and a real 2-worker run whose epochs after the warm-up train on the selected coreset."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from rayrcm.config import ExperimentConfig, apply_overrides, resolve_epochs, validate
from rayrcm.errors import ConfigError
from rayrcm.models import ACLProjector, convert_dual_bn
from rayrcm.objectives import rcs
from rayrcm.objectives.acl import ACLObjective
from rayrcm.objectives.rcs import (
    RDValidation,
    coreset_size,
    grad_vector,
    rd_attack_config,
    rd_loss,
    rd_rows,
    select_coreset,
)
from rayrcm.objectives.rcs_schedule import CoresetSchedule, RCSSettings, selection_epoch
from rayrcm.sections import OptimConfig
from rayrcm.train.loop import batches_from
from rayrcm.train.optim import EpochIndexedSchedule, build_scheduler

# ----------------------------------------------------------------------------- the authors' code, transcribed


def authors_normalize(AA):  # RCS.py:64-67
    AA -= AA.min(1, keepdim=True)[0]
    AA /= AA.max(1, keepdim=True)[0]
    return AA


def authors_kl_loss(nat, adv, reduction="mean"):  # RCS.py:76-80
    P = torch.log(authors_normalize(adv) + 1e-8)
    Q = authors_normalize(nat) + 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KLDivLoss's note on 'mean'
        return torch.nn.KLDivLoss(reduction=reduction)(P, Q)


def authors_nt_xent(x, t=0.5):  # RCS.py:42-57
    n = x.norm(p=2, dim=1, keepdim=True)
    x = (x @ x.t()) / (n * n.t()).clamp(min=1e-8)
    x = torch.exp(x / t)
    idx = torch.arange(x.size()[0])
    idx[::2] += 1
    idx[1::2] -= 1
    x = x[idx]
    x = x.diag() / (x.sum(0) - torch.exp(torch.tensor(1 / t)))
    return -torch.log(x)


def authors_pgd(model, inputs, eps=8. / 255., alpha=2. / 255., iters=10):  # RCS.py:90-125, loss_type='KL'
    delta = torch.rand_like(inputs) * eps * 2 - eps
    delta = torch.nn.Parameter(delta)
    nat_feature = model(inputs, "normal").detach()
    for _ in range(iters):
        features = model(inputs + delta, "pgd")
        loss = authors_kl_loss(features, nat_feature)
        loss.backward()
        delta.data = delta.data + alpha * delta.grad.sign()
        delta.grad = None
        delta.data = torch.clamp(delta.data, min=-eps, max=eps)
        delta.data = torch.clamp(inputs + delta.data, min=0, max=1) - inputs
    return (inputs + delta).detach()


class AuthorsBN(nn.Module):  # models/resnet_multi_bn.py batch_norm_multiple
    def __init__(self, planes, bn_names=("normal", "pgd")):
        super().__init__()
        self.bn_list = nn.ModuleList([nn.BatchNorm1d(planes) for _ in bn_names])
        self.bn_names_dict = {name: i for i, name in enumerate(bn_names)}

    def forward(self, x):
        return self.bn_list[self.bn_names_dict[x[1]]](x[0])


class AuthorsProjHead(nn.Module):  # models/resnet_multi_bn.py proj_head (in = hidden = out = ch)
    def __init__(self, ch):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(ch, ch), AuthorsBN(ch)
        self.fc2, self.bn2 = nn.Linear(ch, ch, bias=False), AuthorsBN(ch)
        self.fc3, self.bn3 = nn.Linear(ch, ch, bias=False), AuthorsBN(ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, bn_name):
        x = self.relu(self.bn1([self.fc1(x), bn_name]))
        x = self.relu(self.bn2([self.fc2(x), bn_name]))
        return self.bn3([self.fc3(x), bn_name])


def authors_fc_vector(head):  # RCS.py:255-261 / 294-299
    return torch.cat([p.grad.detach().mean(dim=0).view(1, -1) for n, p in head.named_parameters() if "fc" in n], dim=1)


def authors_head_from(projector):
    """The authors' proj_head holding the weights of our (dual-BN) ACLProjector: nat -> 'normal', adv -> 'pgd'."""
    ch = projector.fc1.weight.shape[1]
    head = AuthorsProjHead(ch).to(projector.fc1.weight.dtype)
    with torch.no_grad():
        for k in ("fc1", "fc2", "fc3"):
            getattr(head, k).load_state_dict(getattr(projector, k).state_dict())
        for k in ("bn1", "bn2", "bn3"):
            ours = getattr(projector, k)
            getattr(head, k).bn_list[0].load_state_dict(ours.nat.state_dict())
            getattr(head, k).bn_list[1].load_state_dict(ours.adv.state_dict())
    return head.eval()


def authors_greedy(head, per_batch_ori_grads, feature_val_nat, feature_val_adv, batch_num, lr):
    """RCS.py:249-366 without the validation attack (fixed features): the order of the chosen batches."""
    linear_layer = head
    model_fc = head  # self.model.fc is linear_layer: both updates below land on the same module
    ori_linear_layer_state_dict = {k: v.clone() for k, v in linear_layer.state_dict().items()}

    def grad_val_now():
        linear_layer.zero_grad()
        features = linear_layer(feature_val_nat, "normal")
        features_adv = linear_layer(feature_val_adv, "pgd")
        authors_kl_loss(features_adv, features).backward()
        return authors_fc_vector(linear_layer)

    grad_val = grad_val_now()
    per_batch_grads = torch.cat([torch.cat([g.mean(dim=0).view(1, -1) for g in gs], dim=1) for gs in per_batch_ori_grads])
    index_list = torch.LongTensor(list(range(len(per_batch_ori_grads))))
    order = []
    for j in range(batch_num):
        gain = torch.matmul(per_batch_grads[index_list], grad_val.reshape(-1, 1)).squeeze()
        r = torch.argmax(gain, dim=0)
        order.append(int(index_list[r]))
        if j == batch_num - 1:
            break
        g = per_batch_ori_grads[index_list[r]]
        linear_layer.fc1.weight.data = linear_layer.fc1.weight.data - lr * g[0]
        linear_layer.fc1.bias.data = linear_layer.fc1.bias.data - lr * g[1]
        linear_layer.fc2.weight.data = linear_layer.fc2.weight.data - lr * g[2]
        linear_layer.fc3.weight.data = linear_layer.fc3.weight.data - lr * g[3]
        model_fc.fc1.weight.data = model_fc.fc1.weight.data - lr * g[0]
        model_fc.fc1.bias.data = model_fc.fc1.bias.data - lr * g[1]
        model_fc.fc2.weight.data = model_fc.fc2.weight.data - lr * g[2]
        model_fc.fc3.weight.data = model_fc.fc3.weight.data - lr * g[3]
        grad_val = grad_val_now()
        index_list = torch.cat((index_list[0:r], index_list[r + 1:]), dim=0)  # del_tensor_ele
    linear_layer.load_state_dict(ori_linear_layer_state_dict)
    return order


def authors_cosine_annealing(step, total_steps, lr_max, lr_min, warmup_steps=0):  # ACL_RCS.py:124-131
    if step < warmup_steps:
        return lr_max * step / warmup_steps
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + np.cos((step - warmup_steps) / (total_steps - warmup_steps) * np.pi))


# ----------------------------------------------------------------------------- helpers


def _projector(ch=6, seed=0, dtype=torch.float32):
    """A dual-BN ACLProjector with distinct, non-trivial statistics and affines on both branches."""
    torch.manual_seed(seed)
    proj = ACLProjector(ch, ch, ch)
    convert_dual_bn(proj)
    with torch.no_grad():
        for m in proj.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return proj.to(dtype).eval()


def _objective(dim=64, seed=0, dtype=torch.float32, **method):
    overrides = ["method.name=acl", "model.encoder=cifar_resnet8", f"model.proj_hidden_dim={dim}", f"model.proj_dim={dim}",
                 "data.image_size=16", "method.pgd_steps=2"] + [f"method.{k}={v}" for k, v in method.items()]
    cfg = validate(apply_overrides(ExperimentConfig(), overrides))
    torch.manual_seed(seed)
    obj = ACLObjective(cfg.method, cfg.model, 16)
    with torch.no_grad():  # both branches distinct everywhere
        for m in obj.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return obj.to(dtype).eval()


def _authors_model(obj, head):
    """The authors' ``model(x, bn_name)`` / ``get_feature`` over our encoder and their head."""
    route = {"normal": "nat", "pgd": "adv"}
    return SimpleNamespace(forward=lambda x, bn: head(obj.rcs_features(x, route[bn]), bn),
                           get_feature=lambda x, bn: obj.rcs_features(x, route[bn]))


class _ThreadComm:
    """gather / sum over ``world`` threads (the collectives of a training job)."""

    def __init__(self, world):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), {}

    def _all(self, rank, t):
        self.slots[rank] = t
        self.barrier.wait()
        parts = [self.slots[r] for r in range(self.world)]
        self.barrier.wait()
        return parts

    def gather(self, rank):
        return lambda t: torch.cat(self._all(rank, t))

    def sum(self, rank):
        return lambda t: torch.stack(self._all(rank, t)).sum(0)


def _threads(fn, world=2):
    out = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r))) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    return out


# ----------------------------------------------------------------------------- the pieces, against the authors


def test_rd_loss_is_the_authors_kl_on_min_max_normalised_features():
    proj = _projector(ch=6)
    head = authors_head_from(proj)
    g = torch.Generator().manual_seed(1)
    f_nat, f_adv = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    expected = authors_kl_loss(head(f_adv, "pgd"), head(f_nat, "normal"))  # RCS.py:250-252
    expected.backward()
    ns = SimpleNamespace(projector=proj)
    ours = rd_loss(ACLObjective.rcs_head(ns, f_nat, "nat"), ACLObjective.rcs_head(ns, f_adv, "adv"))
    ours_grads = torch.autograd.grad(ours, [proj.fc1.weight, proj.fc1.bias, proj.fc2.weight, proj.fc3.weight])
    assert torch.allclose(ours, expected, rtol=1e-6)
    assert torch.allclose(grad_vector(ours_grads), authors_fc_vector(head)[0], rtol=1e-5, atol=1e-8)


def test_rcs_params_are_the_authors_fc_parameters_in_their_order():
    obj = _objective(dim=16)
    assert list(obj.rcs_params()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc3.weight"]
    two = _objective(dim=16, two_layer_proj="true")
    assert list(two.rcs_params()) == ["fc1.weight", "fc1.bias", "fc2.weight"]
    vec = grad_vector([p.detach() for p in obj.rcs_params().values()])
    assert vec.numel() == 64 + 1 + 16 + 16  # mean over dim 0: (in,), a number, (hidden,), (hidden,)


def test_unit_gradient_is_the_authors_half_sum_of_cl_nat_and_cl_adv_on_their_branches(monkeypatch):
    """(CL(nat) + CL(adv)) / 2 on the natural / adversarial branches whatever the method's weight and scale."""
    obj = _objective(dim=64, weight=0.5, scale=0.5)
    g = torch.Generator().manual_seed(3)
    xi, xj, xi_adv, xj_adv = (torch.rand(5, 3, 16, 16, generator=g) for _ in range(4))
    monkeypatch.setattr(obj, "adversarial_views", lambda a, b: (xi_adv, xj_adv))
    ours = obj.rcs_unit_gradient([xi, xj], torch.zeros(5))
    assert not obj.training

    head = authors_head_from(obj.projector)
    model = _authors_model(obj, head)
    inputs, inputs_adv = torch.stack([xi, xj], 1).flatten(0, 1), torch.stack([xi_adv, xj_adv], 1).flatten(0, 1)
    with torch.no_grad():  # RCS.py:281-290
        features_adv_before_fc = model.get_feature(inputs_adv, "pgd")
        features_before_fc = model.get_feature(inputs, "normal")
    batch_loss = torch.mean((authors_nt_xent(head(features_before_fc, "normal")) + authors_nt_xent(head(features_adv_before_fc, "pgd"))) / 2)
    batch_loss.backward()
    expected = [p.grad for n, p in head.named_parameters() if "fc" in n]
    assert len(ours) == len(expected) == 4
    for a, b in zip(ours, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert torch.allclose(grad_vector(ours), authors_fc_vector(head)[0], rtol=1e-4, atol=1e-7)


def test_rd_rows_are_the_first_half_of_each_validation_batch_twice():
    for n, b in [(500, 512), (10, 4), (9, 4), (7, 3), (1, 8)]:
        ids = torch.arange(n)
        expected = []
        for start in range(0, n, b):
            batch = torch.stack([ids[start:start + b]] * 2, 1)  # (b, 2): the two identical views
            d = batch.shape
            expected.append(batch.reshape(d[0] * 2)[: d[0]].tolist())  # RCS.py:235-236
        assert rd_rows(n, b) == expected
    assert sorted(set(rd_rows(500, 512)[0])) == list(range(250))  # CIFAR: 1% validation, batch 512 -> 250 images


def test_rcs_defaults_are_the_authors_step_and_attack():
    cfg = validate(apply_overrides(ExperimentConfig(), ["method.name=acl"])).method
    assert cfg.rcs_lr == 0.01 and rcs.STEPS_PER_PICK == 2
    attack = rd_attack_config(cfg)
    assert (attack.norm, attack.steps, attack.random_start) == ("linf", 3, True)
    assert attack.eps == pytest.approx(8 / 255) and attack.step_size == pytest.approx((10 / 255) / 3)


def test_rd_validation_gradient_matches_the_authors_attack_and_loss():
    """Attack of the duplicated half batches, features, KL on min-max features, fc vector (RCS.py:232-261), at moved fc."""
    obj = _objective(dim=64, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    images = torch.rand(10, 3, 16, 16, generator=g, dtype=torch.float64)
    val = [((images[i],), 0) for i in range(10)]
    params = obj.rcs_params()
    names = list(params)
    theta = [p.detach() + 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params.values()]
    cfg = obj.cfg
    validation = RDValidation(obj, val, names, 64, rd_attack_config(cfg), batch_size=4, seed=11, device="cpu")
    ours = validation(theta, pick=3)

    proj = copy.deepcopy(obj.projector)
    with torch.no_grad():
        for n, t in zip(names, theta):
            proj.get_parameter(n).copy_(t)
    head = authors_head_from(proj)
    model = _authors_model(obj, head)
    feats_nat, feats_adv = [], []
    for b, start in enumerate(range(0, 10, 4)):
        batch = images[start:start + 4]
        valid_inputs = torch.stack([batch, batch], 1)
        d = valid_inputs.size()
        valid_inputs = valid_inputs.view(d[0] * 2, d[2], d[3], d[4])[: d[0]]
        torch.manual_seed(rcs.mix_seeds(11, 3, b))
        valid_inputs_adv = authors_pgd(model.forward, valid_inputs, iters=3, alpha=(10. / 255.) / 3)
        with torch.no_grad():
            feats_adv.append(model.get_feature(valid_inputs_adv, "pgd"))
            feats_nat.append(model.get_feature(valid_inputs, "normal"))
    head.zero_grad()
    authors_kl_loss(head(torch.cat(feats_adv), "pgd"), head(torch.cat(feats_nat), "normal")).backward()
    expected = authors_fc_vector(head)[0]
    assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-9)
    # the attack mattered: the same vector without it differs
    head.zero_grad()
    authors_kl_loss(head(torch.cat(feats_nat), "pgd"), head(torch.cat(feats_nat), "normal")).backward()
    assert not torch.allclose(authors_fc_vector(head)[0], expected, rtol=1e-2)


def test_greedy_order_and_one_step_updates_match_the_authors_loop(monkeypatch):
    """Gains on the mean-over-dim-0 vectors, argmax over the rest, full-gradient step applied twice, no step after
    the last pick, q_U recomputed at the moved fc (RCS.py:305-366)."""
    ch, m, picks, lr = 6, 12, 6, 0.01
    proj = _projector(ch=ch, seed=7)
    g = torch.Generator().manual_seed(8)
    f_nat, f_adv = torch.randn(16, ch, generator=g), torch.randn(16, ch, generator=g)
    names = list({n: p for n, p in proj.named_parameters() if n.split(".")[0] in ("fc1", "fc2", "fc3")})
    theta0 = [proj.get_parameter(n).detach().clone() for n in names]
    unit_grads = [[3.0 * torch.randn(t.shape, generator=g) for t in theta0] for _ in range(m)]
    expected = authors_greedy(authors_head_from(proj), unit_grads, f_nat, f_adv, picks, lr)

    ns = SimpleNamespace(projector=proj)

    def val_grad(theta, pick):
        leaves = {n: t.clone().requires_grad_(True) for n, t in zip(names, theta)}
        loss = rd_loss(ACLObjective.rcs_head(ns, f_nat, "nat", leaves), ACLObjective.rcs_head(ns, f_adv, "adv", leaves))
        return grad_vector(torch.autograd.grad(loss, list(leaves.values())))

    def run():
        shared = []

        def share(t):
            shared.append(t.clone())
            return t

        chosen = select_coreset(lambda idx: unit_grads[idx[0]], val_grad, theta0, m, fraction=picks / m, unit=1, lr=lr,
                                seed=4, share=share)
        flat = [torch.cat([x.reshape(-1) for x in gs]) for gs in unit_grads]
        stepped = [next(i for i, f in enumerate(flat) if torch.equal(f, s)) for s in shared]
        return chosen, stepped

    chosen, stepped = run()
    assert stepped == expected[:-1]  # the units stepped on, in order: every pick but the last
    assert chosen == sorted(expected)
    for n, t in zip(names, theta0):  # the projector itself is not moved
        assert torch.equal(proj.get_parameter(n), t)
    # the toy is sensitive to the step: one step per pick, or none, picks otherwise
    monkeypatch.setattr(rcs, "STEPS_PER_PICK", 1)
    assert run()[1] != expected[:-1]
    static = sorted(range(m), key=lambda k: -float(grad_vector(unit_grads[k]) @ val_grad(theta0, 0)))[:picks]
    assert static != expected


def test_selection_epochs_are_the_authors():
    """Identical whenever the interval (> 1) divides the warm-up, as in the authors' 100/20 and 20/10."""
    for warmup, fre in [(100, 20), (20, 10), (6, 3)]:
        for epoch in range(1, 400):  # the authors' 1-based epochs (ACL_RCS.py:267-279)
            selects = epoch >= warmup and (epoch - 1) % fre == 0
            on_coreset = selects or epoch > warmup
            ours = selection_epoch(epoch - 1, warmup, fre)
            assert (ours is not None) == on_coreset
            assert (ours == epoch - 1) == selects


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_epoch_indexed_lr_is_the_authors_rebuilt_per_epoch_cosine():
    """The authors rebuild LambdaLR(cosine over epochs * len(loader), warm-up 10 * len(loader)) every epoch and
    fast-forward it (ACL_RCS.py:232-240, 281-291, 319): the lr is a function of the epoch position."""
    epochs, warm_epochs, rcs_warmup, full, core, lr, min_lr = 30, 10, 12, 7, 2, 5.0, 1e-6
    steps_in = [full if e < rcs_warmup else core for e in range(epochs + 1)]

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)

    def lambda_lr(length):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda step: authors_cosine_annealing(
            step, epochs * length, 1, min_lr / lr, warmup_steps=warm_epochs * length))

    theirs = []
    scheduler = lambda_lr(steps_in[0])
    for epoch in range(1, epochs + 1):
        length = steps_in[epoch - 1]
        if epoch >= 2:
            scheduler = lambda_lr(length)
            for _ in range((epoch - 1) * length):
                scheduler.step()
        for _ in range(length):
            scheduler.step()  # train(): before each batch
            theirs.append(opt.param_groups[0]["lr"])

    ours_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    inner = build_scheduler(ours_opt, OptimConfig(name="sgd", lr=lr, min_lr=min_lr, warmup_steps=warm_epochs * full,
                                                  schedule_steps=epochs * full), sum(steps_in[:epochs]))
    sched = EpochIndexedSchedule(inner, lambda e: steps_in[e], full)
    ours = []
    for step in range(sum(steps_in[:epochs])):
        sched.step_update(step + 1)  # the authors' counter: updates including this one
        ours.append(ours_opt.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    # at the end of RCS's warm-up the lr is at 12 of 30 epochs, not at 84 of 120 steps
    assert sched.position(rcs_warmup * full) == rcs_warmup
    assert EpochIndexedSchedule(inner, lambda e: full, full).position(37.5) == pytest.approx(37.5 / full)


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("fraction,unit", [(0.2, 1), (0.2, 7), (0.5, 4), (1.0, 9), (0.01, 3)])
def test_coreset_has_exactly_the_fraction_without_duplicates_and_is_deterministic(fraction, unit):
    n = 60
    grads = torch.randn(n, 3, 4, generator=torch.Generator().manual_seed(1))

    def val(theta, pick):
        return grad_vector([torch.ones(3, 4) - theta[0]])

    def run(seed):
        return select_coreset(lambda idx: [grads[idx].sum(0)], val, [torch.zeros(3, 4)], n, fraction=fraction, unit=unit,
                              lr=0.1, seed=seed)

    a, b = run(3), run(3)
    assert len(a) == coreset_size(n, fraction) == max(1, round(fraction * n))
    assert len(set(a)) == len(a) and all(0 <= i < n for i in a)
    assert a == b == sorted(a)


def test_sharded_scoring_and_shared_steps_give_the_single_process_coreset():
    """Two 'workers' scoring alternate units, gathering vectors and sharing the chosen unit's gradient."""
    n, grads = 50, torch.randn(50, 4, 8, generator=torch.Generator().manual_seed(2))

    def val(theta, pick):
        return grad_vector([torch.linspace(-1, 1, 32).view(4, 8) - theta[0]])

    kw = dict(fraction=0.3, unit=3, lr=0.05, seed=4)
    single = select_coreset(lambda idx: [grads[idx].sum(0)], val, [torch.zeros(4, 8)], n, **kw)
    comm = _ThreadComm(2)
    out = _threads(lambda r: select_coreset(lambda idx: [grads[idx].sum(0)], val, [torch.zeros(4, 8)], n, rank=r, world=2,
                                            gather=comm.gather(r), share=comm.sum(r), **kw))
    assert out[0] == out[1] == single


def test_sharded_rd_validation_gives_the_single_process_vector():
    obj = _objective(dim=16)
    images = torch.rand(11, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    val = [((images[i],), 0) for i in range(11)]
    names = list(obj.rcs_params())
    theta = [p.detach().clone() for p in obj.rcs_params().values()]
    attack = rd_attack_config(obj.cfg)
    single = RDValidation(obj, val, names, 64, attack, batch_size=4, seed=1, device="cpu")(theta, 2)
    comm, copies = _ThreadComm(2), [copy.deepcopy(obj) for _ in range(2)]
    out = _threads(lambda r: RDValidation(copies[r], val, names, 64, attack, batch_size=4, seed=1, device="cpu", rank=r,
                                          world=2, gather=comm.gather(r))(theta, 2))
    assert torch.allclose(out[0], single, rtol=1e-5, atol=1e-9) and torch.allclose(out[1], single, rtol=1e-5, atol=1e-9)


def test_selection_on_a_small_network_is_exact_and_leaves_it_unchanged(tmp_path):
    obj = _objective(dim=16)
    obj.train()
    g = torch.Generator().manual_seed(9)
    train = [((torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)), 0) for _ in range(20)]
    val = [((torch.rand(3, 16, 16, generator=g),), 0) for _ in range(6)]
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    cfg = dataclasses.replace(obj.cfg, rcs_fraction=0.3, rcs_warmup_epochs=1, rcs_interval_epochs=2)
    sched = CoresetSchedule(obj, cfg, train, val, tmp_path, RCSSettings(unit=4, lr=0.01, seed=0, device="cpu", val_batch=4))
    assert sched(0) is None
    chosen = sched(1)
    assert len(chosen) == 6 == len(set(chosen)) and obj.training
    assert all(torch.equal(before[k], v) for k, v in obj.state_dict().items())
    assert json.loads(sched.path(1).read_text())["indices"] == chosen and sched(2) == chosen  # kept, reused


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


def test_a_coreset_run_schedules_the_lr_by_epoch_position():
    """What a training session builds for an RCS recipe: the cosine spans the whole-set epochs
    (resolve_epochs) and is read at the epoch position, one update ahead as the authors step it."""
    from rayrcm.train.optim import ShiftedSchedule
    from rayrcm.train.session import epoch_indexed

    cfg = validate(apply_overrides(ExperimentConfig(), ["method.name=acl", "method.rcs_fraction=0.2", "method.rcs_warmup_epochs=2",
                                                        "train.epochs=5", "data.batch_size=10", "optim.name=sgd", "optim.lr=1.0",
                                                        "optim.schedule_offset=1"]))
    cfg = resolve_epochs(cfg, 100)
    assert (cfg.train.steps, cfg.optim.schedule_steps) == (26, 50)  # 2 x 10 + 3 x 2 steps; a cosine of 5 x 10
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = ShiftedSchedule(epoch_indexed(build_scheduler(opt, cfg.optim, cfg.train.steps), cfg, 100, 1), 1)
    lrs = []
    for step in range(cfg.train.steps):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    cosine = [0.5 * (1 + np.cos(np.pi * t / 50)) for t in range(51)]
    assert lrs[19] == pytest.approx(cosine[20])  # the last warm-up epoch's last update: 20 of 50
    assert lrs[21] == pytest.approx(cosine[30])  # the first coreset epoch's 2 updates end at epoch 3 of 5
    assert lrs[-1] == pytest.approx(cosine[50], abs=1e-12)
    # without coresets nothing changes: the plain per-step schedule
    plain = resolve_epochs(validate(apply_overrides(ExperimentConfig(), ["method.name=acl", "train.epochs=5", "data.batch_size=10"])), 100)
    assert plain.optim.schedule_steps == 0
    inner = build_scheduler(opt, plain.optim, plain.train.steps)
    assert epoch_indexed(inner, plain, 100, 1) is inner


@pytest.mark.parametrize("key,value", [("rcs_fraction", "0"), ("rcs_fraction", "-0.1"), ("rcs_fraction", "1.5"),
                                       ("rcs_lr", "0"), ("rcs_pgd_steps", "-1"), ("rcs_eps", "-0.1")])
def test_bad_rcs_settings_fail_with_one_line(key, value):
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(ExperimentConfig(), ["method.name=acl", f"method.{key}={value}"]))
    assert str(err.value).startswith(f"method.{key}=") and "\n" not in str(err.value)


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
