"""What a results job (certify, predict, evaluate) reads before any Ray work: the classifier file of
``--model`` and the data config it is evaluated on. One-line errors naming the flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rayrcm.errors import ConfigError
from rayrcm.models.export import EXPORTS, build_from_blob, export_kind, load_file, predicts_classes
from rayrcm.orchestration import tracking
from rayrcm.sections import DataConfig


def first_line(err: Exception) -> str:
    """An exception's first line (at most 160 characters), for a one-line error."""
    return (str(err).splitlines() or [type(err).__name__])[0][:160]


def rebuilt(blob: dict[str, Any], key: str, ref: str) -> tuple[Any, dict[str, Any]]:
    """``(network, meta)`` of a loaded model file; a file its builder refuses is one line naming ``key``."""
    try:
        return build_from_blob(blob)
    except ConfigError as err:
        raise ConfigError(key, ref, f"{err.value}: {err.allowed}") from None
    except Exception as err:  # noqa: BLE001 - a builder that fails on this file's config
        raise ConfigError(key, ref, f"does not match its own config ({first_line(err)})") from None


def load_classifier_file(ref: str, uri: str | None) -> tuple[Path, dict[str, Any]]:
    """The local model file of ``ref`` (``--model``: a path, run id, ``runs:/`` or ``models:/``) and its
    meta, once it is known to rebuild into a classifier here; one-line errors naming ``model``."""
    local = tracking.resolve_model(ref, uri)
    try:
        blob = load_file(local)
        kind = export_kind(blob["meta"])
    except ConfigError:  # already one line naming the file
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad --model
        raise ConfigError("model", ref, f"is not a rayrcm model file ({first_line(err)})") from None
    if kind not in EXPORTS:  # build_from_blob says so too, naming train.plugins; here the flag is --plugin
        raise ConfigError("model", ref, f"has export kind {kind!r}, not registered here (registered: "
                          f"{', '.join(EXPORTS.names())}); load the plugin that registers it (--plugin)")
    if not predicts_classes(blob["meta"]):
        raise ConfigError("model", ref, f"is a{'n' if kind[0] in 'aeiou' else ''} {kind} "
                          "checkpoint; certification needs a classifier (a model that predicts classes)")
    _, meta = rebuilt(blob, "model", ref)
    return local, meta


def data_config(dataset: str, data_path: str, meta: dict[str, Any]) -> DataConfig:
    """The data a results job reads: ``dataset``/``data_path`` as given, else the model's training data
    (its path only for its own dataset), at the model's image size."""
    trained = meta["config"]["data"]
    name = dataset or trained["name"]
    path = data_path or (trained.get("path") if name == trained["name"] else None)
    return DataConfig(name=name, path=path or None, image_size=int(meta["image_size"]),
                      val_fraction=float(trained.get("val_fraction", 0.1)), crop_pct=float(trained.get("crop_pct", 0.875)))
