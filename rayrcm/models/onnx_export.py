"""A rebuilt rayrcm network as an ONNX graph, checked against PyTorch with onnxruntime.

The graph takes what the PyTorch model takes: ``images``, float32 ``(batch, 3, H, W)`` in [0, 1]
pixel units, any batch size. The normalisation (and ``model.input_resize``) is part of
:class:`~rayrcm.models.classifier.Classifier`, so it is inside the graph: a deployment feeds raw
pixels scaled to [0, 1], as certification does. The output is ``logits`` ``(batch, K)`` for a
network that predicts classes, ``features`` for an encoder.

The file's metadata carries the model's meta (``rayrcm.meta``: dataset, classes, image size, the
training config) and its export kind, so the graph can be traced back to its run.

Export goes through ``torch.onnx.export(dynamo=True)`` (``onnxscript``); the check through
``onnxruntime``: ``pip install 'rayrcm[onnx]'``. The export is written next to its destination
and moved there only when onnxruntime's outputs match PyTorch's on the check images, so a file at
the destination is always one that was checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from rayrcm.errors import ConfigError, RunFailed

OPSET = 18
INSTALL = "pip install 'rayrcm[onnx]' (onnx, onnxscript, onnxruntime)"


@dataclass(frozen=True)
class OnnxCheck:
    """How onnxruntime's outputs compare with PyTorch's on the same images."""

    images: int
    max_abs_diff: float  # over every output value
    scale: float  # max |PyTorch output|: the size the difference is measured against
    argmax_agree: float  # fraction of images whose top class (or top feature) is the same

    def passed(self, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
        return self.max_abs_diff <= atol + rtol * self.scale

    def line(self) -> str:
        return (f"onnxruntime vs PyTorch on {self.images} images: max |difference| {self.max_abs_diff:.2e} "
                f"(outputs up to {self.scale:.3g}), same argmax on {self.argmax_agree:.0%}")


def output_name(kind: str, predicts_classes: bool) -> str:
    """``logits`` for a network that predicts classes, ``features`` for an encoder; other kinds are refused."""
    if predicts_classes:
        return "logits"
    if kind == "encoder":
        return "features"
    raise ConfigError("model", kind, "ONNX export takes a network that predicts classes or an encoder; "
                                     f"a {kind} needs more inputs than images")


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RunFailed(f"ONNX export needs the {module} package: {INSTALL}") from None


def export_onnx(model: nn.Module, meta: dict[str, Any], path: str | Path, *, kind: str, predicts_classes: bool,
                opset: int = OPSET, verbose: bool = False) -> Path:
    """Write ``model`` (eval mode, on the CPU) as ONNX to ``path`` with a dynamic batch axis; returns ``path``."""
    _require("onnxscript")
    onnx = _require("onnx")
    out_name = output_name(kind, predicts_classes)
    size = int(meta["image_size"])
    model = model.cpu().eval()
    example = (torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with sink, torch.no_grad():
            program = torch.onnx.export(model, example, input_names=["images"], output_names=[out_name],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                        dynamo=True, verbose=verbose)
    except Exception as err:  # the exporter raises many types; the first line says which operator
        raise RunFailed(f"torch.onnx could not export the {kind}: {str(err).strip().splitlines()[0][:240]}") from None
    if program is None:  # never with dynamo=True
        raise RunFailed(f"torch.onnx could not export the {kind}: the exporter returned no program")
    proto = program.model_proto
    props = {"rayrcm.export": kind, "rayrcm.meta": json.dumps(meta, default=str, sort_keys=True),
             "rayrcm.input": "images: float32 (batch, 3, H, W) in [0, 1]; normalisation inside the graph"}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = Path(path)
    onnx.save_model(proto, str(path))
    return path


def run_onnx(path: str | Path, images: torch.Tensor) -> np.ndarray:
    """onnxruntime's output of the graph at ``path`` on ``images`` (CPU)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return cast(np.ndarray, session.run(None, {session.get_inputs()[0].name: images.detach().cpu().float().numpy()})[0])


@torch.no_grad()
def check_onnx(path: str | Path, model: nn.Module, images: torch.Tensor) -> OnnxCheck:
    """Compare onnxruntime's outputs on ``images`` with the PyTorch model's."""
    ref = model.cpu().eval()(images.cpu().float()).numpy()
    got = run_onnx(path, images)
    if got.shape != ref.shape:
        raise RunFailed(f"the ONNX graph's output has shape {got.shape}, PyTorch's {ref.shape}")
    return OnnxCheck(images=len(images), max_abs_diff=float(np.abs(got - ref).max()), scale=float(np.abs(ref).max()),
                     argmax_agree=float((got.argmax(1) == ref.argmax(1)).mean()))


def check_images(meta: dict[str, Any], count: int, seed: int = 0) -> torch.Tensor:
    """``count`` images of the model's size: all black, all white, then uniform noise in [0, 1]."""
    size = int(meta["image_size"])
    rand = torch.rand(max(count, 2), 3, size, size, generator=torch.Generator().manual_seed(seed))
    rand[0], rand[1] = 0.0, 1.0
    return rand


def export_checked(model: nn.Module, meta: dict[str, Any], dest: str | Path, images: torch.Tensor, *, kind: str,
                   predicts_classes: bool, opset: int = OPSET, verbose: bool = False) -> OnnxCheck:
    """Export to a temporary file beside ``dest``, check it on ``images``, and move it to ``dest`` only if it passes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        export_onnx(model, meta, tmp, kind=kind, predicts_classes=predicts_classes, opset=opset, verbose=verbose)
        result = check_onnx(tmp, model, images)
        if not result.passed():
            raise RunFailed(f"the ONNX graph differs from the PyTorch model ({result.line()}); nothing written")
        os.replace(tmp, dest)
        return result
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["OPSET", "OnnxCheck", "check_images", "check_onnx", "export_checked", "export_onnx", "output_name", "run_onnx"]
