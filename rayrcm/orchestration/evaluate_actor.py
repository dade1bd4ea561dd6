"""The evaluation job's per-shard work: one model per Ray Data actor, a suite's hits per shard row.

The pure half lives with the suites (:mod:`rayrcm.eval.suites.shards`: a row's owning suite reads
its images, picks the model to score and computes, per batch, which images the model gets right);
:class:`EvalActor` is the Ray Data callable class that loads the model and the clean images once
and maps shard rows to counts. Everything a shard's result depends on is in its row and the job's
:class:`ShardSettings` (the corruption key ``(seed, image index, corruption, severity)``; the
attacks' seeds from the image indices, as the fine-tuning chain's evaluation:
:mod:`rayrcm.eval.robust`), never in which actor ran it or in what order: results are the same on
any number of workers.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch

from rayrcm.eval.suites.base import ShardSettings
from rayrcm.eval.suites.shards import class_counts, row_hits
from rayrcm.plugins import load_plugins


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
            y, hits = row_hits(self.model, row, self.images, self.labels, self.settings, self.device)
            correct.append(int(hits.sum()))
            per_class.append(class_counts(y, hits))
            keys.append(str(row["key"]))
            images.append(len(y))
            seconds.append(time.perf_counter() - tic)
        return {"key": np.asarray(keys), "images": np.asarray(images, dtype=np.int64),
                "correct": np.asarray(correct, dtype=np.int64), "per_class": np.asarray(per_class),
                "seconds": np.asarray(seconds),
                "device": np.asarray([self.device_name] * len(keys))}


__all__ = ["EvalActor"]
