"""Rebuild a saved model (``model.pt``) by its export kind: the pure half of "load a model".

Every method config declares the kind of network it exports (``MethodConfig.export``);
``model.pt`` holds ``{"model": state_dict, "meta": {..., "export": kind, "config": {...}}}``. This
module builds a fresh network of that kind from the meta and loads the weights with
``strict=True``. A new kind (say a denoiser in front of a classifier) is one registry line::

    EXPORTS.register("denoised_classifier")(ExportKind(build_denoised, predicts_classes=True, denoised=True))

where ``build(meta) -> nn.Module`` makes the untrained network. ``predicts_classes`` says whether
the network maps [0, 1] images ``(B, 3, H, W)`` to class logits ``(B, K)``: only such models are
validated, selected, attacked and certified; ``denoised`` that a denoiser sits in front of the
classifier (certification tells it the job's sigma, and refuses another ``--denoiser``). The
tracking layer only moves files; the training
driver, the certification job and actors and the MLflow pyfunc call :func:`build_from_blob`.

A classifier is rebuilt from its recorded ``model.*``, so one trained with ``model.input_resize``
resizes its input the same way (encoder built for the resized size) and one trained with
``model.lora_rank`` gets its LoRA layers back before the weights load.

Files written before export kinds existed carry ``meta["stage"]`` (``"classifier"`` or
``"pretrain"``) instead and load as ``classifier`` / ``encoder``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn

import rayrcm
from rayrcm.errors import ConfigError
from rayrcm.models.classifier import classifier_for, encoder_image_size
from rayrcm.models.denoised import denoised_classifier_from_meta
from rayrcm.models.denoisers import denoiser_from_meta
from rayrcm.models.encoders import build_encoder
from rayrcm.overrides import update_dataclass
from rayrcm.registry import Registry
from rayrcm.sections import ModelConfig

LEGACY_STAGES = {"classifier": "classifier", "pretrain": "encoder"}


@dataclass(frozen=True)
class ExportKind:
    build: Callable[[dict[str, Any]], nn.Module]  # meta -> a fresh network of this kind
    predicts_classes: bool = False  # maps [0, 1] images to class logits (evaluated and certified)
    denoised: bool = False  # a denoiser in front of a classifier: certification tells it the job's sigma


EXPORTS: Registry[ExportKind] = Registry("export kind")


def model_config(meta: dict[str, Any]) -> ModelConfig:
    """The ``model`` section a file was trained with (``init_from`` dropped: the weights are in the file)."""
    return update_dataclass(ModelConfig(), {**meta["config"]["model"], "init_from": None}, "model.")


def _encoder(meta: dict[str, Any]) -> nn.Module:
    return build_encoder(model_config(meta), int(meta["image_size"]))


def _classifier(meta: dict[str, Any]) -> nn.Module:
    cfg = model_config(meta)
    size = encoder_image_size(cfg, int(meta["image_size"]))  # model.input_resize: the encoder's size
    return classifier_for(cfg, build_encoder(cfg, size), int(meta["num_classes"]))


EXPORTS.register("encoder")(ExportKind(_encoder, predicts_classes=False))
EXPORTS.register("classifier")(ExportKind(_classifier, predicts_classes=True))
EXPORTS.register("denoiser")(ExportKind(denoiser_from_meta, predicts_classes=False))
EXPORTS.register("denoised_classifier")(ExportKind(lambda meta: denoised_classifier_from_meta(meta, _classifier(meta)),
                                                   predicts_classes=True, denoised=True))  # the cadis objective


def export_kind(meta: dict[str, Any]) -> str:
    """The export kind of a file's meta (old files: from their ``stage``)."""
    kind = meta.get("export") or LEGACY_STAGES.get(str(meta.get("stage")))
    if not kind:
        raise ConfigError("model", meta.get("stage"), "the file names no export kind")
    return kind


def kind_predicts_classes(kind: str) -> bool:
    """Whether networks of export kind ``kind`` map images to class logits (False if unregistered)."""
    return kind in EXPORTS and EXPORTS.get(kind).predicts_classes


def predicts_classes(meta: dict[str, Any]) -> bool:
    return kind_predicts_classes(export_kind(meta))


def _check_blob(blob: Any) -> dict[str, Any]:
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or "model" not in blob or not isinstance(meta.get("config"), dict):
        version = meta.get("code_version", "unknown") if isinstance(meta, dict) else "unknown"
        raise ConfigError("model", f"rayrcm {version}", f"is not a model file rayrcm {rayrcm.__version__} can rebuild "
                          "(expected {model, meta: {config, export, ...}})")
    return meta


def build_from_blob(blob: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)`` from the contents of a ``model.pt``; the weights load with ``strict=True``."""
    meta = _check_blob(blob)
    kind = export_kind(meta)
    if kind not in EXPORTS:
        raise ConfigError("model", kind, f"export kind not registered here (registered: {', '.join(EXPORTS.names())}); "
                          "load the plugin that registers it (train.plugins, certify --plugin)")
    model = EXPORTS.get(kind).build(meta)
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as err:
        raise ConfigError("model", kind, f"weights do not fit the {kind} built from the file's config, written by rayrcm "
                          f"{meta.get('code_version', 'unknown')} ({str(err).splitlines()[0][:160]})") from None
    return model, meta


def load_file(path: str | Path) -> dict[str, Any]:
    """The contents of a ``model.pt`` (``weights_only=True``: a model file never runs code); a
    missing, damaged or code-carrying file is one line naming it."""
    from rayrcm.data.safe_pickle import load_weights_file

    return cast("dict[str, Any]", load_weights_file(path, "model"))


def build_from_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported network from a ``model.pt`` (config inside) with ``strict=True``."""
    return build_from_blob(load_file(path))
