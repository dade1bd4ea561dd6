"""Training throughput: the Ray Train loop with one worker vs the same loop called directly.

Same objective, model, batch, precision and thread count (a 1-CPU Ray worker runs torch on one
thread, so the direct loop is pinned to one thread too). Throughput is measured over the last
``--window`` steps of ``--steps``, after warm-up, in the same way on both sides (the loop's own
``images_per_s``); start-up of Ray and the worker group is reported separately (of the worker
group only when a running cluster is joined, ``RAY_ADDRESS``: ``ray_cluster`` says which).

    python benchmarks/train_overhead.py [--steps 120 --window 60 --device cpu|cuda --set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


def build_cfg(args, storage: str):
    from rayrcm.config import ExperimentConfig, apply_overrides

    return apply_overrides(ExperimentConfig(), [
        "method.name=gaussian", "data.image_size=32", "data.batch_size=128", "model.encoder=vit_digits",
        f"train.steps={args.steps}", f"train.log_every={args.window}", f"train.checkpoint_every={args.steps}",
        "train.workers=1", f"train.use_gpu={args.device == 'cuda'}", f"train.precision={args.precision}",
        f"train.storage_path={storage}", "tracking.enabled=false", *args.overrides])


def direct(cfg, device: str) -> float:
    from rayrcm.data import MultiView, build_splits, build_transform
    from rayrcm.objectives import build_objective
    from rayrcm.train.loop import Loop, batches_from, run_steps
    from rayrcm.train.optim import build_optimizer, build_scheduler

    splits = build_splits(cfg.data)
    train = MultiView(splits.train, [build_transform(v, cfg.data.image_size) for v in cfg.method.views(cfg.data.augmentation)])
    torch.manual_seed(0)
    obj = build_objective(cfg, splits.num_classes).to(device)
    opt = build_optimizer(obj, obj.export(), cfg.optim)
    loop = Loop(obj, obj, opt, build_scheduler(opt, cfg.optim, cfg.train.steps), torch.device(device), cfg.train.precision)
    seen: dict[int, float] = {}
    run_steps(loop, batches_from(train, cfg.data.batch_size, 0, 1, 0, 0), start=0, total=cfg.train.steps, seed=0, rank=0,
              batch_size=cfg.data.batch_size, log_every=cfg.train.log_every, checkpoint_every=cfg.train.steps,
              on_log=lambda s, m: seen.__setitem__(s, m["images_per_s"]), on_checkpoint=lambda s, m: None)
    return seen[cfg.train.steps]


def with_ray(cfg) -> tuple[float, float]:
    from rayrcm.orchestration.trainer import fit

    tic = time.perf_counter()
    result = fit(cfg, ray_init={"num_cpus": 2, "include_dashboard": False})
    return result.metrics["images_per_s"], time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--window", type=int, default=60)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as storage:
        cfg = build_cfg(args, storage)
        d = direct(cfg, args.device)
        r, wall = with_ray(cfg)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   + (torch.cuda.get_device_name() if args.device == "cuda" else "CPU"),
        "model": cfg.model.encoder, "image_size": cfg.data.image_size, "batch": cfg.data.batch_size,
        "precision": cfg.train.precision, "steps_measured": args.window,
        "direct_images_per_s": round(d, 1), "ray_images_per_s": round(r, 1),
        "ray_over_direct": round(r / d, 3), "overhead_pct": round(100 * (1 - r / d), 1),
        "ray_wall_s_including_startup": round(wall, 1),
        "ray_cluster": "joined" if os.environ.get("RAY_ADDRESS") else "started",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
