"""The pure half of the certification job (no Ray, no MLflow): what each counting actor is told,
the driver's per-image sums of row counts, and the Parquet parts finished images are written to.

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

import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrcm.certify.iss import ISS_ROW, SampleSizePlan
from rayrcm.certify.protocol import CertifyConfig, sequential_radii
from rayrcm.certify.sequential import SEQ_ROW, sequential_record
from rayrcm.certify.smoothing import ESTIMATION, PREDICTION, SELECTION, plan_rows
from rayrcm.certify.stats import certify_from_counts, predict_from_counts
from rayrcm.errors import RunFailed


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
    n0: int = 0  # iss: the selection (pilot) draws of an ISS row
    plan: SampleSizePlan | None = None  # iss: the sample-size table (built once, on the driver)
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
                   n0=s.n0, plan=sample_size_plan(cfg), denoised=bool(cfg.denoiser),
                   radii=sequential_radii(s) if s.sampling == "sequential" else (), alpha=s.alpha, n_max=s.n,
                   tolerance=s.tolerance)


def sample_size_plan(cfg: CertifyConfig) -> SampleSizePlan | None:
    """The job's input-specific sample-size table, or None for the fixed protocol."""
    s = cfg.smoothing
    if s.sampling != "iss":
        return None
    return SampleSizePlan(n=s.n, sigma=s.sigma, alpha=s.alpha, max_decline=s.max_decline, decline=s.decline, step=s.block)


class Collector:
    """Sums row counts per image; :meth:`add` returns the records of the images it finished.

    ``todo`` are the dataset indices still to certify and ``labels`` their labels, in that order;
    :attr:`rows` are the rows of work ``{pos, index, role, chunk, num}`` (``pos`` into ``todo``).
    """

    def __init__(self, cfg: CertifyConfig, todo: list[int], labels: Any, num_classes: int) -> None:
        s = cfg.smoothing
        self.mode, self.sigma, self.alpha = cfg.mode, s.sigma, s.alpha
        self.radii = sequential_radii(s) if s.sampling == "sequential" else ()
        self.todo, self.labels = list(todo), labels
        roles = {SELECTION: s.n0, ESTIMATION: s.n} if self.mode == "certify" else {PREDICTION: s.n}
        if s.sampling == "sequential":  # one row per image: its actor draws until the radii are decided
            self.rows = [dict(pos=pos, index=idx, role=SEQ_ROW, chunk=0, num=s.n, label=int(labels[pos]))
                         for pos, idx in enumerate(self.todo)]
        elif s.sampling == "iss":  # one row per image: its actor plans the estimation draws
            self.rows = [dict(pos=pos, index=idx, role=ISS_ROW, chunk=0, num=s.n0 + s.n) for pos, idx in enumerate(self.todo)]
        else:
            self.rows = [dict(pos=pos, index=idx, role=r.role, chunk=r.chunk, num=r.num)
                         for pos, idx in enumerate(self.todo) for r in plan_rows(idx, roles, s.chunk)]
        self.expected = Counter(r["pos"] for r in self.rows)
        self.sums = {pos: {role: np.zeros(int(num_classes), np.int64) for role in roles} for pos in self.expected}
        self.got: dict[int, set[tuple[int, int]]] = {pos: set() for pos in self.expected}
        self.seconds = {pos: 0.0 for pos in self.expected}
        self.devices: dict[int, set[str]] = {pos: set() for pos in self.expected}
        self.samples = 0

    def partial(self) -> float:
        """The images begun and not finished, as a fraction of their rows (a progress bar moves within
        an image); 0 for one-row images (iss, sequential)."""
        return sum(len(g) / self.expected[p] for p, g in self.got.items() if 0 < len(g) < self.expected[p])

    def add(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        if "decisions" in batch:
            return self._add_sequential(batch)
        done = []
        pilots = batch.get("selection", [None] * len(batch["pos"]))  # ISS rows carry their selection counts
        for pos, role, chunk, num, counts, sec, dev, pilot in zip(batch["pos"], batch["role"], batch["chunk"], batch["num"],
                                                                   batch["counts"], batch["seconds"], batch["device"], pilots):
            pos, key = int(pos), (int(role), int(chunk))
            if key in self.got[pos]:
                continue  # a retried row delivered twice: identical counts, keep one
            self.got[pos].add(key)
            if int(role) == ISS_ROW:
                self.sums[pos][SELECTION] += np.asarray(pilot, dtype=np.int64)
                self.sums[pos][ESTIMATION] += np.asarray(counts, dtype=np.int64)
            else:
                self.sums[pos][int(role)] += np.asarray(counts, dtype=np.int64)
            self.seconds[pos] += float(sec)
            self.devices[pos].add(str(dev))
            self.samples += int(num)
            if len(self.got[pos]) == self.expected[pos]:
                done.append(self._record(pos))
        return done

    def _add_sequential(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        done = []
        for pos, dec, a, num, sec, dev in zip(batch["pos"], batch["decisions"], batch["successes"], batch["num"],
                                              batch["seconds"], batch["device"]):
            pos = int(pos)
            if self.got[pos]:
                continue  # a retried row delivered twice: identical decisions, keep one
            self.got[pos].add((SEQ_ROW, 0))
            self.samples += int(num)
            idx, label = self.todo[pos], int(self.labels[pos])
            rec: dict[str, Any] = {"idx": idx, "label": label, "time": float(sec), "device": str(dev)}
            rec.update(sequential_record(label, [int(d) for d in dec], int(a), int(num), radii=self.radii,
                                         sigma=self.sigma, alpha=self.alpha))
            rec["correct"] = int(rec["predict"] == label)
            done.append(rec)
        return done

    def _record(self, pos: int) -> dict[str, Any]:
        idx, label = self.todo[pos], int(self.labels[pos])
        rec: dict[str, Any] = {"idx": idx, "label": label, "time": self.seconds[pos], "device": ",".join(sorted(self.devices[pos]))}
        sums = self.sums[pos]
        if self.mode == "certify":
            c = certify_from_counts(sums[SELECTION], sums[ESTIMATION], self.sigma, self.alpha)
            rec.update(predict=c.prediction, radius=c.radius, top_class=c.top_class, n_a=c.n_a, n=c.n, p_a_lower=c.p_a_lower,
                       samples=int(sums[SELECTION].sum()) + c.n,
                       counts_selection=sums[SELECTION].tolist(), counts_estimation=sums[ESTIMATION].tolist())
        else:
            pr = predict_from_counts(sums[PREDICTION], self.alpha)
            rec.update(predict=pr.prediction, radius=0.0, n_a=pr.n_a, n_b=pr.n_b, p_value=pr.p_value,
                       samples=int(sums[PREDICTION].sum()), counts=sums[PREDICTION].tolist())
        rec["correct"] = int(rec["predict"] == label)
        return rec


class NonFiniteResult(RuntimeError):
    """A certification row with a NaN or infinite number: never written."""


def check_record(rec: dict[str, Any]) -> None:
    """Every number of a row is finite and the radius is >= 0; :class:`NonFiniteResult` otherwise."""
    for key, value in rec.items():
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            raise NonFiniteResult(f"image {rec.get('idx')}: {key} is {value}, not a finite number; the row was not written")
    if "radius" in rec and not rec["radius"] >= 0:
        raise NonFiniteResult(f"image {rec.get('idx')}: radius is {rec['radius']}, negative; the row was not written")


def write_part(rows_dir: Path, records: list[dict[str, Any]]) -> Path | None:
    """Append ``records`` as a new ``part-*.parquet`` (written to a temporary file and renamed, so a
    part is whole or absent); nothing for no records."""
    if not records:
        return None
    for rec in records:
        check_record(rec)
    name = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = rows_dir / ("." + name + ".tmp")
    try:
        rows_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame.from_records(records).to_parquet(tmp, index=False)
        tmp.replace(rows_dir / name)
    except OSError as err:  # a full disk, a quota, a folder gone read-only: nothing half-written stays
        tmp.unlink(missing_ok=True)
        raise ResultsNotWritten(rows_dir, err) from None
    return rows_dir / name


class ResultsNotWritten(RunFailed):
    """A results part could not be written; the parts written before stand (each is whole)."""

    def __init__(self, rows_dir: Path, err: OSError | str) -> None:
        self.rows_dir, self.reason = rows_dir, err if isinstance(err, str) else (err.strerror or str(err))
        super().__init__(f"could not write results to {rows_dir} ({self.reason}); the images finished before are on "
                         "disk: free space (or fix the folder) and rerun the same command to resume")

    def __reduce__(self):
        return (type(self), (self.rows_dir, self.reason))
