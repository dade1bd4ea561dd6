"""The certification protocol: the config's validation, the protocol recorded with the results, and
the image list (the config itself: :mod:`rayrcm.certify.config`; a sampling mode's own checks and
keys: its entry in :mod:`rayrcm.certify.sampling`).

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
from pathlib import Path
from typing import Any

from rayrcm.certify.config import (
    CORRUPTED,
    DECLINES,
    MODES,
    SPLITS,
    CertifyConfig,
    ComputeConfig,
    SmoothingConfig,
)
from rayrcm.certify.sampling import SAMPLING_MODES, sampling_mode
from rayrcm.certify.sampling.base import require as _check
from rayrcm.certify.sampling.sequential import sequential_radii
from rayrcm.errors import MAX_SEED
from rayrcm.overrides import check_finite
from rayrcm.sections import PRECISIONS, check_job_name

__all__ = [  # the config's names are re-exported: callers import them from here
    "ADDED_KEYS", "CORRUPTED", "DECLINES", "MODES", "NOT_COMPARED", "SPLITS", "CertifyConfig", "ComputeConfig",
    "SmoothingConfig", "protocol_dict", "protocol_diff", "reach_warnings", "select_indices", "sequential_radii",
    "validate_certify",
]


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
    _check(s.sampling in SAMPLING_MODES, "sampling", s.sampling, f"choose one of: {', '.join(SAMPLING_MODES.names())}")
    mode = sampling_mode(s.sampling)
    _check(cfg.mode in mode.modes, "sampling", s.sampling, f"{mode.title or mode.name} sampling is for {' and '.join(mode.modes)}, "
                                                           f"not {cfg.mode}")
    _check(s.chunk >= 1 and s.chunk % s.block == 0, "chunk", s.chunk, f"must be a positive multiple of block={s.block}")
    for other in SAMPLING_MODES:  # another mode's own keys, given to this one
        if other != s.sampling:
            sampling_mode(other).refuse(cfg)
    mode.check(cfg)
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


def reach_warnings(mode: str, s: SmoothingConfig) -> list[str]:
    """What a certification's settings cannot reach, said before any draw (one line; the sampling
    mode's :meth:`~rayrcm.certify.sampling.base.SamplingMode.reach_warnings`): every image abstains
    when even n successes in n draws do not bound p_A above 1/2 (fixed and input-specific sampling;
    a sequential job's radii beyond its cap are refused by :func:`validate_certify`)."""
    if mode != "certify":
        return []
    return sampling_mode(s.sampling).reach_warnings(s)


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
                  image_size: int = 0, crop_pct: float | None = None, denoiser_sha256: str = "") -> dict[str, Any]:
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
    out.update(sampling_mode(s.sampling).protocol(cfg))  # the mode's own keys (sequential: n0=0, its radii, ...)
    if crop_pct is not None:
        out["crop_pct"] = float(crop_pct)
    return out


def protocol_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key old != new"`` for each key of ``new`` that ``old`` holds otherwise, and for each
    sampling mode's own key (``max_decline``, ``radii``, ...: ``protocol_keys`` of the registered
    modes) only ``old`` holds; a key of :data:`ADDED_KEYS` that ``old`` lacks (written before it was
    recorded) compares as its old value."""
    def before(k: str) -> object:
        if k in old or k not in ADDED_KEYS:
            return old.get(k)
        return new[k] if ADDED_KEYS[k] is None else ADDED_KEYS[k]

    diff = [f"{k} {before(k)!r} != {v!r}" for k, v in new.items() if k not in NOT_COMPARED and before(k) != v]
    own = [k for name in SAMPLING_MODES for k in sampling_mode(name).protocol_keys]
    return diff + [f"{k} {old[k]!r} != None" for k in own if k in old and k not in new]
