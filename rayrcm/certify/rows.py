"""The rows of Monte Carlo work, without the device: the roles of the draws, a row, how an image's
draws split into rows, and the generator seed of a row (:mod:`rayrcm.certify.smoothing` counts them
on the device; the sampling modes plan them, :mod:`rayrcm.certify.sampling`). Needs numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SELECTION, ESTIMATION, PREDICTION = 0, 1, 2


def noise_seed(seed: int, index: int, role: int, chunk: int) -> int:
    """A 63-bit generator seed for one row, from numpy's ``SeedSequence`` (well mixed, stable)."""
    state = np.random.SeedSequence([seed, index, role, chunk]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass(frozen=True)
class Row:
    """``num`` draws of role ``role`` for the image with dataset index ``index``."""

    index: int
    role: int
    chunk: int
    num: int


def plan_rows(index: int, roles: dict[int, int], chunk: int) -> list[Row]:
    """Split each role's sample count into chunks: ``{ESTIMATION: 100_000}``, chunk 30_000 ->
    four rows of 30k, 30k, 30k, 10k."""
    rows = []
    for role, total in roles.items():
        for c, start in enumerate(range(0, total, chunk)):
            rows.append(Row(index, role, c, min(chunk, total - start)))
    return rows
