"""Checkpoint files. Everything loads with ``weights_only=True`` and ``strict=True``.

* ``state.pt``: the training state, ``{objective, optimizer, scaler, step, rng, meta}``; enough to
  resume bit-for-bit (the objective's state includes EMA teachers).
* ``checkpoint.json``: the step and the size of every other file, written last, so a copy cut short
  (a worker killed while its checkpoint was uploaded) is recognised as incomplete.
* ``model.pt``: the exported network, ``{model: state_dict, meta: {...}}``, where ``meta`` holds the
  resolved config, encoder, method, export kind, number of classes and the code version;
  :func:`rayrcm.models.export.build_from_file` rebuilds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

import rayrcm

STATE_FILE = "state.pt"
MANIFEST_FILE = "checkpoint.json"  # written last: the step and every file's size (a whole checkpoint has them all)
MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "best_model.pt"  # the model best on the validation metric, with best_model.json


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_meta(cfg_dict: dict[str, Any], export: str, num_classes: int) -> dict[str, Any]:
    """What ``model.pt`` records: the resolved config, the export kind (:mod:`rayrcm.models.export`)
    and, for readers that predate export kinds, the matching ``stage``."""
    from rayrcm.models.export import LEGACY_STAGES, kind_predicts_classes

    export = LEGACY_STAGES.get(export, export)  # "pretrain" -> "encoder"
    classes = kind_predicts_classes(export)
    return {
        "config": cfg_dict,
        "encoder": cfg_dict["model"]["encoder"],
        "method": cfg_dict["method"]["name"],
        "export": export,
        "stage": "classifier" if classes else "pretrain",
        "num_classes": num_classes,
        "image_size": cfg_dict["data"]["image_size"],
        "code_version": rayrcm.__version__,
    }


def save_state(directory: str | Path, objective: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, step: int, meta: dict[str, Any]) -> None:
    state = {
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "rng": torch.get_rng_state(),
        "meta": meta,
    }
    _atomic_save(state, Path(directory) / STATE_FILE)


def load_state(directory: str | Path) -> dict[str, Any]:
    return cast("dict[str, Any]", torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True))


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    _atomic_save({"model": model.state_dict(), "meta": meta}, Path(path))


def load_model_file(path: str | Path) -> dict[str, Any]:
    """The contents of a ``model.pt`` (``weights_only=True``; :func:`rayrcm.models.export.load_file`)."""
    from rayrcm.models.export import load_file

    return load_file(path)


def write_best(path: str | Path, model: nn.Module, meta: dict[str, Any], step: int, metric: str, value: float) -> None:
    """Keep ``model`` as the best so far (``path``) with ``path.json`` = {step, metric, value}."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, {**meta, "selected": {"step": step, "metric": metric, "value": value}})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, "metric": metric, "value": value}))
    os.replace(tmp, path.with_suffix(".json"))


def read_best(path: str | Path) -> dict[str, Any] | None:
    import json

    info = Path(path).with_suffix(".json")
    return json.loads(info.read_text()) if info.is_file() and Path(path).is_file() else None


def write_manifest(directory: str | Path, step: int) -> None:
    """Record ``step`` and the size of every file in ``directory`` (call it after the last file)."""
    import json

    d = Path(directory)
    files = {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file() and f.name != MANIFEST_FILE}
    tmp = d / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}))
    os.replace(tmp, d / MANIFEST_FILE)
