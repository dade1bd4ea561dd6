"""The Ray Data callable class that counts: one model per actor, per-class counts per row."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from rayrcm.certify.collect import CountSettings
from rayrcm.certify.sampling import sampling_mode
from rayrcm.certify.smoothing import Smoother, choose_batch
from rayrcm.plugins import load_plugins


def _denoised(model: torch.nn.Module, settings: CountSettings, denoiser_ref: Any) -> torch.nn.Module:
    """The base classifier certified: ``model``, or ``DenoisedClassifier(model, denoiser, sigma)`` with
    the job's denoiser; either way a denoised classifier's denoiser is told the certification sigma
    (the noise itself stays in the Smoother: ``x + sigma z``)."""
    import ray

    from rayrcm.models.denoised import DenoisedClassifier
    from rayrcm.models.export import build_from_blob

    if settings.denoised:
        denoiser, _ = build_from_blob(torch.load(io.BytesIO(ray.get(denoiser_ref)), map_location="cpu", weights_only=True))
        return DenoisedClassifier(model, denoiser, settings.sigma)
    if isinstance(model, DenoisedClassifier):
        model.sigma = float(settings.sigma)
    return model


class CountActor:
    """Loads the model (behind the job's denoiser, if any) and the job's images once; ``__call__`` hands a
    batch of rows ``{pos, index, role, chunk, num, ...}`` to the job's sampling mode
    (:meth:`~rayrcm.certify.sampling.base.SamplingMode.count`), which returns ``{pos, role, chunk, num,
    seconds, device}`` and its results per row (fixed: ``counts``; iss: ``counts`` and ``selection``, in
    ``num`` the draws made; sequential: ``decisions``, ``successes``, in ``num`` the draws used)."""

    def __init__(self, model_ref: Any, images_ref: Any, settings: CountSettings, denoiser_ref: Any = None) -> None:
        import ray

        from rayrcm.models.export import build_from_blob

        load_plugins(settings.plugins, key="plugins")  # an export kind of the user's, in this process too
        blob = torch.load(io.BytesIO(ray.get(model_ref)), map_location="cpu", weights_only=True)
        model, meta = build_from_blob(blob)
        model = _denoised(model, settings, denoiser_ref)
        self.images = ray.get(images_ref)
        use_gpu = settings.use_gpu and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
        device = torch.device("cuda" if use_gpu else "cpu")
        self.device_name = torch.cuda.get_device_name(device) if use_gpu else "cpu"
        self.seed, self.settings, self.sampling = settings.seed, settings, sampling_mode(settings.sampling)
        self.sm = Smoother(model, meta["num_classes"], settings.sigma, batch=settings.batch or settings.block,
                           block=settings.block, device=device, precision=settings.precision,
                           channels_last=settings.channels_last)
        if not settings.batch:
            limit = min(settings.chunk, 65_536 if use_gpu else 1024)
            choose_batch(self.sm, self.images.shape[1:], limit=limit)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.sampling.count(self, batch)  # the rows of a job are all of its sampling mode
