"""The step loop, free of Ray: batches by step index, autocast, clipping, schedule, callbacks.

Resuming is exact: the data order is a function of ``(seed, epoch)``, and the global RNG is
re-seeded from ``(seed, rank, step)`` before each batch is drawn, so step ``k`` sees the same
augmentations, noise and noise level whether or not the run was interrupted before it (with
``data.num_workers=0``; loader worker processes draw their own seeds).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rayrcm.errors import NonFiniteLoss
from rayrcm.objectives.base import Objective


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


def batches_from(dataset: Dataset[Any], per_worker: int, rank: int, world: int, seed: int, start_step: int, num_workers: int = 0,
                 on_epoch: Callable[[int], Sequence[int] | None] | None = None,
                 epoch_samples: Callable[[int], int] | None = None) -> Iterator[Any]:
    """Infinite per-worker batches, skipping the first ``start_step`` of them without loading them.

    Epoch ``e`` permutes its pool with seed ``(seed, e)`` and gives rank ``r`` every ``world``-th
    index from ``r`` (DistributedSampler's split); the last partial batch is dropped. The pool is
    the whole dataset, or the indices ``on_epoch(e)`` returns (a coreset); ``on_epoch`` runs before
    epoch ``e``'s loader starts (also for the epoch a resume lands in), so per-epoch settings
    (DynACL's augmentation strength) reach the loader's workers. ``epoch_samples(e)`` is the pool
    size of epoch ``e``, known in advance so a resume finds its epoch without building pools.
    """
    n = len(dataset)  # type: ignore[arg-type]
    size = epoch_samples or (lambda e: n)

    def steps_in(e: int) -> int:
        steps = (size(e) // world) // per_worker
        if steps < 1:
            raise ValueError(f"epoch {e} trains on {size(e)} samples, too few for {world} workers x batch {per_worker}")
        return steps

    steps_in(0)
    epoch, skip = 0, start_step
    while skip >= steps_in(epoch):
        skip -= steps_in(epoch)
        epoch += 1
    while True:
        pool = on_epoch(epoch) if on_epoch is not None else None
        per_epoch = steps_in(epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if pool is None:
            order = torch.randperm(n, generator=g)[rank::world][: per_epoch * per_worker].tolist()
        else:
            pool = list(pool)
            if len(pool) != size(epoch):
                raise ValueError(f"epoch {epoch}: pool of {len(pool)} samples, expected {size(epoch)}")
            order = [pool[i] for i in torch.randperm(len(pool), generator=g)[rank::world][: per_epoch * per_worker].tolist()]
        loader = DataLoader(dataset, batch_size=per_worker, sampler=order[skip * per_worker:],
                            num_workers=num_workers, generator=torch.Generator().manual_seed(epoch),
                            persistent_workers=False, drop_last=True)
        yield from loader
        epoch, skip = epoch + 1, 0


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def clip_gradients(params: list[torch.Tensor], clip: float, mode: str = "global") -> None:
    """``global``: :func:`torch.nn.utils.clip_grad_norm_` over all gradients. ``per_param``: every
    parameter's gradient scaled by ``min(1, clip / (||g|| + 1e-6))`` on its own, as FT-CADIS's
    ``utils.clip_gradients`` (DINO's), without a host sync per parameter."""
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, clip)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2.0)
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


class StepSchedule(Protocol):
    """A per-step schedule: timm's schedulers and the wrappers of :mod:`rayrcm.train.optim`."""

    def step_update(self, num_updates: int) -> None: ...


@dataclass
class Loop:
    """One optimizer step at a time for a (possibly DDP-wrapped) objective."""

    model: nn.Module  # the objective, maybe wrapped in DDP
    objective: Objective  # the unwrapped objective
    optimizer: torch.optim.Optimizer
    scheduler: StepSchedule
    device: torch.device
    precision: str = "fp32"
    grad_clip: float = 0.0
    scaler: torch.amp.GradScaler | None = None
    clip_from: int = 0  # first step that clips (the RCM authors clip only after the warm-up)
    accum: int = 1  # micro-batches per update (train.accum_iter)
    clip_mode: str = "global"  # optim.clip_mode: global norm, or each parameter's gradient on its own
    _params: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, step: int, batch: Any) -> dict[str, float]:
        """One optimizer update from ``batch``. With ``accum`` > 1 the batch is cut into ``accum``
        equal micro-batches (in order), each forward and backward on its own with the loss divided by
        ``accum``, DDP's gradient all-reduce only on the last one, then one clip and one update, as the
        FT-CADIS authors' ``accum_iter`` (``train.py:553-570``); ``loss`` and the objective's metrics
        are the micro-batches' mean. An objective whose loss couples the images of a batch (in-batch
        negatives, BatchNorm statistics) sees each micro-batch alone, as it would with the authors'
        accumulation."""
        views, target = batch
        self.scheduler.step_update(step)  # lr for this update, a pure function of the step
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = list(zip(*[v.tensor_split(self.accum) for v in views], strict=True))
        targets = target.tensor_split(self.accum)
        sums: dict[str, float] = {}
        for i, (micro, y) in enumerate(zip(parts, targets, strict=True)):
            last = i == self.accum - 1
            no_sync = getattr(self.model, "no_sync", None)  # DDP: no gradient all-reduce before the last micro-batch
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                out = self._forward_backward(step, [v.to(self.device, non_blocking=True) for v in micro],
                                             y.to(self.device, non_blocking=True))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v / self.accum
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0 and step >= self.clip_from:
            clip_gradients(self._params, self.grad_clip, self.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.objective.on_step_end(step)
        return {"loss": sums.pop("loss"), "lr": self.optimizer.param_groups[-1]["lr"], **sums}

    def _forward_backward(self, step: int, views: list[torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        with autocast_for(self.device, self.precision):
            out = self.model(views, target, step)
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise NonFiniteLoss(step, loss)
        scaled = out.loss / self.accum if self.accum > 1 else out.loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return {"loss": loss, **{k: float(v) for k, v in out.metrics.items()}}


def run_steps(loop: Loop, batches: Iterator[Any], *, start: int, total: int, seed: int, rank: int, batch_size: int,
              log_every: int, checkpoint_every: int,
              on_log: Callable[[int, dict[str, float]], None],
              on_checkpoint: Callable[[int, dict[str, float]], None],
              before_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Run steps ``start .. total-1``; log every ``log_every`` and checkpoint every ``checkpoint_every``."""
    metrics: dict[str, float] = {}
    tic, done = time.perf_counter(), 0
    for step in range(start, total):
        if before_step is not None:
            before_step(step)
        torch.manual_seed(step_seed(seed, rank, step))
        metrics = loop.step(step, next(batches))
        done += 1
        if (step + 1) % log_every == 0 or step + 1 == total:
            elapsed = time.perf_counter() - tic
            metrics["images_per_s"] = done * batch_size / max(elapsed, 1e-9)
            on_log(step + 1, metrics)
            tic, done = time.perf_counter(), 0
        if (step + 1) % checkpoint_every == 0 and step + 1 != total:
            on_checkpoint(step + 1, metrics)
    return metrics
