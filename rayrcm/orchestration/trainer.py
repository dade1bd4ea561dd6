"""The driver: validate, open the MLflow run, run the Ray Train job, log and register the model."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rayrcm.config import (
    ExperimentConfig,
    needs_epochs,
    resolve_epochs,
    to_dict,
    to_flat_dict,
    validate,
)
from rayrcm.data import build_splits
from rayrcm.errors import ConfigError
from rayrcm.models.classifier import check_encoder_file
from rayrcm.orchestration import tracking
from rayrcm.orchestration.train_worker import train_worker
from rayrcm.train.checkpoint import MODEL_FILE


@dataclass
class FitResult:
    job: str
    run_id: str | None
    metrics: dict[str, Any]
    model_file: Path
    model: dict[str, Any] = field(default_factory=dict)  # model_uri, registry_uri, alias_uri


def storage_root(cfg: ExperimentConfig) -> str:
    p = cfg.train.storage_path
    return p if "://" in p else str(Path(p).expanduser().resolve())


def ensure_ray(**kwargs: Any) -> None:
    """Connect to ``RAY_ADDRESS`` when set (a cluster or ``ray job submit``), else start Ray locally."""
    from rayrcm.orchestration import console

    console.configure()  # no-op for the console filters when ray was imported already
    import ray

    if not ray.is_initialized():
        where = {"address": os.environ["RAY_ADDRESS"]} if os.environ.get("RAY_ADDRESS") else kwargs
        ray.init(**{**console.ray_init_kwargs(), **where}, log_to_driver=True)


def prepare(cfg: ExperimentConfig) -> tuple[ExperimentConfig, str | None]:
    """Validate everything and resolve URIs before any Ray work; returns (config, tracking uri)."""
    cfg = validate(cfg)
    if needs_epochs(cfg):
        cfg = resolve_epochs(cfg, len(build_splits(cfg.data).train))
    batch, workers = cfg.data.batch_size, max(cfg.train.workers, 1)
    if batch % workers:
        raise ConfigError("data.batch_size", batch, f"must be divisible by train.workers={workers} (it is the global batch)")
    cfg = replace(cfg, train=replace(cfg.train, storage_path=storage_root(cfg)))
    uri = None
    if cfg.tracking.enabled:
        uri = tracking.normalize_uri(cfg.tracking.uri)
        tracking.check_reachable(uri)
    if cfg.model.init_from:
        dst = Path(cfg.train.storage_path) / cfg.job_name / "init"
        local = tracking.resolve_model(cfg.model.init_from, uri, dst)
        check_encoder_file(local, cfg.model, cfg.data.image_size)
        cfg = replace(cfg, model=replace(cfg.model, init_from=str(local)))
    return cfg, uri


def summary_line(job: str, metrics: dict[str, Any], seconds: float) -> str:
    """``[rayrcm] job: done in 42 s, loss 0.31, test_acc_clean 0.91, ...`` (the test metrics, else validation)."""
    keys = [k for k in metrics if k.startswith("test_") and not k.endswith("_images")]
    keys = keys or [k for k in metrics if k.startswith("val_")]
    shown = [f"{k} {metrics[k]:.4g}" for k in ["loss", *keys] if isinstance(metrics.get(k), (int, float))]
    return f"[rayrcm] {job}: done in {seconds:.0f} s" + (", " + ", ".join(shown) if shown else "")


def version_tags(cfg: ExperimentConfig) -> dict[str, str]:
    tags = {"dataset": cfg.data.name, "method": cfg.method.name, "encoder": cfg.model.encoder, "job": cfg.job_name}
    if hasattr(cfg.method, "sigma"):
        tags["sigma"] = f"{cfg.method.sigma:g}"
    return tags


def fit(cfg: ExperimentConfig, *, parent_run_id: str | None = None, ray_init: dict[str, Any] | None = None,
        callbacks: list[Any] | None = None) -> FitResult:
    """Run one training stage on Ray Train; resumes when ``cfg.job_name`` ran before.
    ``callbacks``: Ray Train ``UserCallback``s (a sweep passes Tune's ``TuneReportCallback``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, uri = prepare(cfg)
    t, job = cfg.train, cfg.job_name
    run_id = None
    if uri:
        run_id = tracking.start_job_run(uri, cfg.tracking.experiment, job, to_flat_dict(cfg),
                                        tags={"rayrcm.stage": cfg.method.stage}, parent_run_id=parent_run_id)
        print(f"[rayrcm] MLflow run {run_id} ({uri})", flush=True)
    ensure_ray(**(ray_init or {}))
    tic = time.perf_counter()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_id": run_id, "tracking_uri": uri},
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu),
        run_config=ray.train.RunConfig(
            name=job,
            storage_path=t.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        if uri and run_id:
            tracking.end_run(uri, run_id, ok=False)
        raise
    out_dir = Path(t.storage_path) / job if "://" not in t.storage_path else Path(".") / "rayrcm_results" / job
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        shutil.copy2(Path(d) / MODEL_FILE, out_dir / MODEL_FILE)
    fit_result = FitResult(job, run_id, dict(result.metrics or {}), out_dir / MODEL_FILE)
    print(summary_line(job, fit_result.metrics, time.perf_counter() - tic), flush=True)
    if uri and run_id:
        fit_result.model = tracking.log_model(uri, run_id, out_dir / MODEL_FILE, register_as=cfg.tracking.register_as,
                                              alias=cfg.tracking.alias, version_tags=version_tags(cfg))
        tracking.end_run(uri, run_id, ok=True)
    return fit_result
