"""Input-specific and sequential sampling against the fixed protocol: the same model, the same
images, the same noise streams (an ISS image's estimation draws, and a sequential image's draws,
are the first ones of the fixed protocol's estimation stream).

* ``fixed``: Cohen et al.'s CERTIFY, ``n0`` selection draws and ``n`` estimation draws per image;
* ``iss``: Chen et al.'s input-specific sampling (``rayrcm certify --sampling iss``): a pilot of
  ``--iss-n0`` selection draws plans each image's estimation draws (at most ``n``) within a
  certified-radius decline of ``--max-decline``;
* ``sequential``: ``rayrcm certify --sampling sequential --radii R``: each image drawn until every
  radius of ``--radii`` is decided by the anytime-valid confidence sequence (cap ``n``);
* ``tolerant``: the same with ``--tolerance T`` (a radius ``r`` is settled as not certified once
  the interval shows the radius below ``r + T``: images at a threshold stop before the cap).

All run as ``rayrcm certify`` jobs (Ray Data, ``--workers`` actors). Reported per protocol:
total draws, wall time, ACR (not for sequential) and certified accuracy at the radii; then the
ratios against fixed, and for sequential the (image, radius) decisions that differ from the
fixed protocol's (certified there and not here, and the reverse). Two models:

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


def train_cifar(root: Path, out: Path, sigma: float, steps: int, gpu: bool = False) -> Path:
    from rayrcm.config import from_dict
    from rayrcm.orchestration.trainer import fit

    cfg = from_dict({
        "data": {"name": "cifar10", "path": str(root), "image_size": 32, "augmentation": "none", "batch_size": 128},
        "model": {"encoder": "cifar_resnet20"},
        "method": {"name": "gaussian", "sigma": sigma},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "warmup_steps": 20},
        "train": {"name": "cifar-digits", "steps": steps, "workers": 1, "checkpoint_every": steps, "log_every": 50, "use_gpu": gpu,
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
                 f"compute.cpus_per_worker={args.cpus_per_worker}", "compute.progress_every_s=60",
                 f"compute.use_gpu={args.gpu}", f"compute.precision={args.precision}"]
    if sampling == "iss":
        overrides += ["smoothing.sampling=iss", f"smoothing.n0={args.iss_n0}", f"smoothing.max_decline={args.max_decline}"]
    elif sampling in ("sequential", "tolerant"):
        overrides += ["smoothing.sampling=sequential", "smoothing.radii=" + ",".join(f"{r:g}" for r in args.radii)]
        if sampling == "tolerant":
            overrides += [f"smoothing.tolerance={args.tolerance}"]
    else:
        overrides += [f"smoothing.n0={args.n0}"]
    tic = time.perf_counter()
    result = certify_job.run(certify_job.config_from_args(overrides), show_table=False)
    wall = time.perf_counter() - tic
    rows = result.rows.sort_values("idx").reset_index(drop=True)
    radii = list(args.radii)
    certified = np.stack([(rows["correct"].to_numpy() == 1) & (rows["radius"].to_numpy() >= r) for r in radii], 1)
    return {"sampling": sampling, "images": len(rows), "samples": total_samples(rows), "wall_s": round(wall, 1),
            "acr": result.metrics.get("acr", float("nan")),
            "certified_acc": dict(zip(map(str, radii), certified_accuracy(rows, radii).round(4).tolist())),
            "mean_n": float(rows["n"].mean()), "max_samples": float(rows["samples"].max()),
            "abstain": float((rows["predict"] == -1).mean()), "certified": certified.tolist(), "idx": rows["idx"].tolist()}


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
    ap.add_argument("--radii", type=lambda v: [float(r) for r in v.split(",")], default=[0.0, 0.25, 0.5, 0.75],
                    help="the radii of the table, and those sequential decides (default 0,0.25,0.5,0.75)")
    ap.add_argument("--modes", default="fixed,iss,sequential,tolerant",
                    help="protocols to run, comma separated (tolerant: sequential with --tolerance)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="tolerant: the radius tolerance of a refutation")
    ap.add_argument("--skip", type=int, default=6, help="every skip-th test image (default 6: 60 of 360)")
    ap.add_argument("--max", type=int, default=-1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--gpu", action="store_true", help="train (--cifar) and count on one GPU per actor")
    ap.add_argument("--precision", default="fp32", help="the counting actors' precision")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not args.model and not args.cifar:
        ap.error("give --model PATH or --cifar")
    out = Path(args.out or tempfile.mkdtemp(prefix="certify-sampling-"))
    torch.set_num_threads(1)
    model = Path(args.model) if args.model else None
    if args.cifar:
        root = write_cifar_digits(out / "data")
        model = train_cifar(root, out / "train", args.sigma, args.train_steps, args.gpu)
    assert model is not None
    runs = {m: certify(model, out / "certify", f"{m}-{args.sigma:g}", args, m) for m in args.modes.split(",")}
    fixed = runs["fixed"]
    summary = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "torch": torch.__version__,
               "model": "cifar_resnet20 (trained here)" if args.cifar else str(model), "sigma": args.sigma, "n": args.n,
               "alpha": args.alpha, "max_decline": args.max_decline, "iss_n0": args.iss_n0, "radii": args.radii,
               "tolerance": args.tolerance}
    for m, r in runs.items():
        if m == "fixed":
            continue
        summary[f"samples_ratio_{m}"] = fixed["samples"] / max(r["samples"], 1)
        summary[f"wall_ratio_{m}"] = fixed["wall_s"] / max(r["wall_s"], 1e-9)
        a, b = np.asarray(fixed["certified"]), np.asarray(r["certified"])
        assert fixed["idx"] == r["idx"]
        summary[f"only_fixed_{m}"] = int(np.sum(a & ~b))  # (image, radius) certified by fixed, not by m
        summary[f"only_{m}"] = int(np.sum(b & ~a))
        summary[f"acc_gap_{m}"] = max(abs(fixed["certified_acc"][k] - r["certified_acc"][k]) for k in fixed["certified_acc"])
    for r in runs.values():
        r.pop("certified"), r.pop("idx")
    summary.update(runs)
    print(json.dumps(summary), flush=True)
    print("\n| protocol | images | draws | draws/img (max) | wall s | ACR | " + " | ".join(f"r={r}" for r in fixed["certified_acc"]) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(fixed["certified_acc"]))
    for m, r in runs.items():
        print(f"| {m} | {r['images']} | {r['samples']:,.0f} | {r['samples'] / r['images']:,.0f} ({r['max_samples']:,.0f}) | "
              f"{r['wall_s']:.1f} | {r['acr']:.3f} | " + " | ".join(f"{v:.3f}" for v in r["certified_acc"].values()) + " |")
    for m in runs:
        if m != "fixed":
            print(f"draws fixed/{m} = {summary[f'samples_ratio_{m}']:.2f}x, wall = {summary[f'wall_ratio_{m}']:.2f}x, "
                  f"largest certified-accuracy gap {summary[f'acc_gap_{m}']:.3f}; (image, radius) certified only by fixed: "
                  f"{summary[f'only_fixed_{m}']}, only by {m}: {summary[f'only_{m}']}")


if __name__ == "__main__":
    main()
