"""The quickstart: the whole RCM pipeline on the bundled digits, on a local Ray cluster, in minutes.

1. RCM contrastive-denoising pretraining of a small ViT (Ray Train, 2 workers, DDP).
2. Consistency fine-tuning (the seed's ``--task=consistency``) at sigma = 0.25 from that encoder
   (found by run id), keeping the checkpoint best on a held-out validation split.
3. Clean and noisy test accuracy at sigma 0.25 and 0.5; everything in MLflow; the classifier
   registered as ``rcm-digits`` with the alias ``sigma-0_25``.
4. Randomized-smoothing certification of every 4th digits test image (90 images) at sigma 0.25
   with n = 1,000 (Ray Data, 2 counting actors), loaded by that alias; the certified-accuracy
   table is printed and logged, with the curve, to a child run of the fine-tuning run.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from rayrcm.config import ExperimentConfig, apply_overrides, from_dict
from rayrcm.sections import sigma_alias

if TYPE_CHECKING:
    from rayrcm.certify.protocol import CertifyConfig

SIGMA = 0.25


def pretrain_config() -> ExperimentConfig:
    return from_dict({
        "data": {"name": "digits", "image_size": 16, "augmentation": "strong", "batch_size": 128},
        "model": {"encoder": "vit_digits", "proj_hidden_dim": 512, "proj_dim": 128},
        "method": {"name": "rcm", "levels_start": 10, "levels_end": 40},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 20, "grad_clip": 2.0},
        "train": {"name": "quickstart-pretrain", "steps": 150, "workers": 2, "checkpoint_every": 50, "log_every": 25,
                  "progress_every_s": 30},
        "tracking": {"experiment": "rayrcm-quickstart"},
    })


def finetune_config(encoder_ref: str = "") -> ExperimentConfig:
    from rayrcm.objectives.rcm import (
        rcm_input_scale,  # torch: loaded when a config is built, not for --help
    )

    return from_dict({
        # 16 px digits: random crops cost more accuracy than they add in 300 steps
        "data": {"name": "digits", "image_size": 16, "augmentation": "none", "batch_size": 128},
        # RCM preconditioning at the training noise level, see rcm_input_scale
        "model": {"encoder": "vit_digits", "init_from": encoder_ref or None, "input_scale": rcm_input_scale(SIGMA)},
        # the RCM seed's consistency fine-tuning (Jeong & Shin): m = 2 noisy copies, lbd 10, eta 0.5 at sigma 0.25
        "method": {"name": "consistency", "sigma": SIGMA, "m": 2, "lbd": 10.0, "eta": 0.5},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 20},
        "train": {"name": "quickstart-finetune", "steps": 300, "workers": 2, "checkpoint_every": 100, "log_every": 50,
                  "progress_every_s": 30,
                  "eval_sigmas": (0.25, 0.5), "select_metric": "val_acc_sigma_0.25"},
        "tracking": {"experiment": "rayrcm-quickstart", "register_as": "rcm-digits", "alias": sigma_alias(SIGMA)},
    })


def certify_config(model_ref: str, tracking_uri: str) -> CertifyConfig:
    from rayrcm.orchestration.certify_job import config_from_args

    return config_from_args([
        f"model={model_ref}", f"tracking.uri={tracking_uri}",
        f"smoothing.sigma={SIGMA}", "smoothing.n0=100", "smoothing.n=1000", "smoothing.alpha=0.001",
        "smoothing.skip=4", "smoothing.chunk=1000", "compute.workers=2", "compute.progress_every_s=30",
    ])


def ui_line(uri: str, run_id: str | None) -> str:
    """How to open the runs list, with the headline metrics as columns (the experiment's saved view)."""
    from rayrcm.orchestration import lineage

    view = lineage.update_runs_view(uri, run_id) if run_id else ""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{view}"
    return f"mlflow ui --backend-store-uri {uri}" + (f", then http://127.0.0.1:5000/{view}" if view else "")


def run(overrides: list[str] | None = None) -> dict:
    """Pretrain, fine-tune, evaluate, certify; print the tables and where to look. Returns the jobs'
    results, the accuracy rows and the seconds it took."""
    from rayrcm.config import validate
    from rayrcm.orchestration.trainer import fit

    overrides = overrides or []
    tic = time.perf_counter()
    pre = apply_overrides(pretrain_config(), overrides)
    ft = apply_overrides(finetune_config("placeholder"), overrides)
    validate(pre)  # fail on bad input before any Ray work
    validate(replace(ft, model=replace(ft.model, init_from=None)))
    pre_result = fit(pre)
    ref = pre_result.run_id or str(pre_result.model_file)
    ft = replace(ft, model=replace(ft.model, init_from=ref))
    result = fit(ft)
    m = result.metrics
    accuracy = [("clean", m.get("test_acc_clean"))] + [(f"sigma={s:g}", m.get(f"test_acc_sigma_{s:g}"))
                                                       for s in ft.train.eval_sigmas]
    print("\nDigits test accuracy of the fine-tuned classifier (consistency fine-tuning, sigma=0.25):")
    print(accuracy_table(accuracy))
    model_ref = result.model.get("alias_uri") or result.run_id or str(result.model_file)
    from rayrcm.orchestration import certify_job

    cert_cfg = certify_config(model_ref, ft.tracking.uri)
    if not ft.tracking.enabled:
        cert_cfg = replace(cert_cfg, model=str(result.model_file), tracking=replace(cert_cfg.tracking, enabled=False))
    cert = certify_job.run(cert_cfg, show_table=False)
    print("\n" + certified_table(cert.table, len(cert.rows)))
    print(f"\nPretraining run: {pre_result.run_id}\nFine-tuning run: {result.run_id}")
    if result.model.get("alias_uri"):
        print(f"Registered model: {result.model['alias_uri']} (version {result.model['version']})")
    print(f"Certification:    run {cert.run_id}, results {cert.out / 'results.tsv'}")
    print(f"                  curve {cert.out / 'certified_accuracy.png'}")
    print(f"Checkpoints: {result.model_file.parent}")
    print(f"MLflow UI:   {ui_line(ft.tracking.uri, cert.run_id or result.run_id)}")
    seconds = time.perf_counter() - tic
    print(f"Total time:  {seconds:.0f} s")
    return {"pretrain": pre_result, "finetune": result, "certify": cert, "accuracy": accuracy, "seconds": seconds}


def accuracy_table(accuracy: list[tuple[str, float | None]]) -> str:
    return "\n".join(["| input | accuracy |", "|---|---|"]
                     + [f"| {name} | {acc:.3f} |" if acc is not None else f"| {name} | n/a |" for name, acc in accuracy])


def certified_table(table, images: int) -> str:
    """The certification's table as the quickstart prints it (and the README shows it)."""
    from rayrcm.analysis import to_markdown

    return (f"Certified accuracy at L2 radius r (sigma={SIGMA}, n=1000, alpha=0.001, {images} test images):\n"
            + to_markdown(table.rename(index=lambda _: "quickstart")))


# ----------------------------------------------------------------------------- the README's table

README_BEGIN, README_END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"
TOLERANCE = 0.07  # the README's numbers hold within this on another CPU (an AVX-512 EPYC moved them by up to 0.066: 6 of 90 images)


def readme_block(out: dict) -> str:
    """What the README shows of a quickstart run (``run``'s return value), between its markers."""
    import os

    cert = out["certify"]
    return "\n".join([
        README_BEGIN, "```", accuracy_table(out["accuracy"]), "", certified_table(cert.table, len(cert.rows)), "...",
        "MLflow UI:   mlflow ui --backend-store-uri sqlite:///mlflow.db, then http://127.0.0.1:5000/#/experiments/1"
        "?viewStateShareKey=rayrcm", "```", "",
        f"(Written by `make readme-table` from a quickstart run of {out['seconds'] / 60:.1f} min on {os.cpu_count()} CPU "
        f"cores; `tests/test_quickstart_readme.py` reruns the quickstart and holds every number to within "
        f"{TOLERANCE}.)", README_END])


def readme_numbers(text: str) -> dict[str, float]:
    """``{"clean": 0.922, ..., "quickstart 0.25": 0.8, ...}``: the numbers of the block in ``text``
    (a README, or a quickstart's console) keyed by row and column."""
    out: dict[str, float] = {}
    head: list[str] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or line.startswith("|---"):
            continue
        if cells[0] in ("input", "run"):
            head = cells
            continue
        for col, cell in zip(head[1:], cells[1:]):
            try:
                out[cells[0] if col == "accuracy" else f"{cells[0]} {col}"] = float(cell.replace(",", ""))
            except ValueError:
                pass
    return out


def write_readme(path: str) -> None:
    """Run the quickstart in a fresh folder (no earlier run to resume) and put its tables into the
    README at ``path`` (between the markers)."""
    import os
    import tempfile
    from pathlib import Path

    readme = Path(path).resolve()
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path}: no {README_BEGIN} ... {README_END} block")
    os.chdir(tempfile.mkdtemp(prefix="rayrcm-readme-"))
    block = readme_block(run())
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + block + text[end:])
    print(f"[rayrcm] wrote the quickstart's tables into {path}")


if __name__ == "__main__":  # make readme-table
    import sys

    write_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")


