"""What every objective shares: the result type, the method-config contract and the epoch hook."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from rayrcm.distributed import Collectives
from rayrcm.models.export import kind_predicts_classes

if TYPE_CHECKING:
    from rayrcm.eval.robust import RobustEvalConfig
    from rayrcm.sections import Experiment


@dataclass
class LossOutput:
    """A scalar loss to minimize plus named, detached scalar metrics for logging."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every objective's config. Subclasses are frozen dataclasses with a ``name`` field.

    ``export`` names the kind of network the method exports (:mod:`rayrcm.models.export`:
    ``"encoder"``, ``"classifier"``, or a kind a plugin registers); ``stage`` follows from it:
    ``"classifier"`` when that network predicts classes (it is validated, selected, evaluated and
    certified), else ``"pretrain"``.
    """

    export: ClassVar[str] = "encoder"
    child_of_source: ClassVar[bool] = False  # True: the MLflow run is a child of the run that logged model.init_from

    @property
    def stage(self) -> str:
        return "classifier" if kind_predicts_classes(self.export) else "pretrain"

    def views(self, augmentation: str) -> tuple[str, ...]:
        """Augmentation names of the views each training sample yields."""
        return (augmentation,)

    def validate(self, cfg: Experiment) -> None:  # pragma: no cover - overridden
        return None

    def epoch_samples(self, epoch: int, n: int) -> int:
        """Training samples in (zero-based) ``epoch`` of a training set of ``n`` (coreset methods: fewer)."""
        return n

    def robust_eval(self) -> RobustEvalConfig | None:
        """The :class:`~rayrcm.eval.robust.RobustEvalConfig` of the ``robust`` evaluation (the
        method's attack budget), or None for the default protocol."""
        return None

    def evals(self) -> tuple[str, ...]:
        """Evaluations this method's protocol always runs on the test split (added to ``train.test_evals``)."""
        return ()


@dataclass
class EpochContext:
    """What :meth:`Objective.on_epoch` may use: the run's data, place and collectives.

    ``train_set`` yields the method's views; ``val_set`` the un-augmented validation split (maybe
    empty); ``work_dir`` is the job's folder on shared storage (rank 0 writes there); ``log``
    records metrics at a step (rank 0 only, a no-op elsewhere); ``say`` prints one console line
    (rank 0 only).
    """

    epochs: int
    train_set: Dataset[Any]
    val_set: Dataset[Any]
    work_dir: Path
    device: torch.device | str = "cpu"
    rank: int = 0
    world: int = 1
    seed: int = 0
    batch_size: int = 1  # the global batch
    lr: float = 0.0
    comm: Collectives = field(default_factory=Collectives)
    log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    say: Callable[[str], None] = lambda line: None


@dataclass
class EpochPlan:
    """What an epoch trains on: the view pipelines' augmentation strength (None: unchanged), the
    pool of sample indices (None: the whole training set), and settings to log (``epoch_<key>``)."""

    augmentation_strength: float | None = None
    pool: list[int] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """A method: owns its networks, computes the loss of one batch, exports the model to keep.

    ``forward(views, target, step)`` takes the list of view tensors ``(B, C, H, W)`` in [0, 1] and
    integer labels ``(B,)`` (ignored by self-supervised methods) and returns a :class:`LossOutput`.
    """

    def on_step_end(self, step: int) -> None:
        """Called after each optimizer step (EMA updates and other per-step state)."""

    def on_epoch(self, epoch: int, ctx: EpochContext) -> EpochPlan:
        """Called on every worker before each (zero-based) data epoch, also the one a resume lands
        in; returns what that epoch trains on (DynACL's strength, an RCS coreset)."""
        return EpochPlan()

    def on_validation(self, val_set: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                      reduce: Callable[[torch.Tensor], torch.Tensor] = lambda c: c) -> dict[str, float]:
        """Called on every worker before each validation of the exported network, with the held-out
        split (this worker's shard is ``rank::world``; ``reduce`` sums count vectors over workers);
        returns further ``val_`` metrics (the linear probe selects its best head here)."""
        return {}

    def export(self) -> nn.Module:
        """The network that is checkpointed as "the model" (encoder or classifier)."""
        raise NotImplementedError
