"""Certification throughput of a denoised classifier (denoised smoothing, Carlini et al. 2023: a
one-shot diffusion denoiser in front of the classifier) against the classifier alone.

* ``engine``: :class:`rayrcm.certify.Smoother` counting ``n`` noisy samples per image with the
  classifier, then with :class:`rayrcm.models.denoised.DenoisedClassifier` (one epsilon-prediction
  UNet pass at the timestep of sigma, then the classifier);
* ``ray``: ``rayrcm certify`` with 1 actor on model files, without and with ``--denoiser``
  (actor start-up included in the wall time).

The networks are built here untrained (speed does not depend on the weights): the classifier from
``--encoder``, the denoiser as rayrcm's ``ddpm`` UNet (``--unet-channels``, ``--mults``, linear
schedule T = 1000). Same images, same n, same batch. Prints JSON and a Markdown row.

    python benchmarks/certify_denoised.py [--device cpu|cuda] [--encoder cifar_resnet20] [--image-size 32]
        [--unet-channels 32] [--mults 1,2,2] [--n 2000] [--images 4] [--batch 500] [--precision fp32|bf16] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def build(args: argparse.Namespace):
    from rayrcm.config import ModelConfig
    from rayrcm.models import build_classifier
    from rayrcm.objectives.ddpm import DDPMConfig, DDPMObjective

    torch.manual_seed(0)
    classifier = build_classifier(ModelConfig(encoder=args.encoder), args.image_size, 10)
    ddpm = DDPMConfig(schedule="linear", steps=1000, base_channels=args.unet_channels, channel_mults=args.mults)
    denoiser = DDPMObjective(ddpm).export()
    return classifier, denoiser, ddpm


def time_engine(model, xs, args) -> float:
    from rayrcm.certify import ESTIMATION, Smoother, noise_seed

    sm = Smoother(model, 10, sigma=args.sigma, batch=args.batch, block=100, device=args.device, precision=args.precision)
    sm.count(xs[0], args.batch, 0)  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for i, x in enumerate(xs):
        sm.count(x, args.n, noise_seed(0, i, ESTIMATION, 0))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / len(xs)


def time_ray(classifier, denoiser, ddpm, args) -> tuple[float, float]:
    from rayrcm.orchestration import certify_job
    from rayrcm.train.checkpoint import model_meta, save_model

    tmp = Path(tempfile.mkdtemp(prefix="certify-denoised-"))
    data = {"name": "digits", "image_size": args.image_size}
    save_model(tmp / "classifier.pt", classifier, model_meta({"model": {"encoder": args.encoder}, "data": data,
                                                              "method": {"name": "gaussian", "sigma": args.sigma}},
                                                             "classifier", 10))
    method = {"name": "ddpm", "schedule": "linear", "steps": 1000, "base_channels": args.unet_channels,
              "channel_mults": list(ddpm.channel_mults), "channels": 3}
    save_model(tmp / "denoiser.pt", denoiser, model_meta({"model": {"encoder": args.encoder}, "data": data,
                                                           "method": method}, "denoiser", 10))
    walls = []
    for extra in ([], [f"denoiser={tmp / 'denoiser.pt'}"]):
        cfg = certify_job.config_from_args([
            f"model={tmp / 'classifier.pt'}", f"out_dir={tmp / 'out'}", "tracking.enabled=false", f"smoothing.sigma={args.sigma}",
            "smoothing.n0=100", f"smoothing.n={args.n}", f"smoothing.indices={','.join(str(i) for i in range(args.images))}",
            f"compute.batch={args.batch}", "compute.workers=1", f"compute.precision={args.precision}",
            f"compute.use_gpu={str(args.device == 'cuda').lower()}", "compute.progress_every_s=60", *extra])
        tic = time.perf_counter()
        certify_job.run(cfg, show_table=False)
        walls.append((time.perf_counter() - tic) / args.images)
    return walls[0], walls[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encoder", default="cifar_resnet20")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--unet-channels", type=int, default=32)
    ap.add_argument("--mults", default="1,2,2")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    args.mults = tuple(int(m) for m in args.mults.split(","))
    if args.device == "cpu":
        torch.set_num_threads(1)  # as a 1-CPU counting actor
    classifier, denoiser, ddpm = build(args)
    from rayrcm.models.denoised import DenoisedClassifier

    xs = [torch.rand(3, args.image_size, args.image_size) for _ in range(args.images)]
    alone = time_engine(classifier, xs, args)
    composite = time_engine(DenoisedClassifier(classifier, denoiser, args.sigma), xs, args)
    params = {"classifier": sum(p.numel() for p in classifier.parameters()),
              "denoiser": sum(p.numel() for p in denoiser.parameters())}
    out = {"machine": f"{platform.machine()}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}",
           "torch": torch.__version__, "encoder": args.encoder, "image_size": args.image_size, "unet": [args.unet_channels, args.mults],
           "params": params, "n": args.n, "batch": args.batch, "precision": args.precision,
           "engine_s_per_image": {"classifier": round(alone, 3), "denoised": round(composite, 3)},
           "engine_slowdown": round(composite / alone, 2),
           "s_per_image_at_n_100k": {"classifier": round(alone * 100_000 / args.n, 1),
                                     "denoised": round(composite * 100_000 / args.n, 1)}}
    if not args.skip_ray:
        ray_alone, ray_denoised = time_ray(classifier, denoiser, ddpm, args)
        out["ray_wall_s_per_image"] = {"classifier": round(ray_alone, 3), "denoised": round(ray_denoised, 3)}
    print(json.dumps(out), flush=True)
    print(f"| {args.encoder} {args.image_size}px + UNet {args.unet_channels}x{args.mults} ({params['denoiser'] / 1e6:.2f}M) "
          f"| {alone:.3f} | {composite:.3f} | {composite / alone:.1f}x | {out['s_per_image_at_n_100k']['denoised']} |")


if __name__ == "__main__":
    main()
