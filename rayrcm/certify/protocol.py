"""The certification protocol: a typed config, its validation, and the image list.

The numbers reported by randomized-smoothing papers differ in exactly these choices, so every
result records them (``protocol.json`` next to the rows, and the MLflow run's params): the image
list, ``n0``, ``n``, ``alpha``, ``sigma``, the noise ``seed``, ``chunk``/``block`` (which fix the
draws), the model reference and the SHA-256 of the model file actually certified.

The image list follows Cohen et al.'s ``certify.py``: dataset indices ``i`` with
``i % skip == 0`` and ``i < max`` (``max = -1``: to the end), or an explicit ``indices`` list.
Beware class-sorted datasets: the first 500 images of an ImageNet-style ``val/`` folder cover
only 10 classes, which is why the papers use ``skip`` (e.g. ``skip=100`` over 50,000 images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rayrcm.errors import MAX_SEED, ConfigError
from rayrcm.overrides import check_finite
from rayrcm.sections import PRECISIONS, TrackingConfig, check_job_name, default_storage

MODES = ("certify", "predict")
CORRUPTED = {"cifar10c": 10, "cifar100c": 100}  # released corruption sets certify reads (dataset -> classes)
SAMPLINGS = ("fixed", "iss", "sequential")
DECLINES = ("absolute", "relative")  # how an iss max_decline is measured
SPLITS = ("test", "val")


@dataclass(frozen=True)
class SmoothingConfig:
    """What is certified and how: these values decide the results."""

    sigma: float = 0.25  # noise std in [0, 1] pixel units
    n0: int = 100  # selection draws (certify)
    n: int = 100_000  # estimation draws (certify) or draws (predict)
    alpha: float = 0.001  # failure probability
    seed: int = 0  # noise seed; with chunk and block it fixes every draw
    skip: int = 1
    max: int = -1  # Cohen's --max: stop at this dataset index; -1 = to the end
    indices: tuple[int, ...] = ()  # explicit dataset indices (instead of skip/max)
    chunk: int = 10_000  # draws per row of work (an image is spread over ceil(n / chunk) rows)
    block: int = 100  # noise is drawn in blocks of this many samples; batches are multiples of it
    # fixed: n estimation draws for every image (Cohen et al.); iss: input-specific sample sizes of at
    # most n, chosen from the n0 selection draws (Chen et al., AAAI 2022; rayrcm.certify.iss)
    sampling: str = "fixed"
    max_decline: float = 0.05  # iss: the certified-radius decline allowed against the full n
    decline: str = "absolute"  # iss: max_decline in radius units (absolute) or as a fraction (relative)
    # sequential: the radii decided per image (certified accuracy at each; n is the cap on draws per image);
    # () = 0, 0.25, ... up to what the cap can certify (rayrcm.certify.sequential)
    radii: tuple[float, ...] = ()
    # sequential: settle a radius r as not certified once the interval shows the radius below r + tolerance
    # (0 = only below r); an image whose p_y sits at a threshold then stops long before the cap
    tolerance: float = 0.0


@dataclass(frozen=True)
class ComputeConfig:
    """How fast. None of these changes the noise; ``precision`` changes the base classifier's
    arithmetic (so it is recorded in the protocol), and batch size or memory format can flip an
    argmax only through floating-point differences of the model itself."""

    workers: int = 1  # counting actors (one per GPU with use_gpu)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    batch: int = 0  # samples per forward pass; 0 = choose the largest useful batch on the device
    precision: str = "fp32"  # fp32 (the published numbers), bf16 or fp16 autocast
    channels_last: bool = False
    flush_every: int = 8  # images per Parquet part written
    sequential_images: int = 32  # sequential: at most this many images a counting actor draws for side by side
    progress_every_s: float = 10.0


@dataclass(frozen=True)
class CertifyConfig:
    model: str = ""  # models:/name@alias, models:/name/3, runs:/<id>/model, a run id, or a model.pt path
    mode: str = "certify"
    dataset: str = ""  # default: the dataset the model was trained on
    data_path: str = ""  # default: the model's training data path
    split: str = "test"
    # the released CIFAR-10-C / CIFAR-100-C files (dataset cifar10c / cifar100c, data_path their folder):
    # the images of one corruption at one severity, in the order of the files
    corruption: str = ""
    severity: int = 0
    name: str = ""  # job name (results folder and MLflow run); rerunning it resumes
    out_dir: str = field(default_factory=lambda: default_storage("certify"))
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment=""))  # "" = the model's experiment
    # denoised smoothing (DDS): a rayrcm denoiser model file (export kind "denoiser", a ddpm run's model.pt),
    # referenced like ``model``; the job certifies model(denoiser(x + sigma z, sigma)). "" = no denoiser
    denoiser: str = ""
    # certifying on a dataset other than the model's training set (other than its corrupted copies) is refused
    # unless its labels mean the same classes: say so with same_classes=true
    same_classes: bool = False
    # modules or .py files imported by the driver and every counting actor (an export kind, a dataset);
    # not part of the protocol: they make results possible, they do not change them
    plugins: tuple[str, ...] = ()


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate_certify(cfg: CertifyConfig) -> CertifyConfig:
    """Check every value that can be checked without the model or the data; one-line errors."""
    s, c = cfg.smoothing, cfg.compute
    check_finite(cfg)  # every float finite (a Python-built config skips the override parser)
    _check(bool(cfg.model), "model", cfg.model, "give a registry URI, a run id or a model.pt path")
    _check(cfg.mode in MODES, "mode", cfg.mode, f"choose one of: {', '.join(MODES)}")
    _check(cfg.split in SPLITS, "split", cfg.split, f"choose one of: {', '.join(SPLITS)}")
    if cfg.dataset in CORRUPTED:
        _check(bool(cfg.corruption), "corruption", cfg.corruption, f"name the corruption to certify on ({cfg.dataset})")
        _check(1 <= cfg.severity <= 5, "severity", cfg.severity, "must be an integer from 1 to 5")
        _check(bool(cfg.data_path), "data_path", cfg.data_path, f"the folder of the {cfg.dataset} .npy files (never downloaded)")
        _check(cfg.split == "test", "split", cfg.split, "corrupted sets are test sets")
    else:
        _check(not cfg.corruption and not cfg.severity, "corruption", (cfg.corruption, cfg.severity),
               f"only with --dataset {' or '.join(CORRUPTED)}")
    _check(math.isfinite(s.sigma) and s.sigma > 0, "sigma", s.sigma, "must be > 0 (pixel units, data in [0, 1])")
    _check(0 < s.alpha < 1, "alpha", s.alpha, "must be in (0, 1)")
    _check(s.n0 >= 1, "n0", s.n0, "must be >= 1")
    _check(s.n >= 1, "n", s.n, "must be >= 1")
    _check(s.skip >= 1, "skip", s.skip, "must be >= 1")
    _check(s.max == -1 or s.max >= 1, "max", s.max, "must be >= 1, or -1 for the whole split")
    _check(all(i >= 0 for i in s.indices), "indices", s.indices, "dataset indices are >= 0")
    _check(len(set(s.indices)) == len(s.indices), "indices", s.indices, "must not repeat an index")
    _check(s.block >= 1, "block", s.block, "must be >= 1")
    _check(0 <= s.seed <= MAX_SEED, "seed", s.seed, "must be >= 0 and < 2^63 (a 64-bit noise seed)")
    out = Path(cfg.out_dir).expanduser()
    _check(not out.exists() or out.is_dir(), "out_dir", cfg.out_dir, "is a file; give a folder (created if missing)")
    _check(s.sampling in SAMPLINGS, "sampling", s.sampling, f"choose one of: {', '.join(SAMPLINGS)}")
    if s.sampling == "iss":
        _check(cfg.mode == "certify", "sampling", s.sampling, "input-specific sampling is for certify, not predict")
        _check(s.decline in DECLINES, "decline", s.decline, f"choose one of: {', '.join(DECLINES)}")
        top = 1.0 if s.decline == "relative" else math.inf
        _check(0 < s.max_decline < top, "max_decline", s.max_decline,
               "must be > 0" + (" and < 1 (a fraction of the radius)" if s.decline == "relative" else " (radius units)"))
    _check(s.chunk >= 1 and s.chunk % s.block == 0, "chunk", s.chunk, f"must be a positive multiple of block={s.block}")
    _check(not s.radii or s.sampling == "sequential", "radii", s.radii,
           f"radii are decided by --sampling sequential; sampling={s.sampling} certifies every radius up to its reach "
           "(choose the table's radii with rayrcm analyze --radii)")
    _check(not s.tolerance or s.sampling == "sequential", "tolerance", s.tolerance,
           f"a radius tolerance is for --sampling sequential, not sampling={s.sampling}")
    if s.sampling == "sequential":
        _check_sequential(cfg)
    _check(c.workers >= 1, "workers", c.workers, "must be >= 1")
    _check(c.batch >= 0, "batch", c.batch, "must be >= 0 (0 = automatic)")
    _check(c.precision in PRECISIONS, "precision", c.precision, f"choose one of: {', '.join(PRECISIONS)}")
    _check(c.gpus_per_worker > 0 and c.cpus_per_worker > 0, "compute.gpus_per_worker", (c.gpus_per_worker, c.cpus_per_worker), "resources per worker must be > 0")
    _check(c.flush_every >= 1, "compute.flush_every", c.flush_every, "must be >= 1")
    _check(all(p.strip() for p in cfg.plugins), "plugins", cfg.plugins, "give module names or .py files")
    if cfg.denoiser:
        from rayrcm.models.denoiser_sources import source_of

        source, entry = source_of(cfg.denoiser)
        _check(entry.certify, "denoiser", cfg.denoiser, "certify takes a rayrcm denoiser model file (a ddpm run's "
               f"model.pt) or its run / registry reference; the {source} source is for the cadis objective's method.denoiser")
    if cfg.name:
        check_job_name("name", cfg.name)
    return cfg


def _check_sequential(cfg: CertifyConfig) -> None:
    from rayrcm.certify.sequential import reach

    s = cfg.smoothing
    _check(cfg.mode == "certify", "sampling", s.sampling, "sequential sampling is for certify, not predict")
    _check(s.n >= s.block and s.n % s.block == 0, "n", s.n,
           f"the cap on draws per image must be a positive multiple of block={s.block} (one look per block)")
    _check(all(math.isfinite(r) and r >= 0 for r in s.radii), "radii", s.radii, "must be finite and >= 0")
    _check(all(a < b for a, b in zip(s.radii, s.radii[1:])), "radii", s.radii, "must be increasing, each once")
    _check(math.isfinite(s.tolerance) and s.tolerance >= 0, "tolerance", s.tolerance,
           "must be a radius >= 0 (0: refute r only when the radius is below r)")
    top = reach(s.n, s.alpha, s.sigma)
    _check(not s.radii or s.radii[-1] < top, "radii", s.radii,
           f"beyond what n={s.n} draws can certify at sigma={s.sigma:g}, alpha={s.alpha:g}: every radius must be "
           f"< {top:.4f} (raise n, the cap)")
    _check(cfg.compute.sequential_images >= 1, "compute.sequential_images", cfg.compute.sequential_images, "must be >= 1")


def sequential_radii(s: SmoothingConfig) -> tuple[float, ...]:
    """The radii a sequential job decides: ``s.radii``, or 0, 0.25, ... below what the cap can certify."""
    from rayrcm.certify.sequential import reach

    if s.radii:
        return tuple(float(r) for r in s.radii)
    top = reach(s.n, s.alpha, s.sigma)
    return tuple(r for r in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0) if r < top)


def reach_warnings(mode: str, s: SmoothingConfig) -> list[str]:
    """What a certification's settings cannot reach, said before any draw (one line): every image
    abstains when even n successes in n draws do not bound p_A above 1/2 (fixed and input-specific
    sampling; a sequential job's radii beyond its cap are refused by :func:`validate_certify`)."""
    from rayrcm.certify.stats import lower_confidence_bound

    if mode != "certify" or s.sampling == "sequential" or lower_confidence_bound(s.n, s.n, s.alpha) > 0.5:
        return []
    need = math.floor(math.log2(1 / s.alpha)) + 1  # alpha^(1/n) > 1/2
    return [f"with smoothing.n={s.n} and alpha={s.alpha:g} every image abstains: even {s.n} successes in {s.n} draws "
            f"do not bound p_A above 1/2 (that takes n >= {need} at this alpha); raise smoothing.n or alpha"]


def select_indices(size: int, s: SmoothingConfig) -> list[int]:
    """The dataset indices to certify (Cohen's ``--skip``/``--max``, or ``indices``), checked against ``size``."""
    if s.indices:
        bad = [i for i in s.indices if i >= size]
        _check(not bad, "indices", bad[:5], f"beyond the split's {size} images")
        return list(s.indices)
    _check(s.max <= size, "max", s.max, f"beyond the split's {size} images")
    stop = size if s.max == -1 else s.max
    return list(range(0, stop, s.skip))




# keys added to the protocol after results were first written, with the value an older job had:
# a protocol.json without them compares as that value (None: as any value), so its rerun resumes
ADDED_KEYS = {"image_size": None, "crop_pct": None, "sampling": "fixed", "denoiser_sha256": "", "corruption": "",
              "severity": 0, "tolerance": 0.0}  # "": no denoiser
# recorded in the protocol but not compared on resume (as the model reference: the file's SHA-256 decides)
NOT_COMPARED = ("denoiser",)


def protocol_dict(cfg: CertifyConfig, *, dataset: str, model_sha256: str, num_classes: int, indices: list[int],
                  image_size: int = 0, crop_pct: float | None = None, denoiser_sha256: str = "") -> dict:
    """What decides the results (compared on resume; logged as params). Not ``plugins``.
    ``image_size``: the side of the images the model sees (the model file's); ``crop_pct``: the
    centre crop of ImageNet-style (large) datasets, None for the others; ``denoiser_sha256``: the
    SHA-256 of the denoiser file in front of the model ("" for none; its reference is recorded too)."""
    s = cfg.smoothing
    out = {
        "mode": cfg.mode, "dataset": dataset, "split": cfg.split, "sigma": s.sigma, "n0": s.n0 if cfg.mode == "certify" else 0,
        "n": s.n, "alpha": s.alpha, "seed": s.seed, "chunk": s.chunk, "block": s.block, "skip": s.skip, "max": s.max,
        "explicit_indices": bool(s.indices), "num_images": len(indices), "num_classes": num_classes,
        "precision": cfg.compute.precision, "model_sha256": model_sha256, "image_size": int(image_size),
        "sampling": s.sampling, "denoiser_sha256": denoiser_sha256, "corruption": cfg.corruption,
        "severity": int(cfg.severity),
    }
    if denoiser_sha256:
        out["denoiser"] = cfg.denoiser
    if s.sampling == "iss":
        out.update(max_decline=s.max_decline, decline=s.decline)
    if s.sampling == "sequential":  # no selection draws: the label is the class tested; n is the cap
        out.update(n0=0, radii=list(sequential_radii(s)), interval="beta-mixture-cs", tolerance=float(s.tolerance))
    if crop_pct is not None:
        out["crop_pct"] = float(crop_pct)
    return out


def protocol_diff(old: dict, new: dict) -> list[str]:
    """``"key old != new"`` for each key of ``new`` that ``old`` holds otherwise, and for each
    sampling key (``max_decline``, ``decline``) only one of them holds; a key of
    :data:`ADDED_KEYS` that ``old`` lacks (written before it was recorded) compares as its old value.
    (``radii`` and ``interval`` likewise: a sequential protocol's keys.)"""
    def before(k: str) -> object:
        if k in old or k not in ADDED_KEYS:
            return old.get(k)
        return new[k] if ADDED_KEYS[k] is None else ADDED_KEYS[k]

    diff = [f"{k} {before(k)!r} != {v!r}" for k, v in new.items() if k not in NOT_COMPARED and before(k) != v]
    return diff + [f"{k} {old[k]!r} != None" for k in ("max_decline", "decline", "radii", "interval", "tolerance") if k in old and k not in new]
