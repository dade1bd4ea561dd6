"""One training run without Ray: what a worker builds from the config, and the steps it runs.

A Ray Train worker (:mod:`rayrcm.orchestration.train_worker`) is wiring around this module: it
gives the device, rank, world size and collectives, restores a checkpoint's state, wraps the
objective in DDP and passes callbacks that report to Ray and MLflow. Everything that decides what
is trained (datasets and views, the objective, optimizer, schedule, per-epoch plans of the method,
the data order) is here and runs the same in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from rayrcm.data import MultiView, build_splits
from rayrcm.data.views import data_transform
from rayrcm.distributed import Collectives
from rayrcm.models.batchnorm import sync_batchnorm
from rayrcm.objectives import EpochContext, Objective, build_objective
from rayrcm.train.checkpoint import MODEL_FILE, model_meta, save_model, save_state, write_manifest
from rayrcm.train.loop import Loop, batches_from, run_steps
from rayrcm.train.optim import (
    CosineWeightDecay,
    EpochIndexedSchedule,
    ShiftedSchedule,
    build_optimizer,
    build_scheduler,
)

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

Log = Callable[[int, dict[str, float]], None]


@dataclass
class Session:
    cfg: Experiment  # resolved
    train_set: MultiView
    val_set: MultiView  # un-augmented view of the held-out validation split
    test_set: MultiView
    num_classes: int
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    meta: dict[str, Any]  # what model.pt records about the exported network
    device: torch.device
    rank: int = 0
    world: int = 1
    start: int = 0  # first step to run (> 0 after a resume)
    bank_set: MultiView | None = None  # un-augmented training split: the reference of the k-NN evaluation

    @property
    def comm(self) -> Collectives:
        return Collectives(self.world, self.device)

    @property
    def work_dir(self) -> Path:
        """The job's folder on (shared) storage: best model, coresets, markers."""
        return Path(self.cfg.train.storage_path) / self.cfg.job_name


def build_session(cfg: Experiment, cfg_dict: dict[str, Any], *, device: torch.device, rank: int = 0,
                  world: int = 1) -> Session:
    """Datasets with the method's views, the objective (same initial weights on every worker),
    optimizer, per-step schedule and loss scaler."""
    splits = build_splits(cfg.data)
    large = splits.large
    train_set = MultiView(splits.train, [data_transform(v, cfg.data, large=large) for v in cfg.method.views(cfg.data.augmentation)])
    plain = [data_transform("none", cfg.data, large=large)]
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    objective = build_objective(cfg, splits.num_classes)
    if cfg.train.sync_bn:  # BatchNorm over the global batch, as the authors' single GPU or SyncBatchNorm
        objective = cast(Objective, sync_batchnorm(objective, device, world))  # the same module, converted in place
    optimizer = build_optimizer(objective, objective.export(), cfg.optim)
    scheduler = epoch_indexed(build_scheduler(optimizer, cfg.optim, cfg.train.steps), cfg, len(cast(Sized, splits.train)), world)
    if cfg.optim.schedule_offset:
        scheduler = ShiftedSchedule(scheduler, cfg.optim.schedule_offset)
    if cfg.optim.weight_decay_end >= 0:
        scheduler = CosineWeightDecay(scheduler, optimizer, cfg.optim.weight_decay, cfg.optim.weight_decay_end,
                                      cfg.optim.schedule_steps or cfg.train.steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    meta = model_meta(cfg_dict, cfg.method.export, splits.num_classes)
    return Session(cfg, train_set, MultiView(splits.val, plain), MultiView(splits.test, plain), splits.num_classes, objective,
                   optimizer, scheduler, scaler, meta, device, rank, world, bank_set=MultiView(splits.train, plain))


def epoch_indexed(scheduler: Any, cfg: Experiment, n_train: int, world: int) -> Any:
    """With ``train.epochs`` and epochs of varying size (a coreset method), the lr follows the
    position in epochs, as the RCS authors' per-epoch cosine; otherwise ``scheduler`` itself."""
    epochs = math.ceil(cfg.train.epochs)
    if epochs <= 0 or all(cfg.method.epoch_samples(e, n_train) == n_train for e in range(epochs)):
        return scheduler
    per_worker = cfg.data.batch_size // world * cfg.train.accum_iter

    def steps_in(epoch: int) -> int:
        return cast(int, max(1, (cfg.method.epoch_samples(epoch, n_train) // world) // per_worker))

    return EpochIndexedSchedule(scheduler, steps_in, max(1, n_train // (cfg.data.batch_size * cfg.train.accum_iter)))


def restore(s: Session, state: dict[str, Any]) -> None:
    """Resume from a ``state.pt``'s contents (``strict=True``)."""
    s.objective.load_state_dict(state["objective"], strict=True)
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scaler is not None and state["scaler"]:
        s.scaler.load_state_dict(state["scaler"])
    s.start = int(state["step"])


def save(s: Session, directory: str | Path, step: int, *, final: bool = False) -> None:
    """The training state (and, at the end, ``model.pt``) into ``directory``."""
    save_state(directory, s.objective, s.optimizer, s.scaler, step, s.meta)
    if final:
        save_model(Path(directory) / MODEL_FILE, s.objective.export(), s.meta)
    write_manifest(directory, step)


def epoch_count(total_steps: int, samples: Callable[[int], int], world: int, per_worker: int) -> int:
    """How many data epochs ``total_steps`` optimizer steps touch (epochs may differ in size)."""
    epochs, covered = 0, 0
    while covered < total_steps:
        covered += max((samples(epochs) // world) // per_worker, 1)
        epochs += 1
    return epochs


def run_training(s: Session, model: nn.Module, *, on_log: Log, on_checkpoint: Log, log: Log = lambda *_: None,
                 say: Callable[[str], None] = lambda _: None, before_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Steps ``s.start .. train.steps - 1`` of ``model`` (the objective, maybe DDP-wrapped).

    Before each epoch the objective's :meth:`~rayrcm.objectives.Objective.on_epoch` plans it
    (augmentation strength, a coreset pool); ``log``/``say`` are rank 0's metric log and console.
    """
    cfg, t = s.cfg, s.cfg.train
    per_worker = cfg.data.batch_size // s.world * t.accum_iter  # a step's images on this worker (all micro-batches)
    n_train = len(s.train_set)

    def samples(epoch: int) -> int:
        return cast(int, cfg.method.epoch_samples(epoch, n_train))

    ctx = EpochContext(epochs=epoch_count(t.steps, samples, s.world, per_worker), train_set=s.train_set, val_set=s.val_set,
                       work_dir=s.work_dir, device=s.device, rank=s.rank, world=s.world, seed=t.seed,
                       batch_size=cfg.data.batch_size, lr=cfg.optim.lr, comm=s.comm, log=log, say=say)

    def on_epoch(epoch: int) -> list[int] | None:
        plan = s.objective.on_epoch(epoch, ctx)
        if plan.augmentation_strength is not None:
            s.train_set.set_augmentation_strength(plan.augmentation_strength)
        if plan.metrics:
            log(epoch, {f"epoch_{k}": v for k, v in plan.metrics.items()})
        return plan.pool

    batches = batches_from(s.train_set, per_worker, s.rank, s.world, t.seed, s.start, cfg.data.num_workers, on_epoch=on_epoch,
                           epoch_samples=samples)
    clip_from = cfg.optim.warmup_steps if cfg.optim.clip_after_warmup else 0
    loop = Loop(model, s.objective, s.optimizer, s.scheduler, s.device, t.precision, cfg.optim.grad_clip, s.scaler, clip_from,
                accum=t.accum_iter, clip_mode=cfg.optim.clip_mode)
    return run_steps(loop, batches, start=s.start, total=t.steps, seed=t.seed, rank=s.rank,
                     batch_size=cfg.data.batch_size * t.accum_iter,
                     log_every=t.log_every, checkpoint_every=t.checkpoint_every, on_log=on_log, on_checkpoint=on_checkpoint,
                     before_step=before_step)
