"""The global batch on several workers, checked on a real 2-worker Ray Train run: BatchNorm over
all workers equals BatchNorm over the concatenated batch on one process (outputs, input and
parameter gradients), and the optimizer options the authors' recipes need (one weight-decay group,
LARS on every parameter, clipping only after the warm-up)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayrcm.models import ACLProjector, MoCoV3Projector, convert_dual_bn
from rayrcm.models.batchnorm import AllReduceBatchNorm, sync_batchnorm
from rayrcm.sections import OptimConfig
from rayrcm.train.optim import build_optimizer, param_groups

B, D = 12, 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3))
    net[1].weight.data.uniform_(0.5, 1.5)
    net[1].bias.data.uniform_(-0.5, 0.5)
    return net


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g) * 3 + 1, torch.randn(B, 3, generator=g)


def _loss(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (out * w).pow(2).mean() + out.mean()  # a mean over samples, like every objective's loss


def _one_process() -> dict[str, torch.Tensor]:
    net = _net().train()
    x, w = _batch()
    x.requires_grad_(True)
    out = net(x)
    _loss(out, w).backward()
    return {"out": out.detach(), "x_grad": x.grad, **{f"grad.{k}": p.grad for k, p in net.named_parameters()},
            **{f"buf.{k}": b for k, b in net.named_buffers()}}


def _worker(config: dict) -> None:
    """A Ray Train worker: its half of the batch through the converted net inside DDP."""
    import ray.train
    import ray.train.torch

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    net = sync_batchnorm(_net().train(), "cpu", world)
    assert sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()) == 2
    assert sum(isinstance(m, AllReduceBatchNorm) for m in net.modules()) == 2
    ddp = ray.train.torch.prepare_model(net, move_to_device=False)
    x, w = _batch()
    per = B // world
    x, w = x[rank * per:(rank + 1) * per].clone().requires_grad_(True), w[rank * per:(rank + 1) * per]
    out = ddp(x)
    _loss(out, w).backward()
    result = {"out": out.detach(), "x_grad": x.grad, **{f"grad.{k}": p.grad for k, p in net.named_parameters()},
              **{f"buf.{k}": b for k, b in net.named_buffers()}}
    torch.save(result, f"{config['dir']}/rank{rank}.pt")


@pytest.mark.slow
def test_all_reduce_batchnorm_on_two_ray_workers_equals_one_process_on_the_whole_batch(ray_cluster, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    TorchTrainer(_worker, train_loop_config={"dir": str(tmp_path)}, scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="bn")).fit()
    ref = _one_process()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), ref["out"], atol=1e-5, rtol=1e-4)
    # each worker's input gradient is that of the sum of the workers' mean losses, as with
    # SyncBatchNorm: world x the gradient of the one-process mean loss
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), 2 * ref["x_grad"], atol=1e-5, rtol=1e-4)
    for key in ref:
        if key.startswith(("grad.", "buf.")):  # DDP-averaged gradients and the running statistics
            for p in parts:
                torch.testing.assert_close(p[key].float(), ref[key].float(), atol=1e-5, rtol=1e-4, msg=key)
    # and the difference is real: plain per-worker BatchNorm would not match
    net = _net().train()
    x, w = _batch()
    half = net(x[: B // 2])
    assert (half - ref["out"][: B // 2]).abs().max() > 1e-2


def test_one_worker_or_eval_mode_is_plain_batchnorm():
    ref, bn = nn.BatchNorm2d(4), AllReduceBatchNorm(4)
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    ref.eval(), bn.eval()
    torch.testing.assert_close(bn(x), ref(x))
    net = _net()
    assert sync_batchnorm(net, "cpu", 1) is net and not any(isinstance(m, AllReduceBatchNorm) for m in net.modules())


def test_conversion_keeps_parameters_state_keys_and_dual_branches():
    head = ACLProjector(8, 8, 8)
    convert_dual_bn(head)
    keys = set(head.state_dict())
    weight = head.bn1.nat.weight
    sync_batchnorm(head, "cpu", 2)
    assert set(head.state_dict()) == keys and head.bn1.nat.weight is weight
    assert isinstance(head.bn1.nat, AllReduceBatchNorm) and isinstance(head.bn3.adv, AllReduceBatchNorm)


def test_projectors_are_the_authors_layers():
    # rRCM's _build_mlp(3, D, hidden, out): Linear(no bias)-BN-ReLU-Linear(no bias)-BN-ReLU-Linear(no bias)
    kinds = [type(m).__name__ for m in MoCoV3Projector(16, 32, 8).net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in MoCoV3Projector(16, 32, 8).net if isinstance(m, nn.Linear))
    # the ACL authors' proj_head(ch): fc1 (bias) bn1 relu fc2 (no bias) bn2 relu fc3 (no bias) bn3
    head = ACLProjector(16, 16, 16)
    assert head.fc1.bias is not None and head.fc2.bias is None and head.fc3.bias is None
    x = torch.randn(4, 16)
    manual = head.bn3(head.fc3(torch.relu(head.bn2(head.fc2(torch.relu(head.bn1(head.fc1(x))))))))
    torch.testing.assert_close(head(x), manual)


def test_weight_decay_all_puts_every_parameter_in_one_decayed_group():
    net = _net()
    groups = param_groups(net, None, OptimConfig(weight_decay=1e-6, weight_decay_all=True))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-6
    assert len(groups[0]["params"]) == len(list(net.parameters()))
    default = param_groups(net, None, OptimConfig(weight_decay=1e-6))
    assert {g["weight_decay"] for g in default} == {0.0, 1e-6}


def test_lars_adapts_every_parameter_like_the_authors_first_step():
    """The ACL authors' LARS (optimizer/lars.py), transcribed: local_lr = eta |w| / (|g| + wd |w|),
    buf = m buf + lr local_lr (g + wd w), w -= buf; on the first step equal to ours for every parameter."""
    net = _net()
    x, w = _batch()
    _loss(net(x), w).backward()
    lr, wd, eta = 5.0, 1e-6, 0.001
    expected = {}
    for name, p in net.named_parameters():
        wn, gn = p.detach().norm(), p.grad.norm()
        local = eta * wn / (gn + wd * wn) if wn > 1e-15 and gn > 1e-15 else torch.tensor(1.0)
        expected[name] = p.detach() - lr * local * (p.grad + wd * p.detach())
    opt = build_optimizer(net, None, OptimConfig(name="lars", lr=lr, weight_decay=wd, momentum=0.9, weight_decay_all=True))
    opt.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # the BatchNorm bias moves by about eta * lr * |b|, not lr * |grad| as plain SGD would move it
    assert (expected["1.bias"] - _net()[1].bias).abs().max() < 0.05


def test_gradient_clipping_only_after_the_warm_up():
    from rayrcm.train.loop import Loop

    class Obj(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(self, views, target, step):
            from rayrcm.objectives import LossOutput

            return LossOutput((self.w * torch.tensor([100.0, 0, 0])).sum())

        def on_step_end(self, step):
            pass

    class Sched:
        def step_update(self, step):
            pass

    moved = []
    for step in (0, 1, 2, 3):
        obj = Obj()
        opt = torch.optim.SGD(obj.parameters(), lr=1.0)
        loop = Loop(obj, obj, opt, Sched(), torch.device("cpu"), grad_clip=2.0, clip_from=2)
        loop.step(step, ([torch.zeros(1, 1)], torch.zeros(1)))
        moved.append(float(obj.w.detach().abs().max()))
    assert moved == [100.0, 100.0, 2.0, 2.0]


def _rcm_worker(config: dict) -> None:
    """A Ray Train worker running the RCM objective (DDP, all-reduce BatchNorm) for a few steps with
    its own RNG stream, as the training loop seeds it; records the noise level of every step."""
    import ray.train
    import ray.train.torch

    from rayrcm.config import ExperimentConfig, apply_overrides
    from rayrcm.objectives import build_objective
    from rayrcm.train.loop import step_seed

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    cfg = apply_overrides(ExperimentConfig(), ["method.name=rcm", "train.steps=40", "train.seed=3",
                                               "model.proj_hidden_dim=32", "model.proj_dim=16"])
    torch.manual_seed(cfg.train.seed)
    obj = sync_batchnorm(build_objective(cfg, 10), "cpu", world)
    ddp = ray.train.torch.prepare_model(obj, move_to_device=False)
    levels, draws = [], []
    for step in range(0, 40, 5):
        torch.manual_seed(step_seed(cfg.train.seed, rank, step))
        draws.append(float(torch.rand(())))
        views = [torch.rand(4, 3, 16, 16) for _ in range(3)]
        out = ddp(views, torch.zeros(4, dtype=torch.long), step)
        out.loss.backward()
        levels.append(float(out.metrics["sigma_level"]))
    torch.save({"levels": levels, "draws": draws}, f"{config['dir']}/rcm{rank}.pt")


@pytest.mark.slow
def test_every_worker_trains_rcm_at_the_same_noise_level_each_step(ray_cluster, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(_rcm_worker, train_loop_config={"dir": str(tmp_path)}, scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="rcm-levels")).fit()
    r0, r1 = (torch.load(tmp_path / f"rcm{r}.pt", weights_only=True) for r in range(2))
    assert r0["draws"] != r1["draws"]  # the workers' random streams differ ...
    assert r0["levels"] == r1["levels"]  # ... and still every step has one noise level for the job
    assert len(set(r0["levels"])) > 2
