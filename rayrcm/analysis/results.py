"""Certification results on disk: Parquet rows (one per image) and the original smoothing code's
tab-separated files. Analysis reads these rows and never recomputes them.

Parquet columns (``rayrcm certify``): ``idx label predict radius correct time`` as in Cohen et
al.'s files, plus ``top_class n_a n p_a_lower seconds counts_selection counts_estimation`` (and
``p_value`` for ``predict``). ``time`` is device seconds summed over the image's rows.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrcm.result_parts import ROWS_DIR, part_files, parts_in, read_parts

COHEN_CERTIFY = ["idx", "label", "predict", "radius", "correct", "time"]
COHEN_PREDICT = ["idx", "label", "predict", "correct", "time"]
TSV_NAME = "results.tsv"


def _time_str(seconds: float) -> str:
    return str(datetime.timedelta(seconds=float(seconds)))


def _parse_time(value: object) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if ":" not in str(value):  # plain seconds
        return float(str(value))
    h, m, s = str(value).split(":")
    days = 0
    if " day" in h:
        d, h = h.split(", ")
        days = int(d.split()[0])
    return days * 86400 + int(h) * 3600 + int(m) * 60 + float(s)


def write_cohen_tsv(df: pd.DataFrame, path: str | Path, mode: str = "certify") -> Path:
    """``idx label predict radius correct time`` (tab separated, header line, time as H:MM:SS.ffffff).

    Radii are rounded *down* to 6 decimals so the text file never claims more than was certified.
    """
    path = Path(path)
    cols = COHEN_CERTIFY if mode == "certify" else COHEN_PREDICT
    lines = ["\t".join(cols)]
    for r in df.sort_values("idx").itertuples(index=False):
        vals = [str(int(r.idx)), str(int(r.label)), str(int(r.predict))]
        if mode == "certify":
            if not (math.isfinite(float(r.radius)) and float(r.radius) >= 0):
                raise ValueError(f"{path}: image {int(r.idx)} has radius {r.radius}, not a finite number >= 0; not written")
            vals.append(f"{math.floor(float(r.radius) * 1e6) / 1e6:.6f}")
        vals += [str(int(r.correct)), _time_str(r.time)]
        lines.append("\t".join(vals))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def read_rows_dir(folder: str | Path) -> pd.DataFrame:
    """Every Parquet part under ``folder`` (a certification folder or its ``rows/``; also ``rows/rows/``,
    where runs logged before 2026-12 keep them in MLflow)."""
    folder = Path(folder)
    if (folder / ROWS_DIR).is_dir():  # a results folder: its parts in rows/ (or in rows/rows/, from MLflow)
        nested = not part_files(folder) and (folder / ROWS_DIR / ROWS_DIR).is_dir()
        return read_parts(folder / ROWS_DIR if nested else folder, COHEN_CERTIFY)
    parts = parts_in(folder)  # ``folder`` is a rows/ folder itself
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=COHEN_CERTIFY)


INT_COLUMNS = ("idx", "label", "predict", "correct")
NONNEGATIVE = ("radius", "time", "seconds")  # besides being finite


def _bad(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def check_rows(df: pd.DataFrame, where: str, line_of: Any = None) -> pd.DataFrame:
    """Every number of every row finite, radii and times >= 0; a one-line ``ValueError`` naming
    ``where`` and the row (``line_of(i)``: its text line, for a TSV) otherwise."""
    for col in df.columns:
        values = df[col]
        if values.dtype == object or not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            continue
        arr = values.to_numpy(dtype=float)
        bad = ~np.isfinite(arr) | ((arr < 0) if col in NONNEGATIVE else False)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = line_of(i) if line_of else f"row {i + 1}" + (f" (image {df['idx'].iloc[i]})" if "idx" in df.columns else "")
            need = "a finite number >= 0" if col in NONNEGATIVE else "a finite number"
            raise _bad(where, f"{row}: {col} is {arr[i]}, not {need}")
    return df


def _read_tsv(p: Path, path: str | Path) -> pd.DataFrame:
    """A Cohen-format file, parsed line by line so that a bad line is named by its number."""
    try:
        lines = p.read_text().splitlines()
    except UnicodeDecodeError:
        raise _bad(str(path), "not a smoothing results file (not text)") from None
    if not lines or not lines[0].strip():
        raise _bad(str(path), "not a smoothing results file (no header line)")
    header = [h.strip() for h in lines[0].split("\t")]
    missing = {"idx", "label", "predict", "correct"} - set(header)
    if missing:
        raise _bad(str(path), f"not a smoothing results file (missing columns {sorted(missing)})")
    records, numbers = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != len(header):
            raise _bad(str(path), f"line {lineno}: expected {len(header)} tab-separated fields ({' '.join(header)}), got {len(cells)}")
        rec: dict[str, Any] = {}
        for col, cell in zip(header, cells):
            try:
                if col in INT_COLUMNS:
                    rec[col] = int(cell)
                elif col == "radius":
                    rec[col] = float(cell)
                elif col == "time":
                    rec[col] = _parse_time(cell)
                else:
                    rec[col] = cell
            except (ValueError, TypeError):
                raise _bad(str(path), f"line {lineno}: {col} is {cell!r}, not a number") from None
        records.append(rec)
        numbers.append(lineno)
    df = pd.DataFrame.from_records(records, columns=header)
    for col in INT_COLUMNS:
        df[col] = df[col].astype("int64")
    if "radius" not in df.columns:  # a predict file
        df["radius"] = 0.0
    df["radius"] = df["radius"].astype(float)
    df["time"] = df["time"].astype(float) if "time" in df.columns else 0.0
    return check_rows(df, str(path), lambda i: f"line {numbers[i]}")


def read_results(path: str | Path) -> pd.DataFrame:
    """Rows from a certification folder (Parquet parts), one Parquet file, or a Cohen-format TSV.

    Every number is checked (finite; radius and time >= 0): a bad row raises a one-line
    ``ValueError`` naming the file and the line (TSV) or row (Parquet)."""
    p = Path(path)
    if p.is_dir():
        parts = part_files(p) if (p / ROWS_DIR).is_dir() else parts_in(p)
        if parts:
            df = pd.concat([check_rows(pd.read_parquet(q), str(q)) for q in parts], ignore_index=True)
        elif (p / TSV_NAME).is_file():
            df = _read_tsv(p / TSV_NAME, p / TSV_NAME)
        else:
            df = pd.DataFrame(columns=COHEN_CERTIFY)
    elif p.suffix == ".parquet":
        df = check_rows(pd.read_parquet(p), str(path))
    elif p.is_file():
        df = _read_tsv(p, path)
    else:
        raise FileNotFoundError(f"{path}: no such results file or folder")
    return df.sort_values("idx").reset_index(drop=True)
