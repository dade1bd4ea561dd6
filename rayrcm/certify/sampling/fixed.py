"""``sampling=fixed``: Cohen et al.'s protocol, ``n0`` selection and ``n`` estimation draws for every
image (``predict``: ``n`` draws), each role split into rows of ``chunk`` draws that any actor may
count in any order (:mod:`rayrcm.certify.smoothing`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rayrcm.certify.rows import ESTIMATION, PREDICTION, SELECTION, Row, plan_rows
from rayrcm.certify.sampling.base import Batch, Counter, SamplingMode
from rayrcm.certify.stats import certify_from_counts, predict_from_counts

if TYPE_CHECKING:
    import torch

    from rayrcm.certify.config import CertifyConfig


class FixedSampling(SamplingMode):
    name = "fixed"
    help = "default: n estimation samples per image, Cohen et al."

    def roles(self, cfg: CertifyConfig) -> dict[int, int]:
        s = cfg.smoothing
        return {SELECTION: s.n0, ESTIMATION: s.n} if cfg.mode == "certify" else {PREDICTION: s.n}

    def rows(self, cfg: CertifyConfig, todo: Sequence[int], labels: Any) -> list[dict[str, Any]]:
        roles = self.roles(cfg)
        return [dict(pos=pos, index=idx, role=r.role, chunk=r.chunk, num=r.num)
                for pos, idx in enumerate(todo) for r in plan_rows(idx, roles, cfg.smoothing.chunk)]

    def count_row(self, counter: Counter, x: torch.Tensor, row: Row) -> tuple[np.ndarray, int, np.ndarray | None]:
        """One row's ``(counts, draws made, selection counts or None)``."""
        return counter.sm.count_row(x, row, counter.settings.seed).numpy(), row.num, None

    def count(self, counter: Counter, batch: Batch) -> Batch:
        counts, seconds, pilots, nums = [], [], [], []
        for pos, index, role, chunk, num in zip(batch["pos"], batch["index"], batch["role"], batch["chunk"], batch["num"]):
            tic = time.perf_counter()
            x = counter.images[int(pos)].float().div_(255)
            c, used, pilot = self.count_row(counter, x, Row(int(index), int(role), int(chunk), int(num)))
            counts.append(c)
            nums.append(used)
            if pilot is not None:
                pilots.append(pilot)
            seconds.append(time.perf_counter() - tic)
        out = {
            "pos": np.asarray(batch["pos"]), "role": np.asarray(batch["role"]), "chunk": np.asarray(batch["chunk"]),
            "num": np.asarray(nums), "counts": np.stack(counts), "seconds": np.asarray(seconds),
            "device": np.asarray([counter.device_name] * len(counts)),
        }
        if pilots:  # a job's rows all carry selection counts or none
            out["selection"] = np.stack(pilots)
        return out

    def add(self, totals: dict[Any, Any], row: dict[str, Any]) -> None:
        totals[int(row["role"])] += np.asarray(row["counts"], dtype=np.int64)

    def record(self, cfg: CertifyConfig, totals: dict[Any, Any], label: int) -> dict[str, Any]:
        s = cfg.smoothing
        if cfg.mode == "certify":
            c = certify_from_counts(totals[SELECTION], totals[ESTIMATION], s.sigma, s.alpha)
            return dict(predict=c.prediction, radius=c.radius, top_class=c.top_class, n_a=c.n_a, n=c.n, p_a_lower=c.p_a_lower,
                        samples=int(totals[SELECTION].sum()) + c.n, counts_selection=totals[SELECTION].tolist(),
                        counts_estimation=totals[ESTIMATION].tolist())
        pr = predict_from_counts(totals[PREDICTION], s.alpha)
        return dict(predict=pr.prediction, radius=0.0, n_a=pr.n_a, n_b=pr.n_b, p_value=pr.p_value,
                    samples=int(totals[PREDICTION].sum()), counts=totals[PREDICTION].tolist())
