"""Objective registry: one module per method, one line here per method.

Each entry maps a name to ``(config dataclass, build(cfg, num_classes) -> Objective)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rayrcm.objectives import (
    acl,
    adv_finetune,
    air,
    cadis,
    consistency,
    ddpm,
    gaussian,
    linear_probe,
    moco,
    rcm,
    simclr,
    stablerep,
)
from rayrcm.objectives.base import EpochContext, EpochPlan, LossOutput, MethodConfig, Objective
from rayrcm.registry import Registry

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

OBJECTIVES: Registry[tuple[type[MethodConfig], Callable[[Experiment, int], Objective]]] = Registry("method")
OBJECTIVES.register("rcm")((rcm.RCMConfig, rcm.build))
OBJECTIVES.register("gaussian")((gaussian.GaussianConfig, gaussian.build))
OBJECTIVES.register("consistency")((consistency.ConsistencyConfig, consistency.build))
OBJECTIVES.register("simclr")((simclr.SimCLRConfig, simclr.build))
OBJECTIVES.register("acl")((acl.ACLConfig, acl.build))
OBJECTIVES.register("air")((air.AIRConfig, air.build))
OBJECTIVES.register("adv_finetune")((adv_finetune.AdvFinetuneConfig, adv_finetune.build))
OBJECTIVES.register("moco")((moco.MoCoConfig, moco.build))
OBJECTIVES.register("stablerep")((stablerep.StableRepConfig, stablerep.build))
OBJECTIVES.register("ddpm")((ddpm.DDPMConfig, ddpm.build))
OBJECTIVES.register("linear_probe")((linear_probe.LinearProbeConfig, linear_probe.build))
OBJECTIVES.register("cadis")((cadis.CADISConfig, cadis.build))


def method_config_class(name: str) -> type[MethodConfig]:
    return OBJECTIVES.get(name)[0]


def build_objective(cfg: Experiment, num_classes: int) -> Objective:
    """Build the objective named by ``cfg.method.name`` from a full :class:`Experiment`."""
    return OBJECTIVES.get(cfg.method.name)[1](cfg, num_classes)


__all__ = ["OBJECTIVES", "EpochContext", "EpochPlan", "LossOutput", "MethodConfig", "Objective", "build_objective", "method_config_class"]
