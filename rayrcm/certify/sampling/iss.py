"""``sampling=iss``: input-specific sample sizes (Chen et al., AAAI 2022; the method and its soundness:
:mod:`rayrcm.certify.iss`). One row per image (role :data:`~rayrcm.certify.iss.ISS_ROW`): its actor
counts the ``n0`` selection draws, plans the estimation draws from them alone with the job's
sample-size table (built once, on the driver) and counts that many, returning both count vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rayrcm.certify.config import DECLINES
from rayrcm.certify.iss import ISS_ROW, SampleSizePlan, iss_counts
from rayrcm.certify.rows import ESTIMATION, SELECTION, Row
from rayrcm.certify.sampling.base import Counter, Flag, require
from rayrcm.certify.sampling.fixed import FixedSampling
from rayrcm.sections import short_sigma

if TYPE_CHECKING:
    import torch

    from rayrcm.certify.config import CertifyConfig, SmoothingConfig


def sample_size_plan(cfg: CertifyConfig) -> SampleSizePlan:
    """The job's input-specific sample-size table."""
    s = cfg.smoothing
    return SampleSizePlan(n=s.n, sigma=s.sigma, alpha=s.alpha, max_decline=s.max_decline, decline=s.decline, step=s.block)


class InputSpecificSampling(FixedSampling):
    name = "iss"
    title = "input-specific"
    help = "input-specific sample sizes, Chen et al. 2022"
    modes = ("certify",)
    flags = (Flag("max_decline", "smoothing.max_decline", "iss: certified-radius decline allowed against the full n (default 0.05)"),
             Flag("decline", "smoothing.decline", "iss: absolute (default, radius units) or relative (a fraction of the radius)"))
    protocol_keys = ("max_decline", "decline")

    def check(self, cfg: CertifyConfig) -> None:
        s = cfg.smoothing
        require(s.decline in DECLINES, "decline", s.decline, f"choose one of: {', '.join(DECLINES)}")
        top = 1.0 if s.decline == "relative" else math.inf
        require(0 < s.max_decline < top, "max_decline", s.max_decline,
                "must be > 0" + (" and < 1 (a fraction of the radius)" if s.decline == "relative" else " (radius units)"))

    def protocol(self, cfg: CertifyConfig) -> dict[str, Any]:
        return {"max_decline": cfg.smoothing.max_decline, "decline": cfg.smoothing.decline}

    def name_parts(self, s: SmoothingConfig) -> list[str]:  # its own folder: the fixed job of the same model and n stays apart
        return [f"iss-{s.decline[:3]}{short_sigma(s.max_decline)}"]

    def note(self, s: SmoothingConfig) -> str:
        return (f", input-specific sample sizes up to n (radius decline <= {s.max_decline:g}"
                f"{' of the radius' if s.decline == 'relative' else ''})")

    def settings(self, cfg: CertifyConfig) -> dict[str, Any]:
        return {"plan": sample_size_plan(cfg)}

    def rows(self, cfg: CertifyConfig, todo: Sequence[int], labels: Any) -> list[dict[str, Any]]:
        s = cfg.smoothing  # one row per image: its actor plans the estimation draws
        return [dict(pos=pos, index=idx, role=ISS_ROW, chunk=0, num=s.n0 + s.n) for pos, idx in enumerate(todo)]

    def count_row(self, counter: Counter, x: torch.Tensor, row: Row) -> tuple[np.ndarray, int, np.ndarray | None]:
        s = counter.settings
        assert s.plan is not None, "ISS rows come with the job's sample-size plan (CountSettings.plan)"
        sel, est = iss_counts(counter.sm, x, s.plan, index=row.index, seed=s.seed, n0=s.n0, chunk=s.chunk)
        return est, int(sel.sum() + est.sum()), sel

    def add(self, totals: dict[Any, Any], row: dict[str, Any]) -> None:
        totals[SELECTION] += np.asarray(row["selection"], dtype=np.int64)
        totals[ESTIMATION] += np.asarray(row["counts"], dtype=np.int64)
