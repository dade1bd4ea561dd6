"""The evaluation job's per-shard work: one model per Ray Data actor, ``correct`` per shard row.

:func:`shard_correct` is the pure half (a model, the shard's uint8 images and labels, the shard's
image indices -> how many images the model gets right); :class:`EvalActor` is the Ray Data callable
class that loads the model and the clean images once and maps shard rows to counts. Everything a
shard's result depends on is in its row and the job's :class:`ShardSettings` (the corruption key
``(seed, image index, corruption, severity)``; the attacks' seeds from the image indices, as the
fine-tuning chain's evaluation: :mod:`rayrcm.eval.robust`), never
in which actor ran it or in what order: results are the same on any number of workers.
"""

from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rayrcm.plugins import load_plugins

NONE = "none"  # the corruption of a clean set, the attack of a plain forward pass
SOURCES = ("clean", "generated", "released", "cifar10.1", "folder", "imagenet-c")  # where a shard's images come from


@dataclass(frozen=True)
class ShardSettings:
    """What every shard of a job shares: the protocol's numbers and the actors' resources."""

    seed: int = 0
    batch: int = 256
    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: int = 20
    aa_iters: int = 100
    aa_targets: int = 9
    aa_queries: int = 5000
    norm: str = "linf"
    image_size: int = 32
    num_classes: int = 10
    c_path: str = ""  # the released CIFAR-C folder (read by the actors: a path every node sees)
    shift_path: str = ""  # the CIFAR-10.1 folder (likewise)
    shift_sets: tuple[tuple[str, str], ...] = ()  # (set, folder) of the class-folder sets (Sketch, R, Stylized)
    classes: tuple[str, ...] = ()  # the model's classes in output order (the folder sets are restricted to them)
    large: bool = False  # the evaluation view of large images (resize, centre crop: imagefolder)
    crop_pct: float = 0.875
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    plugins: tuple[str, ...] = ()


def shard_images(row: dict[str, Any], images: torch.Tensor, labels: torch.Tensor,
                 settings: ShardSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard's uint8 ``(B, 3, H, W)`` images and labels: clean, generated from the clean ones
    under key ``(seed, dataset index, corruption, severity)``, or read from the released files (CIFAR-C, the
    shifted set CIFAR-10.1; the class folders of ImageNet-Sketch / -R / Stylized-ImageNet and ImageNet-C at
    the model's evaluation view, labels the model's class indices: :func:`row_set`)."""
    start, stop = int(row["start"]), int(row["stop"])
    index = [int(i) for i in row["index"]]
    source = str(row["source"])
    if source == "clean":
        return images[start:stop], labels[start:stop]
    if source == "generated":
        from rayrcm.data.corruptions import corrupt_tensor

        return corrupt_tensor(images[start:stop], index, str(row["corruption"]), int(row["severity"]),
                              seed=settings.seed), labels[start:stop]
    if source == "released":
        from rayrcm.data.datasets import eval_images
        from rayrcm.data.shift import read_cifar_c

        ds = read_cifar_c(settings.c_path, str(row["corruption"]), int(row["severity"]),
                          num_classes=settings.num_classes)
        return eval_images(ds, index, settings.image_size)
    if source == "cifar10.1":
        from rayrcm.data.datasets import eval_images
        from rayrcm.data.shift import read_cifar10_1

        return eval_images(read_cifar10_1(settings.shift_path), index, settings.image_size)
    if source in ("folder", "imagenet-c"):
        from rayrcm.data.datasets import eval_images

        return eval_images(row_set(row, settings).dataset, index, settings.image_size, large=settings.large,
                           crop_pct=settings.crop_pct)
    raise ValueError(f"unknown image source {source!r} (one of {', '.join(SOURCES)})")


@functools.lru_cache(maxsize=64)
def _folder_set(name: str, path: str, classes: tuple[str, ...], corruption: str, severity: int) -> Any:
    from rayrcm.data.shift import read_imagenet_c, read_shift_folder

    if name == "imagenet-c":
        return read_imagenet_c(path, corruption, severity, classes=classes)
    return read_shift_folder(name, path, classes=classes)


def row_set(row: dict[str, Any], settings: ShardSettings) -> Any:
    """The :class:`rayrcm.data.shift.ShiftSet` of a ``folder`` or ``imagenet-c`` shard (read once per actor),
    restricted to the model's classes; None for the other sources."""
    source, name = str(row["source"]), str(row["set"])
    if source == "folder":
        return _folder_set(name, dict(settings.shift_sets)[name], settings.classes, NONE, 0)
    if source == "imagenet-c":
        return _folder_set("imagenet-c", settings.c_path, settings.classes, str(row["corruption"]),
                           int(row["severity"]))
    return None


class MaskedModel(nn.Module):
    """``model`` with its logits masked to the classes ``present`` in a set (ImageNet-R's protocol)."""

    def __init__(self, model: nn.Module, present: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.present = model, tuple(present)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rayrcm.data.shift import mask_logits

        return mask_logits(self.model(x), self.present)


def shard_model(model: nn.Module, row: dict[str, Any], settings: ShardSettings) -> nn.Module:
    """The model a shard is scored with: masked to the set's classes for a masked set (ImageNet-R)."""
    ss = row_set(row, settings) if str(row["source"]) in ("folder", "imagenet-c") else None
    return MaskedModel(model, ss.present) if ss is not None and ss.masked else model


def shard_correct(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, attack: str, settings: ShardSettings, *,
                  index: list[int] | None = None, key: str = "", device: torch.device | str = "cpu") -> int:
    """How many of the shard's images the model classifies right (:func:`shard_hits`, summed)."""
    return int(shard_hits(model, x_u8, y, attack, settings, index=index, key=key, device=device).sum())


def class_counts(y: torch.Tensor, hits: torch.Tensor) -> str:
    """A shard's per-class counts as JSON ``{"<class>": [images, correct], ...}`` (a Parquet string column)."""
    import json

    out: dict[str, list[int]] = {}
    for label, hit in zip(y.tolist(), hits.tolist()):
        cell = out.setdefault(str(int(label)), [0, 0])
        cell[0] += 1
        cell[1] += int(hit)
    return json.dumps(out, sort_keys=True)


def shard_hits(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, attack: str, settings: ShardSettings, *,
               index: list[int] | None = None, key: str = "", device: torch.device | str = "cpu") -> torch.Tensor:
    """Per image of the shard (``index``: their image indices), whether the model classifies it right
    (under ``attack``: ``none``, ``pgd<k>`` (L-inf PGD-k, random start), ``aa`` (the standard
    AutoAttack: APGD-CE, APGD-T, FAB-T, Square) or ``aa-apgd`` (APGD-CE then APGD-T; an upper bound
    on AutoAttack's number)), in batches of ``settings.batch``, seeded as the fine-tuning chain's
    evaluation (:func:`rayrcm.eval.robust.attack_correct`: per image for PGD, per batch's first
    image for AutoAttack). Without ``index`` the images are numbered ``0..len(y)-1``; ``key`` (the
    shard's key, which seeded the attacks before they were seeded by image) is accepted and unused."""
    from rayrcm.eval.robust import attack_correct

    del key
    index = list(range(len(y))) if index is None else [int(i) for i in index]
    s = settings
    model.eval()
    hits = []
    for lo in range(0, len(y), s.batch):
        x = x_u8[lo:lo + s.batch].to(device).float().div_(255)
        t = y[lo:lo + s.batch].to(device)
        hits.append(attack_correct(model, x, t, index[lo:lo + s.batch], attack, seed=s.seed, eps=s.eps,
                                   step_size=s.step_size, pgd_steps=s.pgd_steps, norm=s.norm, aa_iters=s.aa_iters,
                                   aa_targets=s.aa_targets, aa_queries=s.aa_queries).cpu())
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


class EvalActor:
    """Loads the model and the job's clean images once; ``__call__`` maps shard rows
    ``{key, source, corruption, severity, attack, start, stop, index}`` to
    ``{key, images, correct, per_class, seconds, device}``."""

    def __init__(self, model_ref: Any, images_ref: Any, labels_ref: Any, settings: ShardSettings) -> None:
        import ray

        from rayrcm.models.export import build_from_blob

        load_plugins(settings.plugins, key="plugins")  # an export kind of the user's, in this process too
        blob = torch.load(io.BytesIO(ray.get(model_ref)), map_location="cpu", weights_only=True)
        self.model, _ = build_from_blob(blob)
        self.images, self.labels = ray.get(images_ref), ray.get(labels_ref)
        use_gpu = settings.use_gpu and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.device_name = torch.cuda.get_device_name(self.device) if use_gpu else "cpu"
        self.model.to(self.device).eval()
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, images, correct, seconds, per_class = [], [], [], [], []
        for i in range(len(batch["key"])):
            row = {k: v[i] for k, v in batch.items()}
            tic = time.perf_counter()
            x, y = shard_images(row, self.images, self.labels, self.settings)
            model = shard_model(self.model, row, self.settings)
            hits = shard_hits(model, x, y, str(row["attack"]), self.settings, index=[int(i) for i in row["index"]],
                              device=self.device)
            correct.append(int(hits.sum()))
            per_class.append(class_counts(y, hits))
            keys.append(str(row["key"]))
            images.append(len(y))
            seconds.append(time.perf_counter() - tic)
        return {"key": np.asarray(keys), "images": np.asarray(images, dtype=np.int64),
                "correct": np.asarray(correct, dtype=np.int64), "per_class": np.asarray(per_class),
                "seconds": np.asarray(seconds),
                "device": np.asarray([self.device_name] * len(keys))}
