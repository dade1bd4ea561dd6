"""Optimizer (timm's factory) with layer-wise lr decay on ViT encoders, and the per-step schedule.

LARS is timm's with the trust ratio on every parameter (``always_adapt``), as the ACL authors'
``optimizer/lars.py``: with their one weight-decay group (``weight_decay_all``) a step equals
theirs at a constant lr; timm applies the lr outside the momentum buffer, they inside, which
differs only while the lr changes (docs/fidelity.md).

Layer decay multiplies the lr of encoder layer ``l`` of ``L`` by ``decay^(L - l)``; heads and
projectors keep the full lr. On a ViT the default counts layers as MAE/BEiT's ``param_groups_lrd``
(``optim.layer_decay_style=mae``, what the RCM and FT-CADIS authors use): the patch embedding,
class token and position embedding are layer 0, block ``i`` is layer ``i + 1``, everything after
the blocks is layer ``L = depth + 1``, so the last block trains at ``decay`` and only the final norm
and head at 1. timm's ``param_groups_layer_decay`` (``layer_decay_style=timm``) gives the last
block 1 as well, i.e. every encoder layer ``1 / decay`` times the authors' rate. The schedule is timm's
cosine with linear warmup indexed by optimizer step, so resuming is "set the step".
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from rayrcm.sections import OptimConfig

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler


def _encoder_of(model: nn.Module) -> nn.Module | None:
    enc = getattr(model, "encoder", None)
    return getattr(enc, "model", None) if enc is not None else getattr(model, "model", None)


def mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit``: embeddings 0, ``blocks.i`` i + 1, the rest ``num_layers``."""
    if name in ("cls_token", "pos_embed", "reg_token", "dist_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def mae_layer_decay_groups(vit: nn.Module, weight_decay: float, no_weight_decay: set[str] | Any,
                           decay: float) -> list[dict[str, Any]]:
    """MAE/BEiT's ``param_groups_lrd`` on a ViT: ``num_layers = depth + 1``, layer ``l`` at
    ``decay^(num_layers - l)``; 1-d parameters and ``no_weight_decay`` names without weight decay."""
    num_layers = len(cast(Sized, vit.blocks)) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in vit.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim == 1 or name in no_weight_decay)
        layer = mae_layer_id(name, num_layers)
        g = groups.setdefault((layer, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                "lr_scale": decay ** (num_layers - layer)})
        g["params"].append(p)
    return list(groups.values())


def param_groups(module: nn.Module, exported: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Parameter groups of ``module`` (the objective): no weight decay on biases and norms, or
    (``weight_decay_all``) one group in which every parameter decays, as the RCM authors'
    ``AdamW(model.parameters())`` and the ACL authors' ``LARS(model.parameters())``."""
    from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

    own = getattr(module, "param_groups", None)
    if callable(own):  # an objective with its own groups (the linear probe: one lr per head)
        return cast("list[dict[str, Any]]", own(cfg))
    if cfg.weight_decay_all:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]

    inner = _encoder_of(exported) if exported is not None else None
    if cfg.layer_decay < 1.0 and inner is not None and hasattr(inner, "group_matcher"):
        no_weight_decay = getattr(inner, "no_weight_decay", None)
        nwd = no_weight_decay() if no_weight_decay is not None else set()
        if cfg.layer_decay_style == "mae" and hasattr(inner, "blocks"):
            groups = mae_layer_decay_groups(inner, cfg.weight_decay, nwd, cfg.layer_decay)
        else:
            groups = param_groups_layer_decay(inner, cfg.weight_decay, no_weight_decay_list=nwd, layer_decay=cfg.layer_decay)
        inner_ids = {id(p) for p in inner.parameters()}
        rest = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in inner_ids]
        decay = [p for n, p in rest if p.ndim > 1]
        no_decay = [p for n, p in rest if p.ndim <= 1]
        groups += [g for g in ({"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                               {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}) if g["params"]]
        return groups
    return cast("list[dict[str, Any]]", param_groups_weight_decay(module, cfg.weight_decay))


def build_optimizer(module: nn.Module, exported: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {"momentum": cfg.momentum} if cfg.name in ("sgd", "lars") else {"betas": tuple(cfg.betas)}
    if cfg.name == "lars":  # the ACL authors' LARS: trust ratio eta |w| / (|g| + wd |w|) on every parameter
        kwargs.update(always_adapt=True, trust_coeff=0.001, trust_clip=False, eps=0.0)
    groups = param_groups(module, exported, cfg)
    # timm's "sgd" is Nesterov; torch.optim.SGD (what the seeds call) is plain momentum unless asked
    opt = ("nesterov" if cfg.nesterov else "momentum") if cfg.name == "sgd" else cfg.name
    return create_optimizer_v2(groups, opt=opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> Scheduler:
    """timm cosine (or multi-step, ``cfg.schedule="step"``) schedule with linear warmup from 0, stepped per optimizer update, over
    ``cfg.schedule_steps`` (or ``total_steps``); a longer schedule than the run cuts the cosine short."""
    from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

    if cfg.schedule == "step":  # the ACL/AIR authors' fine-tuning: MultiStepLR(gamma=0.1)
        return MultiStepLRScheduler(optimizer, decay_t=list(cfg.milestones) or [total_steps + 1], decay_rate=cfg.gamma,
                                    warmup_t=cfg.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    length = cfg.schedule_steps or total_steps
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, length - cfg.warmup_steps),
        lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


class EpochIndexedSchedule:
    """A per-step scheduler made a function of the epoch position, for methods whose epochs differ
    in size (RCS's coreset epochs), as the RCS authors' (``ACL_RCS.py:281-291``):
    they rebuild their per-step cosine at every epoch over ``epochs * len(loader)`` steps with
    ``10 * len(loader)`` warm-up steps, ``len(loader)`` that epoch's (coreset) loader, and fast-forward
    it to ``(epoch - 1) * len(loader)``; so the lr is the cosine of the epoch position, whatever the
    epoch's size.

    ``inner`` is a scheduler over whole-set epochs of ``full_steps`` steps (its warm-up and length
    in those units); ``step_update(t)`` hands it ``position(t) * full_steps``, where the step
    counter ``t`` maps linearly within each epoch: epoch ``e`` (``steps_in(e)`` steps) spans
    positions ``[e, e + 1)``. When every epoch has ``full_steps`` steps this is the identity.
    """

    def __init__(self, inner: Any, steps_in: Callable[[int], int], full_steps: int) -> None:
        self.inner, self.steps_in, self.full_steps = inner, steps_in, full_steps
        self._starts = [0]

    def position(self, t: float) -> float:
        while self._starts[-1] <= t:
            self._starts.append(self._starts[-1] + max(1, self.steps_in(len(self._starts) - 1)))
        e = bisect.bisect_right(self._starts, t) - 1
        return e + (t - self._starts[e]) / max(1, self.steps_in(e))

    def step_update(self, num_updates: float, metric: Any = None) -> None:
        self.inner.step_update(self.position(num_updates) * self.full_steps, metric)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class ShiftedSchedule:
    """``inner`` with update ``s`` at the schedule's ``s + offset``: the ACL authors step their
    ``LambdaLR`` before each update, so their update ``s`` runs at ``lr(s + 1)``."""

    def __init__(self, inner: Any, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def step_update(self, num_updates: float, metric: Any = None) -> None:
        self.inner.step_update(num_updates + self.offset, metric)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class CosineWeightDecay:
    """``inner`` (the lr schedule) plus a per-step weight-decay cosine, as FT-CADIS
    (``train.py:313-320``, ``utils/utils.py:121-132`` and ``utils/lr_sched.py:24-26``, from DINO)::

        wd(s) = end + (start - end) (1 + cos(pi s / T)) / 2,   s = 0 .. T - 1

    on every parameter group whose weight decay is not 0 (biases and norms stay at 0), with
    ``T`` the schedule's length in optimizer steps; steps past ``T`` keep ``end``. A pure function of
    the step, so resuming is exact."""

    def __init__(self, inner: Any, optimizer: torch.optim.Optimizer, start: float, end: float, length: int) -> None:
        self.inner, self.start, self.end, self.length = inner, start, end, max(1, length)
        self.groups = [g for g in optimizer.param_groups if g.get("weight_decay", 0.0) != 0.0]

    def weight_decay(self, step: float) -> float:
        s = min(step, self.length)
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * s / self.length))

    def step_update(self, num_updates: float, metric: Any = None) -> None:
        self.inner.step_update(num_updates, metric)
        wd = self.weight_decay(num_updates)
        for g in self.groups:
            g["weight_decay"] = wd

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
