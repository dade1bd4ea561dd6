"""rayrcm from Python (a notebook): certify a model held in memory, load a registered model, read
any result folder into a DataFrame; :mod:`rayrcm.api` is these functions.

``certify`` makes exactly the draws ``rayrcm certify`` makes for the same image indices, seed and
chunk (each image's noise stream is named by its index), so its rows equal the Ray job's, and they
are the same whether they are computed here or spread over a Ray cluster (``ray=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from rayrcm.errors import ConfigError

COLUMNS = ["idx", "label", "predict", "radius", "correct", "samples", "time"]


def _as_images(images: Any, labels: Any) -> tuple[Any, Any]:
    """``(N, C, H, W)`` float images in [0, 1] and ``(N,)`` long labels; one-line errors otherwise."""
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ConfigError("images", tuple(x.shape), "must be (N, C, H, W) or one (C, H, W) image")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    x = x.float()
    if not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError("images", f"[{float(x.min()):.3g}, {float(x.max()):.3g}]",
                          "must be in [0, 1] (pixel units, as rayrcm's models take them; normalisation belongs inside "
                          "the model)")
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).reshape(-1).long()
    if len(y) != len(x):
        raise ConfigError("labels", len(y), f"must be one per image ({len(x)} images)")
    return x, y


def _rows(model: Any, images: Any, labels: Any, indices: list[int], settings: dict[str, Any]) -> list[dict[str, Any]]:
    from rayrcm.certify import Smoother
    from rayrcm.certify import certify as certify_one

    s = settings
    sm = Smoother(model, s["num_classes"], s["sigma"], batch=s["batch"], device=s["device"])
    out = []
    for x, y, i in zip(images, labels.tolist(), indices):
        cert, sel, est, seconds = certify_one(sm, x, s["n0"], s["n"], s["alpha"], seed=s["seed"], index=i, chunk=s["chunk"])
        out.append({"idx": i, "label": y, "predict": cert.prediction, "radius": cert.radius,
                    "correct": int(cert.prediction == y), "samples": int(sel.sum() + est.sum()), "time": seconds})
    return out


def certify(model: Any, images: Any, labels: Any, *, sigma: float, n: int = 100_000, n0: int = 100,
            alpha: float = 0.001, num_classes: int | None = None, indices: list[int] | None = None, seed: int = 0,
            chunk: int = 10_000, batch: int = 1000, device: str | None = None, ray: bool = False,
            workers: int = 2) -> pd.DataFrame:
    """Cohen et al.'s CERTIFY of each image (``(N, C, H, W)`` in [0, 1], a tensor or array; uint8 is
    divided by 255) under ``model`` (an ``nn.Module`` mapping such images to logits) at ``sigma``:
    one row per image (``idx``, ``label``, ``predict`` (-1: abstain), ``radius``, ``correct``,
    ``samples``, ``time``), the frame ``rayrcm.analysis.summary_table`` reads. ``indices`` name the
    images' noise streams (default 0, 1, ...: use the dataset indices to match a ``rayrcm certify`` job);
    ``ray=True`` spreads the images over ``workers`` Ray tasks (the cluster of ``RAY_ADDRESS``, else
    a local one) with the same rows."""
    import torch

    x, y = _as_images(images, labels)
    idx = list(range(len(x))) if indices is None else [int(i) for i in indices]
    if len(idx) != len(x):
        raise ConfigError("indices", len(idx), f"must be one per image ({len(x)} images)")
    if sigma <= 0 or n < 1 or n0 < 1 or not 0 < alpha < 1:
        raise ConfigError("sigma, n, n0, alpha", (sigma, n, n0, alpha), "need sigma > 0, n >= 1, n0 >= 1, 0 < alpha < 1")
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model.eval()(x[:1].to(next(model.parameters()).device)).shape[-1])
    settings = {"sigma": float(sigma), "n": int(n), "n0": int(n0), "alpha": float(alpha), "num_classes": num_classes,
                "seed": int(seed), "chunk": int(chunk), "batch": int(batch), "device": device}
    if not ray:
        return pd.DataFrame(_rows(model, x, y, idx, settings), columns=COLUMNS)
    import ray as ray_

    from rayrcm.orchestration.cluster import ensure_ray

    ensure_ray()
    task = ray_.remote(num_cpus=1)(_rows)
    shared = ray_.put(model)
    parts = [p for p in (list(range(len(x)))[i::max(workers, 1)] for i in range(max(workers, 1))) if p]
    refs = [task.remote(shared, x[p], y[p], [idx[i] for i in p], settings) for p in parts]
    rows: list[dict[str, Any]] = [{}] * len(x)
    for part, got in zip(parts, ray_.get(refs)):  # back in the order given
        for i, row in zip(part, got):
            rows[i] = row
    return pd.DataFrame(rows, columns=COLUMNS)


def load_model(ref: str, tracking_uri: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(model, meta)`` of any model reference: ``models:/name@alias``, ``models:/name/<version>``, a
    run id, ``runs:/<id>/model`` or a ``model.pt`` path (tracking URI: ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db``)."""
    from rayrcm.orchestration import tracking
    from rayrcm.sections import default_tracking_uri

    return tracking.load_model(ref, tracking.normalize_uri(tracking_uri or default_tracking_uri()))


def read_results(path: str | Path) -> pd.DataFrame:
    """Any result folder or file as a DataFrame: a certification's rows (one per image), an
    evaluation's cells (``results.parquet``), a Cohen-format ``.tsv``."""
    from rayrcm.analysis import read_results as read_rows
    from rayrcm.analysis.robustness import RESULTS_FILE

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError("path", str(path), "no such result folder or file")
    if p.is_dir() and (p / RESULTS_FILE).is_file():
        return pd.read_parquet(p / RESULTS_FILE)
    try:
        return read_rows(p)
    except ValueError as err:
        raise ConfigError("path", str(path), str(err).split(": ", 1)[-1]) from None


__all__ = ["COLUMNS", "certify", "load_model", "read_results"]
