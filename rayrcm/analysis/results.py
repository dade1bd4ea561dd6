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

import pandas as pd

COHEN_CERTIFY = ["idx", "label", "predict", "radius", "correct", "time"]
COHEN_PREDICT = ["idx", "label", "predict", "correct", "time"]
ROWS_DIR = "rows"
TSV_NAME = "results.tsv"


def _time_str(seconds: float) -> str:
    return str(datetime.timedelta(seconds=float(seconds)))


def _parse_time(value: object) -> float:
    if isinstance(value, (int, float)):
        return float(value)
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
            vals.append(f"{math.floor(float(r.radius) * 1e6) / 1e6:.6f}")
        vals += [str(int(r.correct)), _time_str(r.time)]
        lines.append("\t".join(vals))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def read_rows_dir(folder: str | Path) -> pd.DataFrame:
    """Every Parquet part under ``folder`` (a certification folder or its ``rows/``)."""
    folder = Path(folder)
    parts = sorted((folder / ROWS_DIR if (folder / ROWS_DIR).is_dir() else folder).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=COHEN_CERTIFY)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def read_results(path: str | Path) -> pd.DataFrame:
    """Rows from a certification folder (Parquet parts), one Parquet file, or a Cohen-format TSV."""
    p = Path(path)
    if p.is_dir():
        df = read_rows_dir(p)
        if df.empty and (p / TSV_NAME).is_file():
            df = read_results(p / TSV_NAME)
    elif p.suffix == ".parquet":
        df = pd.read_parquet(p)
    elif p.is_file():
        df = pd.read_csv(p, sep="\t")
        missing = {"idx", "label", "predict", "correct"} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: not a smoothing results file (missing columns {sorted(missing)})")
        if "radius" not in df.columns:  # a predict file
            df["radius"] = 0.0
        df["time"] = df["time"].map(_parse_time) if "time" in df.columns else 0.0
    else:
        raise FileNotFoundError(f"{path}: no such results file or folder")
    return df.sort_values("idx").reset_index(drop=True)
