"""Certification throughput: rayrcm's counting engine against a reference loop in the style of
the original smoothing code, the Ray Data job against the engine alone, and scaling over workers.

* ``reference``: Cohen et al.'s ``Smooth._sample_noise`` loop: ``x.repeat`` to a batch, fresh
  ``randn_like`` noise, ``torch.no_grad``, predictions copied to the host and counted with
  numpy every batch, fp32, fixed batch.
* ``plain_bf16``: the plain fast loop a careful user writes: ``x.repeat``, ``randn_like``, bf16
  autocast, ``argmax`` + ``bincount`` on the device, one host copy per image (``--plain-bf16``);
* ``engine``: :class:`rayrcm.certify.Smoother`: one noise buffer filled in place from the row's
  generator, broadcast add, ``inference_mode``, ``argmax`` + ``bincount`` on the device, one host
  copy per row; optional bf16/fp16 autocast and channels_last.
* ``ray``: ``rayrcm certify`` on a local cluster (the running one of ``RAY_ADDRESS`` when set)
  with 1 actor (same batch, same threads), wall time of the whole job (actor start included) and
  steady-state samples/s.
* ``scaling``: samples/s of the Ray job with 1, 2, 4 actors (one CPU thread each, or one GPU each).

Same model, same images, same n. ``--ref-n`` times the fp32 loops on fewer samples per image (the
cost is linear in n) and reports them per ``n``. Prints JSON lines and a JSON summary.

    python benchmarks/certify_engine.py [--device cpu|cuda] [--model vit_digits|cifar_resnet110|vit_base]
        [--image-size 16] [--n 10000] [--images 8] [--batch 500] [--precision fp32|bf16] [--channels-last]
        [--skip-ray] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_model(name: str, image_size: int, num_classes: int = 10):
    from rayrcm.config import ModelConfig
    from rayrcm.models import build_classifier

    enc = {"vit_base": "rcm_b"}.get(name, name)
    torch.manual_seed(0)
    return build_classifier(ModelConfig(encoder=enc), image_size, num_classes)


class CohenStyle:
    """The reference: the sampling loop of Cohen et al.'s ``core.py`` (device-agnostic here)."""

    def __init__(self, model, num_classes: int, sigma: float, device: str) -> None:
        self.model, self.k, self.sigma, self.device = model.to(device).eval(), num_classes, sigma, device

    def sample(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.k, dtype=int)
            remaining = num
            while remaining > 0:
                this = min(batch_size, remaining)
                remaining -= this
                batch = x.repeat((this, 1, 1, 1))
                noise = torch.randn_like(batch, device=self.device) * self.sigma
                predictions = self.model(batch + noise).argmax(1)
                counts += np.bincount(predictions.cpu().numpy(), minlength=self.k)
            return counts


class PlainBF16(CohenStyle):
    """A plain bf16 loop with on-device counting (no seeding, no reuse of buffers)."""

    def sample(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            counts = torch.zeros(self.k, dtype=torch.long, device=self.device)
            remaining = num
            while remaining > 0:
                this = min(batch_size, remaining)
                remaining -= this
                batch = x.repeat((this, 1, 1, 1))
                counts += torch.bincount(self.model(batch + torch.randn_like(batch) * self.sigma).argmax(1), minlength=self.k)
            return counts.cpu().numpy()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_reference(model, xs, n, batch, device, kind=CohenStyle) -> float:
    ref = kind(model, 10, 0.25, device)
    ref.sample(xs[0].to(device), batch, batch)  # warm-up
    _sync(device)
    tic = time.perf_counter()
    for x in xs:
        ref.sample(x.to(device), n, batch)
    _sync(device)
    return time.perf_counter() - tic


def time_engine(model, xs, n, batch, device, precision, channels_last) -> float:
    from rayrcm.certify import ESTIMATION, Smoother, noise_seed

    sm = Smoother(model, 10, 0.25, batch=batch, device=device, precision=precision, channels_last=channels_last)
    sm.count(xs[0], batch, 0)  # warm-up
    _sync(device)
    tic = time.perf_counter()
    for i, x in enumerate(xs):
        sm.count(x, n, noise_seed(0, i, ESTIMATION, 0))
    _sync(device)
    return time.perf_counter() - tic


def time_ray(model_file: Path, out: Path, args, workers: int) -> dict:
    from rayrcm.orchestration import certify_job

    cfg = certify_job.config_from_args([
        f"model={model_file}", f"out_dir={out}", f"name=bench-w{workers}", "tracking.enabled=false", "smoothing.n0=100",
        f"smoothing.n={args.n}", f"smoothing.chunk={args.n}", f"smoothing.indices={','.join(map(str, range(args.images)))}",
        f"compute.batch={args.batch}", f"compute.workers={workers}", f"compute.use_gpu={args.device == 'cuda'}",
        f"compute.cpus_per_worker={args.threads}", f"compute.precision={args.precision}",
        f"compute.channels_last={args.channels_last}", "compute.progress_every_s=1000"])
    tic = time.perf_counter()
    result = certify_job.run(cfg, show_table=False)
    wall = time.perf_counter() - tic
    device_s = float(result.rows["time"].sum())
    samples = args.images * (args.n + 100)
    return {"workers": workers, "wall_s": wall, "samples_per_s_wall": samples / wall,
            "samples_per_s_device": samples / device_s * workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="vit_digits")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (also each Ray actor's CPUs)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--ref-n", type=int, default=0, help="samples per image for the fp32 loops (default: --n); scaled to --n")
    ap.add_argument("--plain-bf16", action="store_true", help="also time a plain bf16 loop with on-device counting")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.image_size)
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.rand(3, args.image_size, args.image_size, generator=gen) * 255).round().div(255) for _ in range(args.images)]
    machine = f"{platform.machine()} {torch.get_num_threads()} thread(s)" + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    ref_n = args.ref_n or args.n
    scale = args.n / ref_n
    ref_s = time_reference(model, xs, ref_n, args.batch, args.device) * scale
    eng_s = time_engine(model, xs, ref_n, args.batch, args.device, "fp32", False) * scale
    rows = {"reference_fp32": ref_s, "engine_fp32": eng_s}
    if args.plain_bf16:
        rows["plain_bf16"] = time_reference(model, xs, args.n, args.batch, args.device, PlainBF16)
    if args.precision != "fp32" or args.channels_last:
        rows[f"engine_{args.precision}{'_cl' if args.channels_last else ''}"] = time_engine(
            model, xs, args.n, args.batch, args.device, args.precision, args.channels_last)
    samples = args.images * args.n
    for k, s in rows.items():
        print(json.dumps({"case": k, "s_per_image": s / args.images, "samples_per_s": samples / s, "ratio_vs_reference": ref_s / s}))
    summary = {"machine": machine, "model": args.model, "image_size": args.image_size, "n": args.n, "ref_n": ref_n,
               "batch": args.batch, "precision": args.precision, "channels_last": args.channels_last,
               **{f"{k}_s_per_image": v / args.images for k, v in rows.items()}}
    if not args.skip_ray:
        with tempfile.TemporaryDirectory() as tmp:
            model_file = _save_for_ray(model, args, Path(tmp))
            import ray

            own = {"num_cpus": max(4, args.threads * 4), "include_dashboard": False}
            ray.init(log_to_driver=False, **({} if os.environ.get("RAY_ADDRESS") else own))  # join a running one
            for w in [int(v) for v in args.workers.split(",")]:
                res = time_ray(model_file, Path(tmp) / "out", args, w)
                print(json.dumps({"case": "ray", **res}))
                summary[f"ray_w{w}"] = res
            ray.shutdown()
        one = summary.get("ray_w1")
        if one:
            core = samples / eng_s
            summary["ray_overhead_steady"] = core / one["samples_per_s_device"] - 1
            summary["ray_overhead_wall"] = (args.images * (args.n + 100) / one["samples_per_s_wall"]) / (eng_s * (args.n + 100) / args.n) - 1
            if args.precision != "fp32" or args.channels_last:  # the job ran at this precision: compare like with like
                fast = rows[f"engine_{args.precision}{'_cl' if args.channels_last else ''}"]
                summary["ray_overhead_steady"] = samples / fast / one["samples_per_s_device"] - 1
    print(json.dumps({"summary": summary}))


def _save_for_ray(model, args, folder: Path) -> Path:
    from rayrcm.config import ExperimentConfig, apply_overrides, to_dict
    from rayrcm.train.checkpoint import model_meta, save_model

    enc = {"vit_base": "rcm_b"}.get(args.model, args.model)
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", f"model.encoder={enc}", f"data.image_size={args.image_size}"])
    path = folder / "model.pt"
    save_model(path, model.cpu(), model_meta(to_dict(cfg), "classifier", 10))
    return path


if __name__ == "__main__":
    main()
