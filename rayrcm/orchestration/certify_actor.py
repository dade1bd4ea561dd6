"""The Ray Data callable class that counts: one model per actor, per-class counts per row."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch

from rayrcm.certify.collect import CountSettings
from rayrcm.certify.iss import ISS_ROW, iss_counts
from rayrcm.certify.sequential import SEQ_ROW, run_sequences
from rayrcm.certify.smoothing import Row, Smoother, choose_batch
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
    """Loads the model (behind the job's denoiser, if any) and the job's images once; ``__call__`` maps rows
    ``{pos, index, role, chunk, num}`` to ``{pos, role, chunk, num, counts, seconds, device}``.

    An ISS row (input-specific sampling) is a whole image: the selection draws, then as many
    estimation draws as they plan; it returns the estimation ``counts``, the ``selection`` counts
    and in ``num`` the draws it made.

    Sequential rows (``SEQ_ROW``, one per image) are certified together, side by side in each forward
    pass, until each image's radii are decided; the batch returns ``decisions``, ``successes`` and in
    ``num`` the draws each image used."""

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
        self.seed, self.settings = settings.seed, settings
        self.sm = Smoother(model, meta["num_classes"], settings.sigma, batch=settings.batch or settings.block,
                           block=settings.block, device=device, precision=settings.precision,
                           channels_last=settings.channels_last)
        if not settings.batch:
            limit = min(settings.chunk, 65_536 if use_gpu else 1024)
            choose_batch(self.sm, self.images.shape[1:], limit=limit)

    def _sequential(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self.settings
        tic = time.perf_counter()
        pos = np.asarray(batch["pos"]).astype(np.int64)
        images = self.images[torch.as_tensor(pos)].float().div_(255)
        res = run_sequences(self.sm, images, [int(y) for y in batch["label"]],
                            [int(i) for i in batch["index"]], radii=s.radii, alpha=s.alpha, n_max=s.n_max, seed=self.seed,
                            chunk=s.chunk, tolerance=s.tolerance)
        used = np.asarray([r.samples for r in res], np.int64)
        # device time shared in proportion to the draws each image used
        seconds = (time.perf_counter() - tic) * used / max(int(used.sum()), 1)
        return {"pos": pos, "role": np.asarray(batch["role"]), "chunk": np.asarray(batch["chunk"]), "num": used,
                "decisions": np.stack([np.asarray(r.decisions, np.int8) for r in res]),
                "successes": np.asarray([r.successes for r in res], np.int64), "seconds": seconds,
                "device": np.asarray([self.device_name] * len(res))}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["role"]) and int(batch["role"][0]) == SEQ_ROW:  # a job's rows are all sequential or none
            return self._sequential(batch)
        counts, seconds, pilots, nums = [], [], [], []
        s = self.settings
        for pos, index, role, chunk, num in zip(batch["pos"], batch["index"], batch["role"], batch["chunk"], batch["num"]):
            tic = time.perf_counter()
            x = self.images[int(pos)].float().div_(255)
            if int(role) == ISS_ROW:
                assert s.plan is not None, "ISS rows come with the job's sample-size plan (CountSettings.plan)"
                sel, est = iss_counts(self.sm, x, s.plan, index=int(index), seed=self.seed, n0=s.n0, chunk=s.chunk)
                counts.append(est)
                pilots.append(sel)
                nums.append(int(sel.sum() + est.sum()))
            else:
                counts.append(self.sm.count_row(x, Row(int(index), int(role), int(chunk), int(num)), self.seed).numpy())
                nums.append(int(num))
            seconds.append(time.perf_counter() - tic)
        out = {
            "pos": np.asarray(batch["pos"]), "role": np.asarray(batch["role"]), "chunk": np.asarray(batch["chunk"]),
            "num": np.asarray(nums), "counts": np.stack(counts), "seconds": np.asarray(seconds),
            "device": np.asarray([self.device_name] * len(counts)),
        }
        if pilots:  # a job's rows are all ISS rows or none
            out["selection"] = np.stack(pilots)
        return out
