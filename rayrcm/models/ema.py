"""Momentum (EMA) copies of a network, as used for teachers and for weight averaging."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere, for use as an EMA target."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, rate: float, *, copy_buffers: bool = True) -> None:
    """``target <- rate * target + (1 - rate) * online`` for parameters; buffers are copied, or
    (``copy_buffers=False``, as the RCM authors' ``utils.ema``) left as the target's own."""
    t_params: list[torch.Tensor] = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks differ in structure")
    torch._foreach_lerp_(t_params, o_params, 1.0 - rate)
    if copy_buffers:
        for tb, ob in zip(target.buffers(), online.buffers()):
            tb.copy_(ob)
