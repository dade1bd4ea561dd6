"""What every evaluation is: integer counts per shard, summed across workers, then metrics.

An :class:`Evaluation` sees a model mapping [0, 1] images ``(B, 3, H, W)`` to class logits and a
dataset of ``((view, ...), label)``; :meth:`Evaluation.counts` covers this worker's shard
(``rank::world``) and returns an int64 vector whose elementwise sum over workers is the count
vector of the whole split; :meth:`Evaluation.metrics` turns the totals into named floats. Because
counts add, the same entry runs inside a Ray Train run (validation and test splits, summed with an
all-reduce), on one process over a saved model (:func:`evaluate`), or sharded by any other job.

Entries are registered by name with a factory ``build(cfg) -> Evaluation`` that reads its
settings from an experiment config (``train.eval_sigmas``, the method's attack budget, ...)::

    EVALUATIONS.register("mine")(MyEvaluation.from_config)

``train.evals`` chooses what runs on the validation split at every checkpoint (and so which
metrics ``train.select_metric`` may name); ``train.test_evals`` plus the method's own
(:meth:`~rayrcm.objectives.MethodConfig.evals`) what runs on the test split at the end. An
encoder (pretraining) stage runs ``train.encoder_evals`` at both places instead: evaluations with
``on_features = True``, which take an encoder's features as well as a classifier's logits. One
with ``needs_reference = True`` gets the un-augmented training split as ``self.reference``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from rayrcm.registry import Registry

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a count vector over workers


class Evaluation:
    """A pure evaluation unit (see the module docstring)."""

    name: str = ""
    needs_reference = False  # reads ``self.reference`` (the un-augmented training split), e.g. the k-NN reference
    on_features = False  # works on an encoder's features too, so it may run on encoder (pretraining) stages
    reference: Dataset[Any] | None = None

    def metric_names(self, prefix: str) -> list[str]:
        """The metrics :meth:`metrics` returns, known before anything runs (checkpoint selection)."""
        raise NotImplementedError

    def counts(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, seed: int = 0) -> torch.Tensor:
        """int64 counts over this worker's shard ``rank::world``."""
        raise NotImplementedError

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> str:
        """A line for the console when the evaluation is slow enough to announce ("" = none)."""
        return ""


EVALUATIONS: Registry[Callable[[Experiment], Evaluation]] = Registry("evaluation")


def build_evaluations(names: Iterable[str], cfg: Experiment, reference: Dataset[Any] | None = None) -> list[Evaluation]:
    """The evaluations named (each once, in order), configured from ``cfg``; ``reference`` (the
    un-augmented training split) goes to those that need one."""
    out: list[Evaluation] = []
    for name in dict.fromkeys(names):
        ev = EVALUATIONS.get(name)(cfg)
        ev.name = ev.name or name
        if ev.needs_reference:
            ev.reference = reference
        out.append(ev)
    return out


def evaluate(evaluations: Sequence[Evaluation], model: nn.Module, dataset: Dataset[Any], *, prefix: str,
             device: torch.device | str = "cpu", rank: int = 0, world: int = 1, seed: int = 0,
             reduce: Reduce = lambda c: c) -> dict[str, float]:
    """Run ``evaluations`` on this shard, sum the counts with ``reduce``, return all metrics."""
    out: dict[str, float] = {}
    for ev in evaluations:
        counts = reduce(ev.counts(model, dataset, device=device, rank=rank, world=world, seed=seed).to(torch.long))
        out.update(ev.metrics(counts, prefix))
    return out
