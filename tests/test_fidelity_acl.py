"""ACL / DynACL / AIR pretraining and SLF / ALF / AFF fine-tuning against the authors' code
(GodXuxilie/Enhancing_ACL_via_AIR: ``optimizer/lars.py``, ``pretraining.py``, ``AIR.py``,
``models/resnet_multi_bn.py``, ``finetuning_utils.py``): each test transcribes the authors' function
and compares it with rayrcm's on the same inputs and weights."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import load_experiment
from torch import nn
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides, resolve_epochs, validate
from rayrcm.models import ACLProjector, DualBatchNorm, bn_route, build_classifier
from rayrcm.models.dual_bn import branch_view
from rayrcm.objectives import build_objective
from rayrcm.objectives.adv_finetune import AdvFinetuneObjective
from rayrcm.objectives.air import air_robust, air_standard
from rayrcm.train.optim import build_optimizer, build_scheduler


def _recipe(name):
    return load_experiment(name, "fidelity")


# --- item 8: LARS ---------------------------------------------------------------------------


class AuthorsLARS(torch.optim.Optimizer):
    """``optimizer/lars.py`` of the authors, transcribed (``add_(scalar, tensor)`` written as ``add_(scalar * tensor)``)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0005, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            weight_decay, momentum, eta, lr = group["weight_decay"], group["momentum"], group["eta"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                d_p = p.grad.data
                weight_norm = torch.norm(p.data)
                grad_norm = torch.norm(d_p)
                global_lr = lr
                local_lr = eta * weight_norm / (grad_norm + weight_decay * weight_norm)
                local_lr[(weight_norm < 1e-15) | (grad_norm < 1e-15)] = 1.0
                actual_lr = local_lr * global_lr
                if "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = torch.zeros_like(p.data)
                else:
                    buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(actual_lr * (d_p + weight_decay * p.data))
                p.data.add_(-buf)


def _lars_net() -> nn.Module:
    """Biases, BatchNorms (biases at their zero init, where both implementations take the plain step
    ``lr (g + wd w)``) and linear layers, in float64. No bias sits right before a BatchNorm here: its
    true gradient is 0, and the authors then take the plain step when the rounded gradient norm is
    below 1e-15 while timm adapts whenever it is above 0 (a fidelity note, not a training difference:
    in float32 such rounded gradients are far above 1e-15 in both)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.ReLU(), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 5))
    with torch.no_grad():
        net[7].weight.uniform_(0.5, 1.5)
        net[7].bias.uniform_(-0.5, 0.5)
    return net.double()


def _lars_loss(net: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + step)
    x, w = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    return ((net(x) - w) ** 2).mean()


def test_lars_matches_the_authors_for_every_parameter_over_several_steps():
    """The recipe's optimizer (LARS lr 5.0, wd 1e-6, one decayed group) against the authors'
    ``LARS(model.parameters(), lr=5.0, weight_decay=1e-6)`` at a constant lr: equal for every parameter,
    biases and BatchNorm parameters included (also at their zero init, where both take the plain step)."""
    o = _recipe("acl_cifar10").pretrain_config("air").optim
    assert (o.name, o.lr, o.weight_decay, o.weight_decay_all, o.momentum) == ("lars", 5.0, 1e-6, True, 0.9)
    ours_net, ref_net = _lars_net(), _lars_net()
    ours = build_optimizer(ours_net, None, o)
    ref = AuthorsLARS(ref_net.parameters(), lr=o.lr, weight_decay=1e-6)
    start = {k: v.detach().clone() for k, v in ref_net.named_parameters()}
    for step in range(4):
        for net, opt in ((ours_net, ours), (ref_net, ref)):
            opt.zero_grad()
            _lars_loss(net, step).backward()
            opt.step()
        for (name, a), (_, b) in zip(ours_net.named_parameters(), ref_net.named_parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-10, msg=f"step {step}: {name}")
    # a BatchNorm bias moved by a LARS-sized step, not by lr * grad (the old plain-SGD step at lr 5)
    moved = (ref_net[7].bias - start["7.bias"]).abs().max()
    assert 0 < moved < 0.05


# --- item 9: warm-up and cosine -------------------------------------------------------------


def _authors_cosine_annealing(step, total_steps, lr_max, lr_min, warmup_steps=0):
    if step < warmup_steps:
        return lr_max * step / warmup_steps
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + np.cos((step - warmup_steps) / (total_steps - warmup_steps) * np.pi))


def _authors_lrs(lr: float, epochs: int, per_epoch: int) -> list[float]:
    """pretraining.py: LambdaLR(cosine_annealing(step, epochs * len(loader), 1, 1e-6 / lr, 10 * len(loader))),
    ``scheduler.step()`` at the top of every iteration, before ``optimizer.step()``: the lr of each update."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda=lambda s: _authors_cosine_annealing(s, epochs * per_epoch, 1, 1e-6 / lr, warmup_steps=10 * per_epoch))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": the authors' order
        for _ in range(epochs * per_epoch):
            sched.step()
            out.append(opt.param_groups[0]["lr"])
            opt.step()
    return out


def test_warmup_and_cosine_match_the_authors_schedule():
    """The recipe warms up linearly over 10 epochs and decays to 1e-6 on the authors' curve. The
    authors step LambdaLR before each update, so their update ``s`` uses ``cosine_annealing(s + 1)``;
    the recipe's ``optim.schedule_offset=1`` does the same (without it the first update ran at lr 0
    and every later one a step behind)."""
    from rayrcm.train.optim import ShiftedSchedule

    cfg = _recipe("acl_cifar10").pretrain_config("acl")
    epochs, per_epoch = 40, 7  # a short run with the recipe's optimizer section
    cfg = resolve_epochs(apply_overrides(cfg, [f"train.epochs={epochs}", "data.batch_size=10"]), 10 * per_epoch)
    assert (cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr) == (10 * per_epoch, epochs * per_epoch, 1e-6)
    assert cfg.optim.schedule_offset == 1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = ShiftedSchedule(build_scheduler(opt, cfg.optim, cfg.train.steps), cfg.optim.schedule_offset)
    ours = []
    for s in range(cfg.train.steps):
        sched.step_update(s)
        ours.append(opt.param_groups[0]["lr"])
    theirs = _authors_lrs(5.0, epochs, per_epoch)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    assert theirs[0] == pytest.approx(5.0 / (10 * per_epoch))
    assert theirs[-1] == pytest.approx(1e-6) and max(theirs) == pytest.approx(5.0)


# --- item 10: the projector -----------------------------------------------------------------


class AuthorsProjHead(nn.Module):
    """models/resnet_multi_bn.py ``proj_head(ch, bn_names=None)``, transcribed (one BatchNorm per layer)."""

    def __init__(self, ch, twoLayerProj=False):
        super().__init__()
        self.twoLayerProj = twoLayerProj
        self.fc1 = nn.Linear(ch, ch)
        self.bn1 = nn.BatchNorm1d(ch)
        self.fc2 = nn.Linear(ch, ch, bias=False)
        self.bn2 = nn.BatchNorm1d(ch)
        if not twoLayerProj:
            self.fc3 = nn.Linear(ch, ch, bias=False)
            self.bn3 = nn.BatchNorm1d(ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.fc1(x)))
        x = self.bn2(self.fc2(x))
        if not self.twoLayerProj:
            x = self.bn3(self.fc3(self.relu(x)))
        return x


@pytest.mark.parametrize("two_layer", [False, True])
def test_projector_is_the_authors_proj_head(two_layer):
    torch.manual_seed(0)
    ours, ref = ACLProjector(16, 16, 16, two_layer=two_layer), AuthorsProjHead(16, twoLayerProj=two_layer)
    with torch.no_grad():
        for bn in [m for m in ours.modules() if isinstance(m, nn.BatchNorm1d)]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict(), strict=True)  # the same names and shapes, fc2/fc3 without a bias
    x = torch.randn(10, 16)
    torch.testing.assert_close(ours(x), ref(x))  # train mode: batch statistics
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))  # eval mode: the running statistics both updated


def test_acl_recipe_builds_the_authors_network():
    """proj_head(ch) with ch = model.fc.in_features = 512 on ResNet-18, three layers, dual BatchNorm; the
    encoder initialized as the authors' ResNet (kaiming-normal fan-out convolutions, every BN weight 1:
    timm zero-initializes the last BN of each block)."""
    cfg = validate(_recipe("acl_cifar10").pretrain_config("air"), check_paths=False)
    obj = build_objective(cfg, 10)
    head = obj.projector
    assert isinstance(head, ACLProjector) and not head.two_layer
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features, head.fc3.out_features) == (512, 512, 512, 512)
    assert head.fc1.bias is not None and head.fc2.bias is None and head.fc3.bias is None
    assert isinstance(head.bn1, DualBatchNorm) and isinstance(head.bn3, DualBatchNorm)
    bns = [m for m in obj.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 20 and all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)
    stem = obj.encoder.model.conv1.weight  # 3x3, 64 out: kaiming_normal(fan_out) std = sqrt(2 / (64 * 9))
    assert stem.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)


# --- item 11: AIR over the global batch -----------------------------------------------------


def _air_inputs():
    g = torch.Generator().manual_seed(4)
    return [torch.randn(8, 5, generator=g) for _ in range(5)], torch.randn(5, 4, generator=g)


def _air_value(zs, w, gather):
    zo, zi, zj, zia, zja = (z @ w for z in zs)  # a shared "network" w, so the gradient is a parameter's
    return air_standard(zo, zi, zj, 0.5, gather=gather) + air_robust(zo, zi, zj, zia, zja, 0.5, gather=gather)


def _air_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        zs, w0 = _air_inputs()
        per = zs[0].shape[0] // world
        w = w0.clone().requires_grad_(True)
        loss = _air_value([z[rank * per:(rank + 1) * per] for z in zs], w, gather=True)
        loss.backward()
        dist.all_reduce(w.grad)  # DDP: the average of the workers' gradients
        w.grad /= world
        torch.save({"loss": loss.detach(), "grad": w.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_air_on_two_workers_is_the_one_process_value_on_the_whole_batch(tmp_path):
    """Two gloo processes, 4 samples each: every worker's AIR loss equals the one-process loss on the
    8 samples, and the averaged gradient is its gradient (the authors' softmax over the whole batch)."""
    import torch.multiprocessing as mp

    # fork: the workers inherit the imported modules (spawn would re-import torch and rayrcm in each)
    mp.start_processes(_air_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    zs, w0 = _air_inputs()
    w = w0.clone().requires_grad_(True)
    ref = _air_value(zs, w, gather=False)
    ref.backward()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["grad"], w.grad, rtol=1e-4, atol=1e-7)
    local = _air_value([z[:4] for z in zs], w0, gather=False)  # a per-worker softmax is a different loss
    assert abs(local.item() - ref.item()) > 1e-3


# --- items 13: AFF with dual BatchNorm, the exported classifier, the zero head -----------------


def _ft_cfg(*extra: str) -> ExperimentConfig:
    return validate(apply_overrides(ExperimentConfig(), ["method.name=adv_finetune", "data.image_size=8", "model.encoder=cifar_resnet8",
                                                         "method.pgd_steps=3", *extra]))


def _pretrained_classifier(cfg) -> nn.Module:
    """A classifier whose BatchNorms hold non-trivial statistics and affine parameters, as after pretraining."""
    torch.manual_seed(0)
    clf = build_classifier(cfg.model, 8, 10)
    with torch.no_grad():
        for m in clf.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return clf


def _authors_trades_loss_dual(model, x_natural, y, step_size, epsilon, perturb_steps, beta=6.0):
    """finetuning_utils.py ``trades_loss_dual`` (``model(x, bn_name)``), transcribed for the CPU."""
    batch_size = len(x_natural)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv, "pgd", train=False), dim=1),
                                   F.softmax(model(x_natural, "normal", train=False), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    nat_output = model(x_natural, "normal", train=True)
    adv_output = model(x_adv, "pgd", train=True)
    loss = F.cross_entropy(nat_output, y) + beta * (1.0 / batch_size) * criterion_kl(F.log_softmax(adv_output, dim=1),
                                                                                       F.softmax(nat_output, dim=1))
    return loss, x_adv


def _plain_key(key: str) -> tuple[str, str | None]:
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in ("nat", "adv"):
        return ".".join(parts[:-2] + parts[-1:]), parts[-2]
    return key, None


def test_aff_routes_natural_and_adversarial_inputs_through_their_own_batchnorms():
    """One AFF step against the authors' trades_loss_dual on a network with separate 'normal' and
    'pgd' BatchNorms (two copies of the pretrained network sharing nothing but their starting point):
    the adversarial example, the loss, every gradient (shared weights: the sum of both copies'; each
    BN branch: its copy's) and every branch's running statistics agree."""
    cfg = _ft_cfg("method.mode=aff")
    clf = _pretrained_classifier(cfg)
    ref_nat, ref_adv = copy.deepcopy(clf), copy.deepcopy(clf)
    for ref in (ref_nat, ref_adv):
        nn.init.zeros_(ref.head.weight), nn.init.zeros_(ref.head.bias)  # get_model: fc.weight = fc.bias = 0
    obj = AdvFinetuneObjective(cfg.method, clf)
    assert torch.equal(obj.classifier.head.weight, torch.zeros_like(obj.classifier.head.weight))
    g = torch.Generator().manual_seed(1)
    x, y = 0.1 + 0.8 * torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)

    def authors_model(inp, bn_name, train):
        net = ref_nat if bn_name == "normal" else ref_adv
        return net.train(train)(inp)

    torch.manual_seed(7)
    ref_loss, ref_x_adv = _authors_trades_loss_dual(authors_model, x, y, 2 / 255, 8 / 255, 3)
    ref_loss.backward()
    obj.train()
    torch.manual_seed(7)
    out = obj([x], y, 0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    refs = {"nat": dict(ref_nat.named_parameters()), "adv": dict(ref_adv.named_parameters())}
    for key, p in obj.classifier.named_parameters():
        plain, branch = _plain_key(key)
        expected = refs[branch][plain].grad if branch else refs["nat"][plain].grad + refs["adv"][plain].grad
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=key)
    bufs = {"nat": dict(ref_nat.named_buffers()), "adv": dict(ref_adv.named_buffers())}
    for key, b in obj.classifier.named_buffers():
        plain, branch = _plain_key(key)
        if branch:
            torch.testing.assert_close(b, bufs[branch][plain], msg=key)
    assert (ref_x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_aff_adversarial_example_equals_the_authors():
    cfg = _ft_cfg("method.mode=aff")
    clf = _pretrained_classifier(cfg)
    with torch.no_grad():
        clf.head.weight.normal_()  # a head that is not zero, so the KL has a gradient
    ref_nat, ref_adv = copy.deepcopy(clf), copy.deepcopy(clf)
    obj = AdvFinetuneObjective(cfg.method, clf)
    with torch.no_grad():
        obj.classifier.head.weight.copy_(ref_nat.head.weight)
        ref_adv.head.bias.zero_(), ref_nat.head.bias.zero_()
        # a nat branch that differs from the adv one, as after some fine-tuning
        for m in obj.classifier.modules():
            if isinstance(m, DualBatchNorm):
                m.nat.running_mean.add_(0.2)
        for m in ref_nat.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.2)
    from rayrcm.objectives.adv_finetune import trades_adversary

    g = torch.Generator().manual_seed(2)
    x = 0.1 + 0.8 * torch.rand(6, 3, 8, 8, generator=g)
    obj.eval()
    torch.manual_seed(3)
    ours = trades_adversary(obj.classifier, x, cfg.method.attack())

    def authors_model(inp, bn_name, train):
        return (ref_nat if bn_name == "normal" else ref_adv).train(train)(inp)

    torch.manual_seed(3)
    _, theirs = _authors_trades_loss_dual(authors_model, x, torch.zeros(6, dtype=torch.long), 2 / 255, 8 / 255, 3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - x).abs().max() > 4 / 255  # the attack moved


def test_aff_exports_the_plain_classifier_with_the_adversarial_branch():
    cfg = _ft_cfg("method.mode=aff")
    obj = AdvFinetuneObjective(cfg.method, _pretrained_classifier(cfg))
    opt = torch.optim.SGD(obj.parameters(), lr=0.1)
    obj.train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    obj([x], y, 0).loss.backward()
    opt.step()
    exported = obj.export()
    assert not any(isinstance(m, DualBatchNorm) for m in exported.modules())
    fresh = build_classifier(cfg.model, 8, 10)
    fresh.load_state_dict(exported.state_dict(), strict=True)  # the plain classifier's keys
    obj.eval(), fresh.eval(), exported.eval()
    with torch.no_grad(), bn_route(obj.classifier, "adv"):
        adv = obj.classifier(x)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), adv)
        torch.testing.assert_close(fresh(x), adv)
        with bn_route(obj.classifier, "nat"):
            assert not torch.allclose(obj.classifier(x), adv)  # the nat branch is another network
    # a view: loading a state into the export writes into the trained network (the kept-model reload)
    state = {k: torch.zeros_like(v) if k.endswith("running_mean") else v for k, v in exported.state_dict().items()}
    exported.load_state_dict(state, strict=True)
    assert all(torch.equal(m.adv.running_mean, torch.zeros_like(m.adv.running_mean))
               for m in obj.classifier.modules() if isinstance(m, DualBatchNorm))
    assert branch_view(fresh, "adv") is fresh  # a network without dual BatchNorm is its own view


@pytest.mark.parametrize("mode", ["slf", "alf"])
def test_linear_modes_keep_one_batchnorm_and_start_from_a_zero_head(mode):
    cfg = _ft_cfg(f"method.mode={mode}")
    obj = AdvFinetuneObjective(cfg.method, _pretrained_classifier(cfg))
    assert not any(isinstance(m, DualBatchNorm) for m in obj.modules())
    assert obj.export() is obj.classifier
    head = obj.classifier.head
    assert torch.equal(head.weight, torch.zeros_like(head.weight)) and torch.equal(head.bias, torch.zeros_like(head.bias))


def test_single_bn_aff_is_still_available():
    cfg = _ft_cfg("method.mode=aff", "method.dual_bn=false")
    obj = AdvFinetuneObjective(cfg.method, _pretrained_classifier(cfg))
    assert not any(isinstance(m, DualBatchNorm) for m in obj.modules()) and obj.export() is obj.classifier


# --- the RCS authors' halved loss ---------------------------------------------------------------


def test_scale_multiplies_the_acl_loss():
    base = ["method.name=acl", "data.image_size=8", "model.encoder=cifar_resnet8", "model.proj_hidden_dim=16", "model.proj_dim=16"]
    a = build_objective(validate(apply_overrides(ExperimentConfig(), base)), 10)
    b = build_objective(validate(apply_overrides(ExperimentConfig(), [*base, "method.scale=0.5"])), 10)
    b.load_state_dict(a.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    views = [torch.rand(4, 3, 8, 8, generator=g) for _ in range(2)]
    torch.manual_seed(1)
    la = a(views, torch.zeros(4, dtype=torch.long), 0).loss
    torch.manual_seed(1)
    lb = b(views, torch.zeros(4, dtype=torch.long), 0).loss
    assert lb.item() == pytest.approx(0.5 * la.item(), rel=1e-6)
