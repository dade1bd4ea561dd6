"""Weighted k-NN accuracy on frozen features: a number for a pretraining run without a linear probe.

The classifier of Wu et al. (2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination") as solo-learn computes it (``solo/utils/knn.py``, ``WeightedKNNClassifier``,
cosine): features are L2-normalised; a test image's ``k`` most similar reference images (cosine
similarity ``s_i``) vote for their labels with weight ``exp(s_i / T)``; the prediction is the class
with the largest total weight. Defaults as solo-learn's: ``k = 20``, ``T = 0.07``. Differences:
solo-learn's online k-NN keeps the features of the epoch's augmented training crops as its
reference, here the reference is the un-augmented training split (the held-out validation split
is never in it), and the number of classes is the dataset's, not the count of labels seen in the
test batch.

The features are what a linear probe would see: for an encoder, ``forward_features`` of the input
normalised as the fine-tuning classifier will (``model.input_scale``, ``model.input_resize``); for
a classifier, its features before the head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from rayrcm.eval.base import Evaluation
from rayrcm.models.classifier import Classifier, Normalize

if TYPE_CHECKING:
    from rayrcm.sections import Experiment

Features = Callable[[torch.Tensor], torch.Tensor]


def feature_map(model: nn.Module, input_scale: float = 1.0, input_resize: int = 0) -> Features:
    """[0, 1] images -> features: a classifier's before its head, an encoder's after the normalisation."""
    if isinstance(model, Classifier):
        return lambda x: model.norm(model.encoder.forward_features(model.normalize(x), final_norm=model.final_norm))
    forward_features = getattr(model, "forward_features", None)
    if forward_features is not None:
        norm = Normalize(scale=input_scale, resize=input_resize)
        return lambda x: forward_features(norm.to(x.device)(x))
    return model


@torch.no_grad()
def embed(features: Features, dataset: Dataset[Any], indices: Sequence[int], *, device: torch.device | str = "cpu",
          batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, d) float32, labels (N,))`` of ``dataset[indices]`` (first view of each item)."""
    feats, labels = [], []
    # a generator of its own: the loader's seed draw leaves the training's random stream as it was
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, generator=torch.Generator())
    for views, y in loader:
        x = (views[0] if isinstance(views, (list, tuple)) else views).to(device)
        feats.append(features(x).float().flatten(1))
        labels.append(torch.as_tensor(y).to(device))
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def weighted_knn(reference: torch.Tensor, reference_labels: torch.Tensor, queries: torch.Tensor, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Top-1 predictions of the weighted k-NN classifier (see the module docstring) for ``queries``."""
    ref = F.normalize(reference.float(), dim=1)
    k = min(k, len(ref))
    out = []
    for q in F.normalize(queries.float(), dim=1).split(chunk):
        sim, idx = (q @ ref.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device, dtype=torch.float32)
        votes.scatter_add_(1, reference_labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=queries.device)


def spread(n: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(n)`` (all of them when ``count`` is 0 or >= n)."""
    if count <= 0 or count >= n:
        return list(range(n))
    return [int(i * n / count) for i in range(count)]


class KNNAccuracy(Evaluation):
    """``<prefix>_knn_acc``: weighted k-NN accuracy with the training split as reference.

    Every worker embeds the whole reference (``train.knn_bank`` images of it, evenly spread; 0 = all)
    and classifies its shard of the split, so the counts add up over workers like every evaluation's."""

    needs_reference = True
    on_features = True

    def __init__(self, k: int = 20, temperature: float = 0.07, bank: int = 0, *, input_scale: float = 1.0,
                 input_resize: int = 0, batch_size: int = 256) -> None:
        self.k, self.temperature, self.bank = k, temperature, bank
        self.input_scale, self.input_resize, self.batch_size = input_scale, input_resize, batch_size

    @classmethod
    def from_config(cls, cfg: Experiment) -> KNNAccuracy:
        t = cfg.train
        return cls(t.knn_k, t.knn_temperature, t.knn_bank, input_scale=cfg.model.input_scale,
                   input_resize=cfg.model.input_resize)

    def metric_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_knn_acc"]

    def counts(self, model: nn.Module, dataset: Dataset[Any], *, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, seed: int = 0) -> torch.Tensor:
        if self.reference is None:
            raise ValueError("the k-NN evaluation needs a reference split (build_evaluations(..., reference=...))")
        was_training = model.training
        model.eval()
        try:
            fn = feature_map(model, self.input_scale, self.input_resize)
            ref, ref_y = embed(fn, self.reference, spread(len(cast(Sized, self.reference)), self.bank), device=device,
                               batch_size=self.batch_size)
            q, y = embed(fn, dataset, range(rank, len(cast(Sized, dataset)), world), device=device, batch_size=self.batch_size)
        finally:
            model.train(was_training)
        classes = int(max(ref_y.max().item() if len(ref_y) else 0, y.max().item() if len(y) else 0)) + 1
        pred = weighted_knn(ref, ref_y, q, k=self.k, temperature=self.temperature, num_classes=classes)
        return torch.tensor([len(y), int((pred == y).sum())], dtype=torch.long)

    def metrics(self, counts: torch.Tensor, prefix: str) -> dict[str, float]:
        return {f"{prefix}_knn_acc": float(counts[1]) / max(int(counts[0]), 1)}

    def describe(self) -> str:
        return f"weighted {self.k}-NN accuracy on frozen features (T = {self.temperature:g})"
