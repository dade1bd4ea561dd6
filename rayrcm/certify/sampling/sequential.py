"""``sampling=sequential``: certified accuracy at a grid of radii, each image drawn until every radius
is decided by an anytime-valid confidence sequence (Voracek, NeurIPS 2024; the method and its
soundness: :mod:`rayrcm.certify.sequential`). One row per image (role
:data:`~rayrcm.certify.sequential.SEQ_ROW`, with its label: the class tested); an actor certifies a
batch of images side by side and returns the decisions, successes and draws of each."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rayrcm.certify.sampling.base import Batch, Counter, Flag, SamplingMode, require
from rayrcm.certify.sequential import SEQ_ROW, reach, run_sequences, sequential_record
from rayrcm.errors import ConfigError
from rayrcm.sections import short_sigma

if TYPE_CHECKING:
    from rayrcm.certify.config import CertifyConfig, SmoothingConfig


def sequential_radii(s: SmoothingConfig) -> tuple[float, ...]:
    """The radii a sequential job decides: ``s.radii``, or 0, 0.25, ... below what the cap can certify."""
    if s.radii:
        return tuple(float(r) for r in s.radii)
    top = reach(s.n, s.alpha, s.sigma)
    return tuple(r for r in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0) if r < top)


class SequentialSampling(SamplingMode):
    name = "sequential"
    title = "sequential"
    help = "certified accuracy at --radii, each image stopped once they are decided; Voracek 2024"
    modes = ("certify",)
    flags = (Flag("radii", "smoothing.radii", "sequential: the radii decided per image, increasing, comma separated "
                                              "(default 0, 0.25, ... below what the cap can certify)", refused_elsewhere=False),
             Flag("max_n", "smoothing.n", "sequential: the cap on draws per image (= --n; default 100000)"),
             Flag("tolerance", "smoothing.tolerance", "sequential: settle r as not certified once the radius is shown below "
                                                      "r + tolerance (default 0); images at a threshold stop before the cap",
                  refused_elsewhere=False))
    protocol_keys = ("radii", "interval", "tolerance")

    def check(self, cfg: CertifyConfig) -> None:
        s = cfg.smoothing
        require(s.n >= s.block and s.n % s.block == 0, "n", s.n,
                f"the cap on draws per image must be a positive multiple of block={s.block} (one look per block)")
        require(all(math.isfinite(r) and r >= 0 for r in s.radii), "radii", s.radii, "must be finite and >= 0")
        require(all(a < b for a, b in zip(s.radii, s.radii[1:])), "radii", s.radii, "must be increasing, each once")
        require(math.isfinite(s.tolerance) and s.tolerance >= 0, "tolerance", s.tolerance,
                "must be a radius >= 0 (0: refute r only when the radius is below r)")
        top = reach(s.n, s.alpha, s.sigma)
        require(not s.radii or s.radii[-1] < top, "radii", s.radii,
                f"beyond what n={s.n} draws can certify at sigma={s.sigma:g}, alpha={s.alpha:g}: every radius must be "
                f"< {top:.4f} (raise n, the cap)")
        require(cfg.compute.sequential_images >= 1, "compute.sequential_images", cfg.compute.sequential_images, "must be >= 1")

    def refuse(self, cfg: CertifyConfig) -> None:
        s = cfg.smoothing
        require(not s.radii, "radii", s.radii,
                f"radii are decided by --sampling sequential; sampling={s.sampling} certifies every radius up to its reach "
                "(choose the table's radii with rayrcm analyze --radii)")
        require(not s.tolerance, "tolerance", s.tolerance,
                f"a radius tolerance is for --sampling sequential, not sampling={s.sampling}")

    def check_flags(self, given: Mapping[str, Any]) -> None:
        if "n" in given and "max_n" in given:
            raise ConfigError("max_n", given["max_n"], f"--max-n and --n name the same cap (n={given['n']}): give one")

    def protocol(self, cfg: CertifyConfig) -> dict[str, Any]:
        s = cfg.smoothing  # no selection draws: the label is the class tested; n is the cap
        return {"n0": 0, "radii": list(sequential_radii(s)), "interval": "beta-mixture-cs", "tolerance": float(s.tolerance)}

    def name_parts(self, s: SmoothingConfig) -> list[str]:  # its own folder; the radii decide the stopping, so they name it too
        radii = sequential_radii(s)
        shown = ",".join(f"{r:g}" for r in radii)
        return ([f"seq{len(radii)}r-" + hashlib.sha1(shown.encode()).hexdigest()[:6]]
                + ([f"tol{short_sigma(s.tolerance)}"] if s.tolerance else []))

    def draws(self, s: SmoothingConfig) -> str:
        return (f"sequential: radii {', '.join(f'{r:g}' for r in sequential_radii(s))} decided per image, "
                f"at most n={s.n} draws" + (f", radius tolerance {s.tolerance:g}" if s.tolerance else ""))

    def grid(self, s: SmoothingConfig) -> tuple[float, ...]:
        return sequential_radii(s)

    def reach(self, s: SmoothingConfig) -> float:  # decided at its radii only: nothing is measured beyond the largest
        return max(sequential_radii(s))

    def reach_note(self, s: SmoothingConfig, reach: float) -> str:
        return (f"[rayrcm] sequential: each image was decided at radii {', '.join(f'{r:g}' for r in sequential_radii(s))} "
                f"(a radius undecided at n={s.n} draws counts as not certified); ACR is not defined for this protocol")

    def reach_warnings(self, s: SmoothingConfig) -> list[str]:
        return []  # radii beyond the cap's reach are refused by check()

    def settings(self, cfg: CertifyConfig) -> dict[str, Any]:
        return {"radii": sequential_radii(cfg.smoothing)}

    def images_per_call(self, cfg: CertifyConfig, rows: int) -> int:
        # an actor certifies a batch of images side by side, at most compute.sequential_images, and small enough
        # that every actor gets about four batches (no idle actor at the end)
        c = cfg.compute
        return max(1, min(c.sequential_images, -(-rows // (4 * c.workers))))

    def roles(self, cfg: CertifyConfig) -> dict[int, int]:
        return {}  # no per-class counts: the decisions, successes and draws of each image

    def rows(self, cfg: CertifyConfig, todo: Sequence[int], labels: Any) -> list[dict[str, Any]]:
        n = cfg.smoothing.n  # one row per image: its actor draws until the radii are decided
        return [dict(pos=pos, index=idx, role=SEQ_ROW, chunk=0, num=n, label=int(labels[pos])) for pos, idx in enumerate(todo)]

    def count(self, counter: Counter, batch: Batch) -> Batch:
        import torch

        s = counter.settings
        tic = time.perf_counter()
        pos = np.asarray(batch["pos"]).astype(np.int64)
        images = counter.images[torch.as_tensor(pos)].float().div_(255)
        res = run_sequences(counter.sm, images, [int(y) for y in batch["label"]], [int(i) for i in batch["index"]],
                            radii=s.radii, alpha=s.alpha, n_max=s.n_max, seed=s.seed, chunk=s.chunk, tolerance=s.tolerance)
        used = np.asarray([r.samples for r in res], np.int64)
        # device time shared in proportion to the draws each image used
        seconds = (time.perf_counter() - tic) * used / max(int(used.sum()), 1)
        return {"pos": pos, "role": np.asarray(batch["role"]), "chunk": np.asarray(batch["chunk"]), "num": used,
                "decisions": np.stack([np.asarray(r.decisions, np.int8) for r in res]),
                "successes": np.asarray([r.successes for r in res], np.int64), "seconds": seconds,
                "device": np.asarray([counter.device_name] * len(res))}

    def add(self, totals: dict[Any, Any], row: dict[str, Any]) -> None:
        totals.update(decisions=[int(d) for d in row["decisions"]], successes=int(row["successes"]), num=int(row["num"]))

    def record(self, cfg: CertifyConfig, totals: dict[Any, Any], label: int) -> dict[str, Any]:
        s = cfg.smoothing
        return sequential_record(label, totals["decisions"], totals["successes"], totals["num"],
                                 radii=sequential_radii(s), sigma=s.sigma, alpha=s.alpha)
