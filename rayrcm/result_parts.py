"""The rows of a results folder on disk (certification and evaluation alike): the one place that
writes and reads their Parquet parts, and names the folder's files.

A results job appends its finished rows (images, shards) to ``<folder>/rows/part-*.parquet``; each
part is written to a temporary file and renamed, so a part is whole or absent, and a rerun reads
the parts to skip what is done. Next to them: ``protocol.json`` (what decides the results, compared
on resume) and ``mlflow_run.json`` (the job's MLflow run, when tracked). Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrcm.errors import RunFailed

ROWS_DIR = "rows"  # the Parquet parts of a results folder
PROTOCOL_FILE = "protocol.json"  # the protocol of a results folder (compared on resume)
RUN_FILE = "mlflow_run.json"  # the MLflow run of a results folder (``analyze`` logs to it)


class NonFiniteResult(RuntimeError):
    """A results row with a NaN or infinite number: never written."""


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


def parts_in(rows_dir: Path) -> list[Path]:
    """The Parquet parts in ``rows_dir`` itself (a results folder's ``rows/``), in the order they were written."""
    return sorted(Path(rows_dir).glob("part-*.parquet"))


def part_files(folder: Path) -> list[Path]:
    """The Parquet parts of results folder ``folder``, in the order they were written."""
    return parts_in(Path(folder) / ROWS_DIR)


def read_parts(folder: Path, columns: list[str]) -> pd.DataFrame:
    """Every row written under ``folder/rows`` (an empty frame with ``columns`` when none)."""
    parts = part_files(folder)
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


class ResultsNotWritten(RunFailed):
    """A results part could not be written; the parts written before stand (each is whole)."""

    def __init__(self, rows_dir: Path, err: OSError | str) -> None:
        self.rows_dir, self.reason = rows_dir, err if isinstance(err, str) else (err.strerror or str(err))
        super().__init__(f"could not write results to {rows_dir} ({self.reason}); the images finished before are on "
                         "disk: free space (or fix the folder) and rerun the same command to resume")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.rows_dir, self.reason))
