"""The pure half of the certification job (no Ray, no MLflow): what each counting actor is told and
the driver's per-image sums of row counts. The rows of an image, what an actor does with them and
how an image's totals become its results row are its sampling mode's
(:mod:`rayrcm.certify.sampling`); the Parquet parts finished images are written to are
:mod:`rayrcm.result_parts`.

Ordering: every row counts *all* classes, and ``c_A`` is taken from the selection counts after
both roles are in. This is the same test as counting ``c_A`` only, because the estimation draws
are independent of the selection draws (different generator seeds), and it lets selection and
estimation rows run in parallel. A row delivered twice (a retried actor) is counted once.

Input-specific sampling (``smoothing.sampling=iss``): one row per image (role ``ISS_ROW``); its
actor counts the selection draws, plans the estimation sample size from them alone
(:mod:`rayrcm.certify.iss`) and counts that many estimation draws, returning both count vectors.

Sequential sampling (``smoothing.sampling=sequential``): one row per image (role ``SEQ_ROW``); an
actor draws for the images of a batch side by side until each one's radii are decided
(:mod:`rayrcm.certify.sequential`) and returns the decisions, successes and draws per image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rayrcm.certify.config import CertifyConfig
from rayrcm.certify.sampling import sampling_mode

__all__ = ["Collector", "CountSettings"]


@dataclass(frozen=True)
class CountSettings:
    """Everything a counting actor needs besides the model and the images."""

    sigma: float
    seed: int
    block: int
    chunk: int
    batch: int  # 0 = choose the largest useful batch on the device
    precision: str
    channels_last: bool
    use_gpu: bool
    cpus_per_worker: float
    plugins: tuple[str, ...] = ()  # imported by each actor before it rebuilds the model
    sampling: str = "fixed"  # the sampling mode whose rows the actor counts (rayrcm.certify.sampling)
    n0: int = 0  # iss: the selection (pilot) draws of an ISS row
    plan: Any = None  # the mode's table built once on the driver (iss: the SampleSizePlan)
    # denoised smoothing: the actors wrap the model as DenoisedClassifier(model, denoiser, sigma) with the
    # denoiser the job hands them (its file's bytes, put in Ray's object store once)
    denoised: bool = False
    # sequential: the radii decided, the confidence level and the cap on draws per image
    radii: tuple[float, ...] = ()
    alpha: float = 0.001
    n_max: int = 0
    tolerance: float = 0.0

    @classmethod
    def from_config(cls, cfg: CertifyConfig) -> CountSettings:
        s, c = cfg.smoothing, cfg.compute
        # .py plugins as absolute paths: an actor's working directory need not be the driver's
        plugins = tuple(str(Path(p).expanduser().resolve()) if p.endswith(".py") else p for p in cfg.plugins)
        return cls(sigma=s.sigma, seed=s.seed, block=s.block, chunk=s.chunk, batch=c.batch, precision=c.precision,
                   channels_last=c.channels_last, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker, plugins=plugins,
                   sampling=s.sampling, n0=s.n0, denoised=bool(cfg.denoiser), alpha=s.alpha, n_max=s.n,
                   tolerance=s.tolerance, **sampling_mode(s.sampling).settings(cfg))


class Collector:
    """Sums row counts per image; :meth:`add` returns the records of the images it finished.

    ``todo`` are the dataset indices still to certify and ``labels`` their labels, in that order;
    :attr:`rows` are the rows of work ``{pos, index, role, chunk, num}`` (``pos`` into ``todo``),
    planned by the job's sampling mode.
    """

    def __init__(self, cfg: CertifyConfig, todo: list[int], labels: Any, num_classes: int) -> None:
        self.cfg, self.sampling = cfg, sampling_mode(cfg.smoothing.sampling)
        self.todo, self.labels = list(todo), labels
        self.rows = self.sampling.rows(cfg, self.todo, labels)
        self.expected = Counter(r["pos"] for r in self.rows)
        roles = self.sampling.roles(cfg)
        self.sums: dict[int, dict[Any, Any]] = {pos: {role: np.zeros(int(num_classes), np.int64) for role in roles}
                                                for pos in self.expected}
        self.got: dict[int, set[tuple[int, int]]] = {pos: set() for pos in self.expected}
        self.seconds = {pos: 0.0 for pos in self.expected}
        self.devices: dict[int, set[str]] = {pos: set() for pos in self.expected}
        self.samples = 0

    def partial(self) -> float:
        """The images begun and not finished, as a fraction of their rows (a progress bar moves within
        an image); 0 for one-row images (iss, sequential)."""
        return sum(len(g) / self.expected[p] for p, g in self.got.items() if 0 < len(g) < self.expected[p])

    def add(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        done = []
        for i in range(len(batch["pos"])):
            row = {k: v[i] for k, v in batch.items()}
            pos, key = int(row["pos"]), (int(row["role"]), int(row["chunk"]))
            if key in self.got[pos]:
                continue  # a retried row delivered twice: identical counts, keep one
            self.got[pos].add(key)
            self.sampling.add(self.sums[pos], row)
            self.seconds[pos] += float(row["seconds"])
            self.devices[pos].add(str(row["device"]))
            self.samples += int(row["num"])
            if len(self.got[pos]) == self.expected[pos]:
                done.append(self._record(pos))
        return done

    def _record(self, pos: int) -> dict[str, Any]:
        idx, label = self.todo[pos], int(self.labels[pos])
        rec: dict[str, Any] = {"idx": idx, "label": label, "time": self.seconds[pos], "device": ",".join(sorted(self.devices[pos]))}
        rec.update(self.sampling.record(self.cfg, self.sums[pos], label))
        rec["correct"] = int(rec["predict"] == label)
        return rec
