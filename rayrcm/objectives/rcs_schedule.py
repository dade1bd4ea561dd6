"""When RCS selects a coreset and what a run keeps of it (:mod:`rayrcm.objectives.rcs` computes it).

After ``rcs_warmup_epochs`` epochs on the whole training set, a coreset is selected every
``rcs_interval_epochs`` epochs (:func:`selection_epoch`, the authors' rule) and the epochs until the
next selection train on it (:func:`epoch_samples`). Each selection is kept as
``<job>/coreset/coreset_epoch_<e>.json``, so a resumed run trains on the coreset it had.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import Dataset

from rayrcm.errors import ConfigError
from rayrcm.objectives.rcs import (
    Gather,
    RCSMethod,
    RCSOptions,
    RDValidation,
    Share,
    coreset_size,
    mix_seeds,
    rd_attack_config,
    select_coreset,
)

if TYPE_CHECKING:
    from rayrcm.objectives.base import EpochContext


def _same(t: Any) -> Any:
    return t


@dataclass
class RCSSettings:
    """How one run selects: units of ``unit`` samples, greedy step ``lr``, the run's ``seed`` and
    ``device``, validation batches of ``val_batch``; this worker's ``rank`` of ``world`` and the
    collectives (identities on one process): ``gather`` (see :func:`~rayrcm.objectives.rcs.select_coreset`),
    ``share`` (a sum over workers) and ``agree`` (rank 0's indices everywhere)."""

    unit: int
    lr: float
    seed: int = 0
    device: torch.device | str = "cpu"
    val_batch: int = 512
    rank: int = 0
    world: int = 1
    gather: Gather = field(default=_same)
    share: Share = field(default=_same)
    agree: Callable[[list[int]], list[int]] = field(default=_same)


def selection_epoch(epoch: int, warmup: int, interval: int) -> int | None:
    """The epoch whose coreset ``epoch`` trains on (itself when it selects), or None during warm-up.

    The authors (1-based epochs) select when ``epoch >= warmup and (epoch - 1) % interval == 0``;
    when ``interval > 1`` divides ``warmup`` (their 100/20 and 20/10) that is this rule."""
    if epoch < warmup:
        return None
    return warmup + (epoch - warmup) // interval * interval


class CoresetSchedule:
    """``schedule(epoch)`` -> the coreset indices epoch ``epoch`` trains on, or None (warm-up).

    A method (:class:`~rayrcm.objectives.acl.ACLObjective`) provides ``rcs_params``,
    ``rcs_features``, ``rcs_head`` and ``rcs_unit_gradient``; ``cfg`` its config (``rcs_*``
    fields). Each selection is kept as ``<folder>/coreset_epoch_<e>.json`` (rank 0 writes it), so a
    resumed run trains on the coreset it had. Collectives are passed in: ``gather`` (see
    :func:`select_coreset`), ``share`` (sum over workers) and ``agree(indices) -> indices``
    (rank 0's choice everywhere).
    """

    def __init__(self, objective: RCSMethod, cfg: RCSOptions, train_set: Dataset[Any], val_set: Dataset[Any], folder: Path,
                 settings: RCSSettings) -> None:
        self.objective, self.cfg, self.train_set, self.val_set, self.folder = objective, cfg, train_set, val_set, folder
        s = self.settings = settings
        self.unit, self.lr, self.seed, self.device, self.rank, self.world = s.unit, s.lr, s.seed, s.device, s.rank, s.world
        self.val_batch, self.gather, self.share, self.agree = s.val_batch, s.gather, s.share, s.agree
        self.selected: tuple[int, float] | None = None  # (epoch, seconds) of the selection the last call made
        self.announce: tuple[Callable[[str], None], Callable[[int, dict[str, float]], None]] | None = None
        self.barrier: Callable[[], None] = lambda: None
        self._seed = 0  # of the selection under way

    def _unit_grad(self, indices: list[int]) -> list[torch.Tensor]:
        torch.manual_seed(mix_seeds(self._seed, indices[0]))  # the unit's attack starts the same on any number of workers
        views, y = zip(*(self.train_set[i] for i in indices))
        batch = [torch.stack([v[j] for v in views]).to(self.device) for j in range(len(views[0]))]
        return [g.detach().cpu() for g in self.objective.rcs_unit_gradient(batch, torch.tensor(y, device=self.device))]

    def select(self, chosen_at: int) -> list[int]:
        """A new coreset (the objective in eval mode meanwhile; its parameters are not changed)."""
        obj, cfg = self.objective, self.cfg
        self._seed = mix_seeds(self.seed, chosen_at)
        was_training = obj.training
        obj.eval()
        try:
            params = obj.rcs_params()
            if not params:
                raise ValueError("RCS needs a projector with the authors' fc1/fc2/fc3 layers (ACLProjector)")
            names = list(params)
            validation = RDValidation(obj, self.val_set, names, params[names[0]].shape[1], rd_attack_config(cfg),
                                      batch_size=self.val_batch, seed=self._seed, device=self.device, rank=self.rank,
                                      world=self.world, gather=self.gather)
            n = len(cast(Sized, self.train_set))
            return select_coreset(self._unit_grad, validation, list(params.values()), n, fraction=cfg.rcs_fraction,
                                  unit=self.unit, lr=self.lr, seed=self.seed * 7_919 + chosen_at, rank=self.rank,
                                  world=self.world, gather=self.gather, share=self.share)
        finally:
            obj.train(was_training)

    @classmethod
    def for_context(cls, objective: RCSMethod, cfg: RCSOptions, ctx: EpochContext) -> CoresetSchedule:
        """The schedule of a training run: RD loss on (the first ``rcs_val_images`` of) the
        validation split in batches of the global batch, units of ``rcs_unit`` samples (default:
        the global batch, as the authors), greedy step ``rcs_lr``, files in ``<job>/coreset``;
        rank 0 announces each selection and logs its size and time."""
        val = ctx.val_set
        if cfg.rcs_val_images:
            val = torch.utils.data.Subset(val, list(range(min(cfg.rcs_val_images, len(cast(Sized, val))))))
        if len(cast(Sized, val)) == 0:
            raise ConfigError("data.val_fraction", 0, "RCS needs an unlabeled validation split (> 0)")
        settings = RCSSettings(unit=cfg.rcs_unit or ctx.batch_size, lr=cfg.rcs_lr, seed=ctx.seed, device=ctx.device,
                               val_batch=ctx.batch_size, rank=ctx.rank, world=ctx.world, gather=ctx.comm.gather,
                               share=ctx.comm.sum, agree=ctx.comm.agree)
        schedule = cls(objective, cfg, ctx.train_set, val, Path(ctx.work_dir) / "coreset", settings)
        schedule.announce, schedule.barrier = (ctx.say, ctx.log), ctx.comm.barrier
        return schedule

    def path(self, epoch: int) -> Path:
        return self.folder / f"coreset_epoch_{epoch:05d}.json"

    def __call__(self, epoch: int) -> list[int] | None:
        cfg, self.selected = self.cfg, None
        chosen_at = selection_epoch(epoch, cfg.rcs_warmup_epochs, cfg.rcs_interval_epochs)
        if chosen_at is None:
            return None
        path = self.path(chosen_at)
        if path.is_file():
            return cast("list[int] | None", json.loads(path.read_text())["indices"])
        tic = time.perf_counter()
        indices = self.agree(self.select(chosen_at))
        n = len(cast(Sized, self.train_set))
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"epoch": chosen_at, "fraction": cfg.rcs_fraction, "unit": self.unit, "indices": indices}))
            tmp.replace(path)
        self.selected = (chosen_at, time.perf_counter() - tic)
        if self.announce is not None:
            say, log = self.announce
            took = self.selected[1]
            say(f"[rayrcm] RCS: epoch {chosen_at}: coreset of {len(indices)}/{n} samples selected in {took:.1f} s")
            log(chosen_at, {"rcs_coreset_size": float(len(indices)), "rcs_select_seconds": took})
        self.barrier()  # rank 0 has written the file
        return indices


def epoch_samples(epoch: int, n: int, fraction: float, warmup: int) -> int:
    """Training samples in ``epoch``: all of them during warm-up (or with ``fraction = 1``), else the coreset's."""
    return n if fraction >= 1 or epoch < warmup else coreset_size(n, fraction)


__all__ = ["CoresetSchedule", "RCSSettings", "epoch_samples", "selection_epoch"]
