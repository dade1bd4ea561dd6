"""Input-specific sampling against the fixed protocol: the same model, the same images, the same
noise streams (an ISS image's estimation draws are the first ones of the fixed protocol's).

* ``fixed``: Cohen et al.'s CERTIFY, ``n0`` selection draws and ``n`` estimation draws per image;
* ``iss``: Chen et al.'s input-specific sampling (``rayrcm certify --sampling iss``): a pilot of
  ``--iss-n0`` selection draws plans each image's estimation draws (at most ``n``) within a
  certified-radius decline of ``--max-decline``.

Both run as ``rayrcm certify`` jobs (Ray Data, ``--workers`` actors). Reported per protocol:
total draws, wall time, ACR and certified accuracy at radii; then the ratios. Two models:

* ``--model PATH``: any classifier file, e.g. the quickstart's digits model
  (``rayrcm quickstart`` writes ``rayrcm_results/quickstart-finetune/model.pt``);
* ``--cifar``: a CIFAR-10-format folder written here (the digits drawn in colour on coloured
  backgrounds at 32x32, with pixel noise) and a CIFAR ResNet trained on it with Gaussian noise
  augmentation at ``--sigma``.

    python benchmarks/certify_sampling.py --model rayrcm_results/quickstart-finetune/model.pt --sigma 0.25
    python benchmarks/certify_sampling.py --cifar --sigma 0.5
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_cifar_digits(root: Path, seed: int = 0) -> Path:
    """A CIFAR-10-format folder of 32x32 colour digits: 1,437 training and 360 test images."""
    from rayrcm.data.datasets import digits_tensors

    x, y = digits_tensors(32)
    rng = np.random.default_rng(seed)
    fg = rng.integers(0, 256, (len(x), 3, 1, 1))
    bg = rng.integers(0, 256, (len(x), 3, 1, 1))
    ink = x[:, :1].numpy().astype(np.float64) / 255
    img = ink * fg + (1 - ink) * bg + rng.normal(0, 12, (len(x), 3, 32, 32))
    img = np.clip(img, 0, 255).astype(np.uint8).reshape(len(x), -1)
    order = rng.permutation(len(x))
    test, train = order[:360], order[360:]
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(train, 5)
    for i, part in enumerate(parts, 1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({"data": img[part], "labels": y[part].tolist()}))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": img[test], "labels": y[test].tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return root


def train_cifar(root: Path, out: Path, sigma: float, steps: int) -> Path:
    from rayrcm.config import from_dict
    from rayrcm.orchestration.trainer import fit

    cfg = from_dict({
        "data": {"name": "cifar10", "path": str(root), "image_size": 32, "augmentation": "none", "batch_size": 128},
        "model": {"encoder": "cifar_resnet20"},
        "method": {"name": "gaussian", "sigma": sigma},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "warmup_steps": 20},
        "train": {"name": "cifar-digits", "steps": steps, "workers": 1, "checkpoint_every": steps, "log_every": 50,
                  "storage_path": str(out)},
        "tracking": {"enabled": False},
    })
    fit(cfg)
    return out / "cifar-digits" / "model.pt"


def certify(model: Path, out: Path, name: str, args: argparse.Namespace, sampling: str) -> dict:
    from rayrcm.analysis import certified_accuracy, total_samples
    from rayrcm.orchestration import certify_job

    overrides = [f"model={model}", f"out_dir={out}", f"name={name}", "tracking.enabled=false",
                 f"smoothing.sigma={args.sigma}", f"smoothing.n={args.n}", f"smoothing.alpha={args.alpha}",
                 f"smoothing.skip={args.skip}", f"smoothing.max={args.max}", f"compute.workers={args.workers}",
                 f"compute.cpus_per_worker={args.cpus_per_worker}", "compute.progress_every_s=60"]
    if sampling == "iss":
        overrides += ["smoothing.sampling=iss", f"smoothing.n0={args.iss_n0}", f"smoothing.max_decline={args.max_decline}"]
    else:
        overrides += [f"smoothing.n0={args.n0}"]
    tic = time.perf_counter()
    result = certify_job.run(certify_job.config_from_args(overrides), show_table=False)
    wall = time.perf_counter() - tic
    rows = result.rows
    radii = [0.0, 0.25, 0.5, 0.75, 1.0]
    return {"sampling": sampling, "images": len(rows), "samples": total_samples(rows), "wall_s": round(wall, 1),
            "acr": result.metrics["acr"], "certified_acc": dict(zip(map(str, radii), certified_accuracy(rows, radii).round(4).tolist())),
            "mean_n": float(rows["n"].mean()), "abstain": float((rows["predict"] == -1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a classifier file (e.g. the quickstart's model.pt)")
    ap.add_argument("--cifar", action="store_true", help="write a CIFAR-10-format set and train a CIFAR ResNet-20 on it")
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n0", type=int, default=100, help="fixed protocol: selection draws (Cohen et al.: 100)")
    ap.add_argument("--iss-n0", type=int, default=1000, help="iss: the pilot (selection) draws that plan n")
    ap.add_argument("--max-decline", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--skip", type=int, default=18, help="every skip-th test image (default 18: 20 of 360)")
    ap.add_argument("--max", type=int, default=-1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not args.model and not args.cifar:
        ap.error("give --model PATH or --cifar")
    out = Path(args.out or tempfile.mkdtemp(prefix="certify-sampling-"))
    torch.set_num_threads(1)
    model = Path(args.model) if args.model else None
    if args.cifar:
        root = write_cifar_digits(out / "data")
        model = train_cifar(root, out / "train", args.sigma, args.train_steps)
    assert model is not None
    runs = [certify(model, out / "certify", f"{s}-{args.sigma:g}", args, s) for s in ("fixed", "iss")]
    fixed, iss = runs
    summary = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "torch": torch.__version__,
               "model": "cifar_resnet20 (trained here)" if args.cifar else str(model), "sigma": args.sigma, "n": args.n,
               "alpha": args.alpha, "max_decline": args.max_decline, "iss_n0": args.iss_n0, "fixed": fixed, "iss": iss,
               "samples_ratio": fixed["samples"] / max(iss["samples"], 1), "wall_ratio": fixed["wall_s"] / max(iss["wall_s"], 1e-9),
               "acr_decline": fixed["acr"] - iss["acr"]}
    print(json.dumps(summary), flush=True)
    print("\n| protocol | images | draws | wall s | ACR | " + " | ".join(f"r={r}" for r in fixed["certified_acc"]) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(fixed["certified_acc"]))
    for r in runs:
        print(f"| {r['sampling']} | {r['images']} | {r['samples']:,.0f} | {r['wall_s']:.1f} | {r['acr']:.3f} | "
              + " | ".join(f"{v:.3f}" for v in r["certified_acc"].values()) + " |")
    print(f"\ndraws fixed/iss = {summary['samples_ratio']:.2f}x, wall = {summary['wall_ratio']:.2f}x, "
          f"ACR decline = {summary['acr_decline']:.4f} (budget {args.max_decline:g} per image)")


if __name__ == "__main__":
    main()
