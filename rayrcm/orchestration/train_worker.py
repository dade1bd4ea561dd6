"""The Ray Train worker function: builds everything from the config and runs the pure step loop.

Every worker calls ``ray.train.report`` at the same steps (it is a barrier); rank 0 attaches the
checkpoint and is the only process that writes to MLflow.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rayrcm.config import from_dict
from rayrcm.data import MultiView, build_splits
from rayrcm.data.views import data_transform
from rayrcm.eval.accuracy import accuracies, count_correct
from rayrcm.eval.robust import robust_counts, robust_metrics
from rayrcm.objectives import build_objective
from rayrcm.train.checkpoint import (
    BEST_MODEL_FILE,
    MODEL_FILE,
    load_model_file,
    load_state,
    model_meta,
    read_best,
    save_model,
    save_state,
    write_best,
)
from rayrcm.train.loop import Loop, batches_from, run_steps
from rayrcm.train.optim import build_optimizer, build_scheduler


def fault_marker(storage_path: str, job: str, step: int) -> Path:
    return Path(storage_path) / job / f".fault_injected_at_{step}"


def _inject_fault(storage_path: str, job: str, step: int) -> None:
    """Test hook: raise once at ``step``; a marker on shared storage keeps the retry from raising."""
    marker = fault_marker(storage_path, job, step)
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected worker failure at step {step} (train.fault_at_step)")


def say(message: str) -> None:
    """One progress line to the worker's real stdout (Ray forwards it to the driver once).

    Ray Train patches ``print`` and tees when a library (MLflow here) has wrapped
    ``sys.stdout``, which would show every line twice.
    """
    print(message, file=sys.__stdout__, flush=True)


def _coreset_schedule(cfg: Any, objective: Any, train_set: Any, splits: Any, device: torch.device, rank: int, world: int,
                      logger: Any):
    """RCS's ``epoch -> coreset or None`` (:class:`rayrcm.train.rcs.CoresetSchedule`) with this
    run's collectives; rank 0 reports each selection."""
    from rayrcm.errors import ConfigError
    from rayrcm.train.rcs import CoresetSchedule

    m = cfg.method
    val = MultiView(splits.val, [data_transform("none", cfg.data, large=splits.large)])
    if m.rcs_val_images:
        val = torch.utils.data.Subset(val, list(range(min(m.rcs_val_images, len(val)))))
    if len(val) == 0:
        raise ConfigError("data.val_fraction", cfg.data.val_fraction, "RCS needs an unlabeled validation split (> 0)")

    def gather(block: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(block.to(device)) for _ in range(world)]
        dist.all_gather(parts, block.to(device))
        return torch.cat(parts).cpu()

    def agree(indices: list[int]) -> list[int]:  # rank 0's choice, bit for bit, everywhere
        chosen = torch.tensor(indices, device=device)
        dist.broadcast(chosen, 0)
        return chosen.cpu().tolist()

    schedule = CoresetSchedule(objective, m, train_set, val, Path(cfg.train.storage_path) / cfg.job_name / "coreset",
                               unit=m.rcs_unit or cfg.data.batch_size, lr=m.rcs_lr or cfg.optim.lr, seed=cfg.train.seed,
                               device=device, rank=rank, world=world,
                               **({"gather": gather, "agree": agree} if world > 1 else {}))

    def coreset(epoch: int) -> list[int] | None:
        indices = schedule(epoch)
        if schedule.selected is not None:
            at, took = schedule.selected
            if rank == 0:
                say(f"[rayrcm] RCS: epoch {at}: coreset of {len(indices)}/{len(train_set)} samples selected in {took:.1f} s")
                if logger is not None:
                    logger.log(at, {"rcs_coreset_size": float(len(indices)), "rcs_select_seconds": took})
            if world > 1:
                dist.barrier()  # rank 0 has written the file
        return indices

    return coreset


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = cfg.train

    splits = build_splits(cfg.data)
    large = splits.large
    train_set = MultiView(splits.train, [data_transform(v, cfg.data, large=large) for v in cfg.method.views(cfg.data.augmentation)])
    eval_set = MultiView(splits.test, [data_transform("none", cfg.data, large=large)])
    val_set = MultiView(splits.val, [data_transform("none", cfg.data, large=large)])
    validate_ = cfg.method.stage == "classifier" and len(splits.val) > 0

    torch.manual_seed(t.seed)  # identical initial weights on every worker
    objective = build_objective(cfg, splits.num_classes)
    exported = objective.export()
    optimizer = build_optimizer(objective, exported, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    meta = model_meta(config["cfg"], cfg.method.stage, splits.num_classes)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        objective.load_state_dict(state["objective"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
    objective.to(device)
    model = ray.train.torch.prepare_model(objective) if world > 1 else objective

    logger = None
    if rank == 0 and config.get("run_id"):
        from rayrcm.orchestration.tracking import MetricLogger

        logger = MetricLogger(config["tracking_uri"], config["run_id"], cfg.tracking.system_metrics)
    if rank == 0:
        say(f"[rayrcm] {cfg.job_name}: {'resuming at' if start else 'starting'} step {start}/{t.steps}, "
            f"{world} worker(s), {len(splits.train)} training images")

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "images_per_s"))
            say(f"[rayrcm] step {step}/{t.steps} {shown}")
            if logger is not None:
                logger.log(step, metrics)

    def evaluate(ds, prefix: str) -> dict[str, float]:
        counts = count_correct(objective.export(), ds, t.eval_sigmas, device=device, rank=rank, world=world, seed=t.seed,
                              votes=t.eval_votes if prefix == "val" else 1)
        if world > 1:
            counts = counts.to(device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        return accuracies(counts, t.eval_sigmas, prefix)

    def robust_evaluate(rcfg: Any) -> dict[str, float]:
        if rank == 0:
            say(f"[rayrcm] robust evaluation on the test split: SA, PGD-{rcfg.pgd_steps}"
                f"{', AutoAttack (APGD-CE + APGD-T)' if rcfg.autoattack else ''} at {rcfg.norm} eps {rcfg.eps:.4g}")
        model_ = objective.export().to(device)
        counts = robust_counts(model_, eval_set, rcfg, device=device, rank=rank, world=world, seed=t.seed)
        if world > 1:
            counts = counts.to(device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        out = robust_metrics(counts, rcfg, "test")
        if rank == 0:
            say("[rayrcm] " + " ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "test_robust_images"))
        return out

    best_file = Path(t.storage_path) / cfg.job_name / BEST_MODEL_FILE

    def validate_and_select(step: int) -> dict[str, float]:
        """Validation accuracies; rank 0 keeps the model best on ``train.select_metric`` (never the test set)."""
        val = evaluate(val_set, "val")
        if rank == 0:
            if logger is not None:
                logger.log(step, val)
            best = read_best(best_file)
            if t.select_metric and (best is None or val[t.select_metric] > best["value"]):
                write_best(best_file, objective.export(), meta, step, t.select_metric, val[t.select_metric])
        return val

    def report(step: int, metrics: dict[str, float], final: bool = False) -> None:
        if validate_ and not final:
            metrics = {**metrics, **validate_and_select(step)}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                save_state(d, objective, optimizer, scaler, step, meta)
                if final:
                    save_model(Path(d) / MODEL_FILE, objective.export(), meta)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)

    def before(step: int) -> None:
        if step == t.fault_at_step and rank == 0:
            _inject_fault(t.storage_path, cfg.job_name, step)

    per_worker = cfg.data.batch_size // world
    n_train = len(train_set)

    def epoch_samples(epoch: int) -> int:
        return cfg.method.epoch_samples(epoch, n_train)

    epochs, covered = 0, 0
    while covered < t.steps:
        covered += max((epoch_samples(epochs) // world) // per_worker, 1)
        epochs += 1
    rcs = _coreset_schedule(cfg, objective, train_set, splits, device, rank, world, logger) \
        if getattr(cfg.method, "rcs_fraction", 1.0) < 1.0 else None

    def on_epoch(epoch: int) -> list[int] | None:
        settings = objective.on_epoch(epoch, epochs)
        if "augmentation_strength" in settings:
            for tf in train_set.transforms:
                if hasattr(tf, "strength"):
                    tf.strength = settings["augmentation_strength"]
        if settings and logger is not None:
            logger.log(epoch, {f"epoch_{k}": v for k, v in settings.items()})
        return rcs(epoch) if rcs is not None else None

    batches = batches_from(train_set, per_worker, rank, world, t.seed, start, cfg.data.num_workers, on_epoch=on_epoch,
                           epoch_samples=epoch_samples)
    loop = Loop(model, objective, optimizer, scheduler, device, t.precision, cfg.optim.grad_clip, scaler)
    metrics = run_steps(loop, batches, start=start, total=t.steps, seed=t.seed, rank=rank, batch_size=cfg.data.batch_size,
                        log_every=t.log_every, checkpoint_every=t.checkpoint_every, on_log=on_log,
                        on_checkpoint=report, before_step=before)

    final: dict[str, float] = {}
    if validate_:
        final.update(validate_and_select(t.steps))
        if world > 1:
            dist.barrier()  # rank 0 has written the best model
        best = read_best(best_file) if t.select_metric else None
        if best is not None:
            objective.export().load_state_dict(load_model_file(best_file)["model"], strict=True)
            final.update(selected_step=float(best["step"]), selected_value=float(best["value"]))
            if rank == 0:
                say(f"[rayrcm] selected the step-{best['step']} model: {t.select_metric} = {best['value']:.4f} (validation split)")
    if cfg.method.stage == "classifier":
        final.update(evaluate(eval_set, "test"))
        robust = cfg.method.robust_eval()
        if robust is not None:
            final.update(robust_evaluate(robust))
        if logger is not None:  # validation metrics were logged by validate_and_select
            logger.log(t.steps, {k: v for k, v in final.items() if not k.startswith("val_")})
    report(t.steps, {**metrics, **final}, final=True)
    if logger is not None:
        logger.close()
