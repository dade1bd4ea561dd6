"""Dual BatchNorm: separate statistics and affine parameters for natural and adversarial inputs.

ACL (Jiang et al., NeurIPS 2020) and its successors (DynACL, AIR, RCS) route natural views
through one set of BatchNorm layers and adversarial views through another, because the two
input distributions differ (Xie et al., "Adversarial examples improve image recognition", 2020).
:func:`convert_dual_bn` swaps every BatchNorm of a network for a :class:`DualBatchNorm`;
:func:`bn_route` selects the branch for a block of code; :func:`single_bn_state` turns the state of
a converted network back into the plain network's state with one branch's statistics (the
authors fine-tune from the adversarial branch, ``bnNameCnt = 1``); :func:`branch_view` is the plain
network itself, sharing the converted one's weights.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

ROUTES = ("nat", "adv")


class DualBatchNorm(nn.Module):
    """Holds ``nat`` and ``adv`` copies of one BatchNorm layer; ``route`` picks the one used."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.nat, self.adv = bn, copy.deepcopy(bn)
        self.route = "nat"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.adv(x) if self.route == "adv" else self.nat(x))


def convert_dual_bn(module: nn.Module) -> int:
    """Replace, in place, every BatchNorm in ``module`` by a :class:`DualBatchNorm`; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, DualBatchNorm(child))
            count += 1
        elif not isinstance(child, DualBatchNorm):
            count += convert_dual_bn(child)
    return count


@contextlib.contextmanager
def bn_route(module: nn.Module, route: str) -> Iterator[None]:
    """Run the block with every :class:`DualBatchNorm` in ``module`` on branch ``route``."""
    if route not in ROUTES:
        raise ValueError(f"route {route!r}: choose one of {ROUTES}")
    duals = [m for m in module.modules() if isinstance(m, DualBatchNorm)]
    before = [m.route for m in duals]
    for m in duals:
        m.route = route
    try:
        yield
    finally:
        for m, r in zip(duals, before):
            m.route = r


def single_bn_state(module: nn.Module, route: str = "adv") -> dict[str, torch.Tensor]:
    """The state dict of ``module`` as if it had plain BatchNorms holding branch ``route``."""
    if route not in ROUTES:
        raise ValueError(f"route {route!r}: choose one of {ROUTES}")
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in ROUTES:
            if parts[-2] != route:
                continue
            key = ".".join(parts[:-2] + parts[-1:])
        out[key] = value
    return out


def branch_view(module: nn.Module, route: str) -> nn.Module:
    """``module`` as a plain network holding the ``route`` branch of every :class:`DualBatchNorm`:
    containers are shallow copies whose children are views, every other module (and so every
    parameter and buffer) is shared, so training the dual network updates the view and loading a
    state into the view writes into the dual network. Its state dict has the plain network's keys."""
    if isinstance(module, DualBatchNorm):
        return cast(nn.Module, getattr(module, route))
    if not any(isinstance(m, DualBatchNorm) for m in module.modules()):
        return module
    view = copy.copy(module)
    view._modules = {name: None if child is None else branch_view(child, route) for name, child in module._modules.items()}
    return view
