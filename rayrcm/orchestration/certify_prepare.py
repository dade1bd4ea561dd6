"""Everything of a certification job that can fail on bad input, before any Ray work: the config,
the plugins, the model (it must rebuild and predict classes), the dataset and its image list, the
job's name and folder, and the protocol (a rerun of a name with another protocol is refused).

Denoised smoothing (``denoiser``, DDS): the denoiser file must be a rayrcm denoiser export, work on
the classifier's image size and reach the certification sigma within its diffusion schedule; its
SHA-256 joins the protocol and the default job name, and the counting actors wrap the classifier as
:class:`~rayrcm.models.denoised.DenoisedClassifier` at the certification sigma."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Dataset

from rayrcm.analysis.results import COHEN_CERTIFY
from rayrcm.certify.protocol import (
    CORRUPTED,
    CertifyConfig,
    protocol_dict,
    protocol_diff,
    reach_warnings,
    select_indices,
    validate_certify,
)
from rayrcm.certify.sampling import sampling_mode
from rayrcm.errors import ConfigError
from rayrcm.models.denoisers import file_sha256
from rayrcm.models.export import EXPORTS, export_kind, load_file
from rayrcm.orchestration import tracking
from rayrcm.orchestration.results_inputs import (
    data_config,
    first_line,
    load_classifier_file,
    rebuilt,
)
from rayrcm.plugins import load_plugins
from rayrcm.result_parts import PROTOCOL_FILE, RUN_FILE, read_parts
from rayrcm.sections import check_job_name, short_sigma

__all__ = ["PROTOCOL_FILE", "RUN_FILE", "Prepared", "data_config", "load_classifier_file", "prepare", "sigma_warnings"]


@dataclass
class Prepared:
    cfg: CertifyConfig
    uri: str | None
    name: str
    out: Path
    model_ref: str
    model_file: Path
    meta: dict[str, Any]
    indices: list[int]
    images: torch.Tensor  # uint8 (K, C, H, W): the images still to do
    labels: torch.Tensor
    protocol: dict[str, Any]
    finished: set[int]
    experiment: str
    parent_run_id: str | None
    warnings: list[str] = field(default_factory=list)
    denoiser_file: Path | None = None  # the local denoiser file (``cfg.denoiser`` names it once prepared)
    # the folder held another protocol but no results: its MLflow run (of the old params) is retired
    superseded: bool = False

    @property
    def todo(self) -> list[int]:
        """The dataset indices still to certify, in the order of ``images``."""
        return [i for i in self.indices if i not in self.finished]


def _default_name(cfg: CertifyConfig, dataset: str, sha: str, denoiser_sha: str = "") -> str:
    s = cfg.smoothing
    parts = [cfg.mode, dataset, cfg.split, sha[:8], f"sigma-{short_sigma(s.sigma)}", f"n{s.n}"]
    parts += sampling_mode(s.sampling).name_parts(s)  # a mode's own folder: another mode's job never resumes into it
    if s.indices:
        parts.append("idx" + hashlib.sha1(",".join(map(str, s.indices)).encode()).hexdigest()[:6])
    else:
        parts += [f"skip{s.skip}"] + ([f"max{s.max}"] if s.max > 0 else [])
    if denoiser_sha:  # its own folder: a denoised job never resumes into the plain one
        parts.append(f"den{denoiser_sha[:8]}")
    return "-".join(parts + [f"seed{s.seed}"])


def _check_protocol(out: Path, protocol: dict[str, Any], name: str) -> list[str]:
    """Refuse a folder holding results of another protocol; a folder of another protocol with no
    results yet (a job interrupted before its first image) does not lock it: returns the
    differences, and the job starts afresh under the new protocol."""
    f = out / PROTOCOL_FILE
    if not f.is_file():
        return []
    old = json.loads(f.read_text())
    diff = protocol_diff(old, protocol)  # image_size / crop_pct absent from an older job's file: equal
    if diff and len(read_parts(out, COHEN_CERTIFY)):
        raise ConfigError("name", name, f"holds results of another protocol ({'; '.join(diff[:3])}); choose another --name")
    return diff


LABEL_SPACE = {"cifar10c": "cifar10", "cifar100c": "cifar100"}  # corrupted copies keep their set's classes


def _check_dataset(cfg: CertifyConfig, meta: dict[str, Any], name: str) -> list[str]:
    """A dataset other than the model's (beyond its corrupted copies) means other classes under the same
    indices: refused in one line unless ``same_classes``; another dataset's resize to the model's size is a warning."""
    from rayrcm.data.native import native_size

    trained = str(meta["config"].get("data", {}).get("name", ""))
    if trained and LABEL_SPACE.get(name, name) != LABEL_SPACE.get(trained, trained) and not cfg.same_classes:
        raise ConfigError("dataset", name, f"model {cfg.model} was trained on {trained}, whose classes are not {name}'s: "
                          f"certify on {trained}, or --set same_classes=true if the labels mean the same classes")
    native, size = native_size(LABEL_SPACE.get(name, name)), int(meta["image_size"])
    if name != trained and native and native != size:  # the model's own data is read as in training
        return [f"WARNING: {name} images are {native} px and are resized to the model's {size} px"]
    return []


def sigma_warnings(cfg: CertifyConfig, meta: dict[str, Any]) -> list[str]:
    """A sigma other than the model's training sigma, or one that looks like a 0-255 value."""
    trained = meta["config"].get("method", {}).get("sigma")
    sigma = cfg.smoothing.sigma
    if sigma > 1:  # a [0, 255] value: every noisy image is mostly noise
        return [f"WARNING: sigma is in [0, 1] pixel units: sigma={sigma:g} is more than the whole pixel range "
                f"(did you mean {sigma:g}/255 = {sigma / 255:.3f}?)"]
    if trained is None or abs(float(trained) - sigma) <= 1e-12:
        return []
    return [f"WARNING: this model was trained with noise sigma={trained:g} and is being "
            f"certified at sigma={cfg.smoothing.sigma:g}: expect much lower certified accuracy"]


def _is_denoised(meta: dict[str, Any]) -> bool:
    """Whether the model's export kind puts a denoiser in front of a classifier (``ExportKind.denoised``)."""
    kind = export_kind(meta)
    return kind in EXPORTS and EXPORTS.get(kind).denoised


def _load_denoiser(cfg: CertifyConfig, uri: str | None, meta: dict[str, Any]) -> Path:
    """The local denoiser file of ``cfg.denoiser``, once it is known to rebuild into a denoiser for the
    classifier's image size that reaches the certification sigma."""
    ref, sigma = cfg.denoiser, cfg.smoothing.sigma
    if _is_denoised(meta):
        raise ConfigError("denoiser", ref, f"model {cfg.model} is already a denoised classifier (export kind "
                          f"{export_kind(meta)}); give --denoiser with a plain classifier only")
    local = tracking.resolve_model(ref, uri, key="denoiser")
    try:
        blob = load_file(local)
        kind = export_kind(blob["meta"])
    except ConfigError as err:  # one line naming the file, under the denoiser's key
        raise ConfigError("denoiser", ref, err.allowed) from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is a bad --denoiser
        raise ConfigError("denoiser", ref, f"is not a rayrcm model file ({first_line(err)})") from None
    if kind != "denoiser":
        raise ConfigError("denoiser", ref, f"is a{'n' if kind[0] in 'aeiou' else ''} {kind} model file, not a denoiser "
                          "(export kind 'denoiser': the model.pt of a ddpm run)")
    den, dmeta = rebuilt(blob, "denoiser", ref)
    size, want = int(dmeta.get("image_size", 0)), int(meta["image_size"])
    if size != want:
        raise ConfigError("denoiser", ref, f"works on {size} px images but model {cfg.model} on {want} px; "
                          "give a denoiser trained at the classifier's image size")
    timestep = getattr(den, "timestep", None)
    if timestep is not None:  # a diffusion denoiser: sigma must map to a step t* of its schedule
        try:
            timestep(sigma)
        except ConfigError as err:
            raise ConfigError("sigma", sigma, f"beyond the denoiser's diffusion schedule: {err.allowed}") from None
    return local


def _denoised_warnings(cfg: CertifyConfig, meta: dict[str, Any]) -> list[str]:
    """A ``denoised_classifier`` file's denoiser is told its training sigma; certification tells it the job's."""
    if cfg.denoiser or not _is_denoised(meta):
        return []
    trained = meta["config"].get("method", {}).get("sigma")
    if trained is None or abs(float(trained) - cfg.smoothing.sigma) <= 1e-12:
        return []
    return [f"WARNING: the denoiser of this denoised classifier is told sigma={cfg.smoothing.sigma:g} (the "
            f"certification sigma), not its training sigma={float(trained):g}"]


def prepare(cfg: CertifyConfig) -> Prepared:
    """Everything that can fail on bad input, before any Ray work."""
    from rayrcm.data import DATASETS
    from rayrcm.data.datasets import eval_images, eval_split

    load_plugins(cfg.plugins, key="plugins")  # first: a sampling mode, export kind or dataset of the user's is then valid
    cfg = validate_certify(cfg)
    uri = None
    if cfg.tracking.enabled:
        uri = tracking.normalize_uri(cfg.tracking.uri)
        tracking.check_reachable(uri)
    local, meta = load_classifier_file(cfg.model, uri)
    denoiser_file = _load_denoiser(cfg, uri, meta) if cfg.denoiser else None
    data = data_config(cfg.dataset, cfg.data_path, meta)
    data_warnings = _check_dataset(cfg, meta, data.name)  # before any data is read
    ds: Dataset
    if data.name in CORRUPTED:  # the released files of one corruption and severity
        from rayrcm.data.shift import read_cifar_c

        ds, num_classes, large = read_cifar_c(cfg.data_path, cfg.corruption, cfg.severity,
                                              num_classes=CORRUPTED[data.name]), CORRUPTED[data.name], False
    else:
        if data.name not in DATASETS:
            raise ConfigError("dataset", data.name, f"unknown dataset; choose one of: "
                              f"{', '.join([*DATASETS.names(), *CORRUPTED])}")
        DATASETS.get(data.name).check_path(data.path)
        ds, num_classes, large = eval_split(data, cfg.split)
    if num_classes != meta["num_classes"]:
        raise ConfigError("model", cfg.model, f"has {meta['num_classes']} classes but dataset {data.name} has {num_classes}")
    indices = select_indices(len(cast(Sized, ds)), cfg.smoothing)
    if not indices:
        raise ConfigError("max", cfg.smoothing.max, "selects no image")
    sha = file_sha256(local)
    dsha = file_sha256(denoiser_file) if denoiser_file else ""
    shown = f"{data.name}-{cfg.corruption}-{cfg.severity}" if data.name in CORRUPTED else data.name
    name = cfg.name or _default_name(cfg, shown, sha, dsha)
    check_job_name("name" if cfg.name else "dataset", name)  # a plugin's dataset name could hold a '/'
    out = Path(cfg.out_dir).expanduser().resolve() / name
    protocol = protocol_dict(cfg, dataset=data.name, model_sha256=sha, num_classes=num_classes, indices=indices,
                             image_size=data.image_size, crop_pct=data.crop_pct if large else None,
                             denoiser_sha256=dsha)
    protocol["indices_sha1"] = hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest()
    replaced = _check_protocol(out, protocol, name)
    if replaced:
        data_warnings = [*data_warnings, f"{name}: the folder held no results of its earlier protocol "
                                         f"({'; '.join(replaced[:3])}); starting afresh with this one"]
    done = read_parts(out, COHEN_CERTIFY)
    finished = set(int(i) for i in done["idx"]) if len(done) else set()
    images, labels = eval_images(ds, [i for i in indices if i not in finished], data.image_size, large=large,
                                 crop_pct=data.crop_pct)
    parent, experiment = tracking.model_lineage(cfg.model, uri) if uri else (None, None)
    experiment = cfg.tracking.experiment or experiment or "rayrcm-certify"
    if denoiser_file:  # the actors read the resolved local file (a registry reference is downloaded once)
        cfg = replace(cfg, denoiser=str(denoiser_file.resolve()))
    return Prepared(cfg, uri, name, out, cfg.model, local, meta, indices, images, labels, protocol, finished,
                    experiment, parent, data_warnings + sigma_warnings(cfg, meta) + _denoised_warnings(cfg, meta)
                    + reach_warnings(cfg.mode, cfg.smoothing),
                    denoiser_file, bool(replaced))
