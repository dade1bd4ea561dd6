"""What every objective shares: the result type and the method-config contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class LossOutput:
    """A scalar loss to minimize plus named, detached scalar metrics for logging."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every objective's config. Subclasses are frozen dataclasses with a ``name`` field.

    ``stage`` is ``"pretrain"`` (the exported model is an encoder) or ``"classifier"``
    (the exported model is a :class:`~rayrcm.models.Classifier`).
    """

    stage: ClassVar[str] = "pretrain"

    def views(self, augmentation: str) -> tuple[str, ...]:
        """Augmentation names of the views each training sample yields."""
        return (augmentation,)

    def validate(self, cfg: Any) -> None:  # pragma: no cover - overridden
        return None

    def epoch_samples(self, epoch: int, n: int) -> int:
        """Training samples in (zero-based) ``epoch`` of a training set of ``n`` (coreset methods: fewer)."""
        return n

    def robust_eval(self) -> Any | None:
        """A :class:`~rayrcm.eval.robust.RobustEvalConfig` when the final model is attacked on the
        test split after training (SA / PGD / AutoAttack), else None."""
        return None


class Objective(nn.Module):
    """A method: owns its networks, computes the loss of one batch, exports the model to keep.

    ``forward(views, target, step)`` takes the list of view tensors ``(B, C, H, W)`` in [0, 1] and
    integer labels ``(B,)`` (ignored by self-supervised methods) and returns a :class:`LossOutput`.
    """

    def on_step_end(self, step: int) -> None:
        """Called after each optimizer step (EMA updates and other per-step state)."""

    def on_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        """Called before each (zero-based) data epoch, also on resume; returns settings for the data
        pipeline (e.g. ``{"augmentation_strength": s}``) that are also logged."""
        return {}

    def export(self) -> nn.Module:
        """The network that is checkpointed as "the model" (encoder or classifier)."""
        raise NotImplementedError
