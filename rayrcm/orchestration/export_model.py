"""``rayrcm export MODEL --format onnx``: a model reference to a checked ONNX file.

The model is resolved like every other command's (``models:/name@alias``, ``models:/name/<version>``,
a run id, ``runs:/<id>/model`` or a ``model.pt`` path), rebuilt from its file, exported by
:mod:`rayrcm.models.onnx_export` and written only once onnxruntime agrees with PyTorch on the check
images (black, white and uniform noise at the model's size).
"""

from __future__ import annotations

import re
from pathlib import Path

from rayrcm.errors import ConfigError

MODEL_FORMATS = ("onnx",)


def default_out(ref: str, fmt: str) -> Path:
    """``<name>-<alias or version>.onnx`` for a registry reference, ``<run id>.onnx`` for a run, else the
    model file's folder name."""
    if ref.startswith("models:/"):
        stem = re.sub(r"[@/]+", "-", ref[len("models:/"):]).strip("-")
    elif ref.startswith("runs:/"):
        stem = ref[len("runs:/"):].split("/", 1)[0]
    else:
        p = Path(ref).expanduser()
        stem = (p.parent.name if p.is_file() else p.name) or "model"
    return Path(f"{stem or 'model'}.{fmt}")


def export_model(ref: str, *, fmt: str = "onnx", out: str | Path | None = None, opset: int | None = None,
                 check: int = 64, tracking_uri: str | None = None, verbose: bool = False) -> Path:
    """Export the model ``ref`` names as ``fmt``; returns the file written (see the module docstring)."""
    if fmt not in MODEL_FORMATS:
        raise ConfigError("--format", fmt, f"choose one of: {', '.join(MODEL_FORMATS)}")
    if check < 2:
        raise ConfigError("--check", check, "check on at least 2 images (black and white come first)")
    from rayrcm.models import onnx_export as ox
    from rayrcm.models.export import EXPORTS, export_kind
    from rayrcm.orchestration.notebook import load_model

    model, meta = load_model(ref, tracking_uri)
    kind = export_kind(meta)
    predicts = EXPORTS.get(kind).predicts_classes
    ox.output_name(kind, predicts)  # refuse a kind that takes more than images before exporting anything
    dest = Path(out).expanduser() if out else default_out(ref, fmt)
    result = ox.export_checked(model, meta, dest, ox.check_images(meta, check), kind=kind, predicts_classes=predicts,
                               opset=opset or ox.OPSET, verbose=verbose)
    print(f"[rayrcm] {result.line()}", flush=True)
    size = int(meta["image_size"])
    print(f"[rayrcm] wrote {dest}: input 'images' float32 (batch, 3, {size}, {size}) in [0, 1], normalisation inside; "
          f"output '{ox.output_name(kind, predicts)}'", flush=True)
    return dest


__all__ = ["MODEL_FORMATS", "default_out", "export_model"]
