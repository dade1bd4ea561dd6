"""Throughput of the robustness evaluation job (``rayrcm evaluate``) against a plain PyTorch loop
over the same model, images and attack, and its scaling from 1 to 2 actors.

* ``plain``: a loop anyone would write: batches of uint8 images to [0, 1], ``rayrcm.attacks.pgd_ce``
  (L-inf PGD-k, random start from torch's global generator), a forward pass, count the right ones;
  the clean pass likewise under ``no_grad``.
* ``shard code``: the job's per-shard function (:func:`rayrcm.orchestration.evaluate_actor.shard_correct`,
  per-image seeded PGD starts) called in this process on the job's shard rows: what an actor computes,
  without Ray.
* ``ray``: ``rayrcm evaluate`` on a local cluster with 1 and 2 actors (one CPU thread each, or one GPU
  each); "device" images/s from the per-shard seconds the actors report (summed over shards, divided
  by the actor count), "wall" over the whole job, actor start-up included.

Same model (an untrained classifier; speed does not depend on its weights), same images (the digits
test split at the model's size), same attack. Prints JSON lines and a summary.

    python benchmarks/evaluate_throughput.py [--device cpu|cuda] [--model vit_digits] [--image-size 16]
        [--suite clean,pgd] [--pgd-steps 10] [--images 360] [--batch 120] [--shard-size 120] [--workers 1,2]
        [--repeat 2] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def save_model(folder: Path, name: str, image_size: int) -> Path:
    from rayrcm.config import ExperimentConfig, apply_overrides, to_dict
    from rayrcm.models import build_classifier
    from rayrcm.train.checkpoint import model_meta, save_model

    torch.manual_seed(0)
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", f"model.encoder={name}",
                                               f"data.image_size={image_size}"])
    path = folder / "model.pt"
    save_model(path, build_classifier(cfg.model, image_size, 10), model_meta(to_dict(cfg), "classifier", 10))
    return path


def job_config(model_file: Path, out: Path, args, workers: int, name: str):
    from rayrcm.orchestration import evaluate_job

    return evaluate_job.config_from_args([
        f"model={model_file}", f"out_dir={out}", f"name={name}", "tracking.enabled=false", f"suite={args.suite}",
        f"pgd_steps={args.pgd_steps}", f"max_images={args.images}", f"shard_size={args.shard_size}",
        f"batch={args.batch}", f"workers={workers}", f"use_gpu={args.device == 'cuda'}",
        f"cpus_per_worker={args.threads}", "progress_every_s=1000", "flush_every=1000"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(model, images, labels, args) -> tuple[float, dict[str, int]]:
    """Seconds and correct counts of the plain loop over every attack of the suite."""
    from rayrcm.attacks import PGDConfig, pgd_ce

    model = model.to(args.device).eval()
    cfg = PGDConfig("linf", 8 / 255, 2 / 255, args.pgd_steps, True)
    correct = {}
    _sync(args.device)
    tic = time.perf_counter()
    for part in args.suite.split(","):
        n = 0
        for lo in range(0, len(labels), args.batch):
            x = images[lo:lo + args.batch].to(args.device).float().div_(255)
            y = labels[lo:lo + args.batch].to(args.device)
            if part == "pgd":
                x = pgd_ce(model, x, y, cfg)
            with torch.no_grad():
                n += int((model(x).argmax(1) == y).sum())
        correct[part] = n
    _sync(args.device)
    return time.perf_counter() - tic, correct


def shard_code(model, p, args) -> float:
    """Seconds of the job's own per-shard function over every shard row, in this process."""
    from rayrcm.orchestration.evaluate_actor import shard_correct, shard_images

    model = model.to(args.device).eval()
    _sync(args.device)
    tic = time.perf_counter()
    for r in p.todo:
        x, y = shard_images(r, p.images, p.labels, p.settings)
        shard_correct(model, x, y, r["attack"], p.settings, index=r["index"], device=args.device)
    _sync(args.device)
    return time.perf_counter() - tic


def ray_job(model_file: Path, out: Path, args, workers: int) -> dict:
    from rayrcm.orchestration import evaluate_job

    tic = time.perf_counter()
    result = evaluate_job.run(job_config(model_file, out, args, workers, f"bench-w{workers}"), show_table=False)
    wall = time.perf_counter() - tic
    images = int(result.rows["images"].sum())
    device_s = float(result.rows["seconds"].sum()) / workers
    return {"workers": workers, "wall_s": wall, "images": images, "images_per_s_wall": images / wall,
            "images_per_s_device": images / device_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--suite", default="clean,pgd")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=360)
    ap.add_argument("--batch", type=int, default=120)
    ap.add_argument("--shard-size", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (also each Ray actor's CPUs)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeat", type=int, default=2, help="in-process timings: best of this many, alternated")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from rayrcm.models.export import build_from_file
    from rayrcm.orchestration import evaluate_job

    machine = f"{platform.machine()} {torch.get_num_threads()} thread(s)" + \
        (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    with tempfile.TemporaryDirectory() as tmp:
        model_file = save_model(Path(tmp), args.model, args.image_size)
        p = evaluate_job.prepare(job_config(model_file, Path(tmp) / "out", args, 1, "local"))
        model, _ = build_from_file(model_file)
        n = len(p.labels) * len(args.suite.split(","))
        plain_loop(model, p.images[:args.batch], p.labels[:args.batch], args)  # warm-up
        plain_s, shard_s = float("inf"), float("inf")
        for _ in range(args.repeat):  # alternated, best of each: this machine's load varies
            seconds, correct = plain_loop(model, p.images, p.labels, args)
            plain_s = min(plain_s, seconds)
            shard_s = min(shard_s, shard_code(model, p, args))
        summary = {"machine": machine, "model": args.model, "image_size": args.image_size, "suite": args.suite,
                   "pgd_steps": args.pgd_steps, "images": len(p.labels), "batch": args.batch,
                   "plain_images_per_s": n / plain_s, "shard_code_images_per_s": n / shard_s,
                   "shard_code_vs_plain": plain_s / shard_s, "plain_correct": correct}
        print(json.dumps({"case": "plain", "seconds": plain_s, "images_per_s": n / plain_s}))
        print(json.dumps({"case": "shard_code", "seconds": shard_s, "images_per_s": n / shard_s}))
        if not args.skip_ray:
            import ray

            ray.init(num_cpus=max(2, args.threads * 2), include_dashboard=False, log_to_driver=False)
            for w in [int(v) for v in args.workers.split(",")]:
                res = ray_job(model_file, Path(tmp) / "out", args, w)
                print(json.dumps({"case": "ray", **res}))
                summary[f"ray_w{w}"] = res
                summary[f"ray_w{w}_device_vs_plain"] = res["images_per_s_device"] / (n / plain_s)
            ray.shutdown()
            if "ray_w1" in summary and "ray_w2" in summary:
                w1, w2 = summary["ray_w1"], summary["ray_w2"]
                summary["speedup_w2_wall"] = w2["images_per_s_wall"] / w1["images_per_s_wall"]
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
