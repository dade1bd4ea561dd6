"""Monte Carlo counting for randomized smoothing, on the device, with reproducible noise.

The unit of work is a *row*: ``num`` noisy copies of one image for one *role* (``SELECTION``:
the ``n0`` draws that choose ``c_A``; ``ESTIMATION``: the ``n`` fresh draws that count ``n_A``;
``PREDICTION``: the draws of PREDICT), split into *chunks* of at most ``chunk`` samples so one
image can be spread over many devices. The noise of a row comes from its own generator, seeded
by ``(seed, image index, role, chunk index)`` (numpy ``SeedSequence``), and is drawn in fixed
blocks of ``block`` samples, so the counts of a row do not depend on which worker computes it,
in which order, or with which batch size (any multiple of ``block``). Counts are identical for
identical inputs on the same device type; CPU and CUDA generators give different (equally valid)
noise.

Noise is added in [0, 1] pixel space, ``x + sigma * z`` with ``z ~ N(0, I)``, here in the
smoothing loop and never inside the model (whose first layer normalizes). Predictions are
counted with ``argmax`` + ``bincount`` on the device and copied to the host once per row.

Example::

    sm = Smoother(model, num_classes=10, sigma=0.25, batch=1000)
    cert = certify(sm, x, n0=100, n=100_000, alpha=0.001, seed=0, index=17)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from rayrcm.certify.rows import ESTIMATION, PREDICTION, SELECTION, Row, noise_seed, plan_rows
from rayrcm.certify.stats import Certificate, Prediction, certify_from_counts, predict_from_counts

__all__ = ["ESTIMATION", "PREDICTION", "SELECTION", "Row", "Smoother", "certify", "choose_batch", "noise_seed",
           "plan_rows", "predict"]  # the rows' names live in rayrcm.certify.rows (no torch there)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Smoother:
    """A classifier in eval mode on a device, counting its predictions under Gaussian noise.

    ``batch`` samples go through the model at once (rounded up to a multiple of ``block``);
    ``precision`` ``bf16``/``fp16`` runs the model under autocast (noise stays fp32);
    ``channels_last`` changes the memory format of the noisy batch (helps convolutions on GPUs).
    """

    def __init__(self, model: nn.Module, num_classes: int, sigma: float, *, batch: int = 1000, block: int = 100,
                 device: str | torch.device | None = None, precision: str = "fp32", channels_last: bool = False) -> None:
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_classes, self.sigma, self.block = num_classes, float(sigma), block
        self.batch = max(block, -(-batch // block) * block)
        self.dtype = _DTYPES[precision]
        self.channels_last = channels_last
        self._buf: torch.Tensor | None = None

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _noise_batches(self, shape: torch.Size, num: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """``sigma * z`` in batches; the stream is a sequence of ``block``-sized draws."""
        if self._buf is None or self._buf.shape[1:] != shape:
            self._buf = torch.empty((self.batch, *shape), device=self.device)
        done = 0
        while done < num:
            take = min(self.batch, num - done)
            blocks = -(-take // self.block)
            for b in range(blocks):
                self._buf[b * self.block:(b + 1) * self.block].normal_(0.0, self.sigma, generator=generator)
            yield self._buf[:take]
            done += take

    @torch.inference_mode()
    def count(self, x: torch.Tensor, num: int, noise_seed_value: int) -> torch.Tensor:
        """Per-class counts ``(num_classes,)`` (int64, on the host) of ``f(x + sigma z)`` over ``num`` draws.

        ``x``: one image ``(C, H, W)`` in [0, 1].
        """
        x = x.to(self.device, torch.float32)
        g = torch.Generator(device=self.device).manual_seed(noise_seed_value)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        for noise in self._noise_batches(x.shape, num, g):
            batch = noise.add_(x)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self.model(batch)
            counts += torch.bincount(logits.argmax(1), minlength=self.num_classes)
        return counts.cpu()

    def count_row(self, x: torch.Tensor, row: Row, seed: int) -> torch.Tensor:
        return self.count(x, row.num, noise_seed(seed, row.index, row.role, row.chunk))


def _role_counts(sm: Smoother, x: torch.Tensor, index: int, role: int, total: int, chunk: int, seed: int) -> np.ndarray:
    out = torch.zeros(sm.num_classes, dtype=torch.long)
    for row in plan_rows(index, {role: total}, chunk):
        out += sm.count_row(x, row, seed)
    return out.numpy()


def certify(sm: Smoother, x: torch.Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001, *,
            seed: int = 0, index: int = 0, chunk: int = 10_000) -> tuple[Certificate, np.ndarray, np.ndarray, float]:
    """CERTIFY one image: ``(certificate, selection counts, estimation counts, seconds)``.

    The draws are exactly those the Ray Data job makes for ``(seed, index)`` with the same
    ``chunk``, so this is the single-device reference for the cluster's results.
    """
    tic = time.perf_counter()
    sel = _role_counts(sm, x, index, SELECTION, n0, chunk, seed)
    est = _role_counts(sm, x, index, ESTIMATION, n, chunk, seed)
    return certify_from_counts(sel, est, sm.sigma, alpha), sel, est, time.perf_counter() - tic


def predict(sm: Smoother, x: torch.Tensor, n: int = 100_000, alpha: float = 0.001, *,
            seed: int = 0, index: int = 0, chunk: int = 10_000) -> tuple[Prediction, np.ndarray, float]:
    """PREDICT one image: ``(prediction, counts, seconds)``."""
    tic = time.perf_counter()
    counts = _role_counts(sm, x, index, PREDICTION, n, chunk, seed)
    return predict_from_counts(counts, alpha), counts, time.perf_counter() - tic


def choose_batch(sm: Smoother, shape: torch.Size, *, limit: int = 65_536, min_gain: float = 1.05) -> int:
    """The batch that fills the device: double from ``block`` while throughput improves by
    ``min_gain`` and memory suffices (capped at ``limit``). Counts do not depend on it."""
    x = torch.rand(shape)
    best, best_rate, b = sm.block, 0.0, sm.block
    while b <= limit:
        sm.batch, sm._buf = b, None
        try:
            sm.count(x, b, 0)  # warm-up at this size
            if sm.device.type == "cuda":
                torch.cuda.synchronize(sm.device)
            tic = time.perf_counter()
            sm.count(x, 2 * b, 1)
            if sm.device.type == "cuda":
                torch.cuda.synchronize(sm.device)
            rate = 2 * b / (time.perf_counter() - tic)
        except torch.OutOfMemoryError:
            break
        if rate < best_rate * min_gain:
            if rate > best_rate:
                best, best_rate = b, rate
            break
        best, best_rate, b = b, rate, 2 * b
    sm.batch, sm._buf = best, None
    if sm.device.type == "cuda":
        torch.cuda.empty_cache()
    return best
