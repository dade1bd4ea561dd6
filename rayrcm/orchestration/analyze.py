"""``rayrcm analyze``: tables and curves over several certification results (folders, Parquet files
or Cohen-format files), written to a folder and logged to each certification's MLflow run; and
``rayrcm compare``: evaluations, certifications and fine-tuning runs (folders or MLflow runs) as a
paper's table, one row per model (:mod:`rayrcm.analysis.paper`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from rayrcm.analysis import read_results, result_labels, summary_table, to_markdown, write_analysis
from rayrcm.errors import ConfigError
from rayrcm.orchestration import tracking
from rayrcm.result_parts import PROTOCOL_FILE, RUN_FILE
from rayrcm.sections import default_tracking_uri

if TYPE_CHECKING:
    from rayrcm.analysis.paper import PaperTable, Result


def _read(paths: list[str]) -> dict[str, pd.DataFrame]:
    """Each result's rows under its label (see :func:`rayrcm.analysis.result_labels`)."""
    frames = []
    for path in paths:
        if not Path(path).exists():
            raise ConfigError("results", path, "no such file or folder")
        try:
            df = read_results(path)
        except ValueError as err:
            raise ConfigError("results", path, str(err).split(": ", 1)[-1] if str(err).startswith(f"{path}: ") else str(err)) from None
        if df.empty:
            raise ConfigError("results", path, "has no certification rows (no rows/part-*.parquet, results.tsv or data lines)")
        frames.append(df)
    return dict(zip(result_labels(paths), frames))


def protocol_reach(path: str) -> float | None:
    """The largest radius the certification in ``path`` could certify, from its ``protocol.json``
    (None for a Cohen-format file or a ``predict`` job: unknown or no radius)."""
    folder = Path(path)
    proto = folder / PROTOCOL_FILE if folder.is_dir() else folder.parent / PROTOCOL_FILE
    if not proto.is_file():
        return None
    try:
        protocol = json.loads(proto.read_text())
    except ValueError:
        return None
    from rayrcm.analysis.compare import certify_reach

    return certify_reach(protocol) if isinstance(protocol, dict) else None


def check_radii(radii: list[float]) -> list[float]:
    """Radii are finite numbers >= 0 (at least one); a one-line :class:`ConfigError` otherwise."""
    radii = list(radii)
    bad = [r for r in radii if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0]
    if bad or not radii:
        raise ConfigError("radii", ",".join(str(r) for r in radii), "give finite radii >= 0, e.g. 0,0.25,0.5")
    return [float(r) for r in radii]


def same_server(a: str, b: str) -> bool:
    """Whether two tracking URIs name the same store: http(s) by scheme, host, port and path (case of the
    scheme and host ignored, a trailing slash too); anything else (sqlite, file) as the same string."""
    from urllib.parse import urlsplit

    ua, ub = urlsplit(a.strip()), urlsplit(b.strip())
    if ua.scheme.lower() in ("http", "https") or ub.scheme.lower() in ("http", "https"):
        def key(u):
            port = u.port or (443 if u.scheme.lower() == "https" else 80)
            return u.scheme.lower(), (u.hostname or "").lower(), port, u.path.rstrip("/")
        try:
            return key(ua) == key(ub)
        except ValueError:  # a malformed port
            return False
    return a.strip() == b.strip()


def _log(paths: list[str], files: list[Path], uri: str) -> None:
    """Attach the analysis to the MLflow run of every certification folder whose run lives on ``uri``
    (the user's tracking URI). A folder records the server of the job that wrote it; a folder made
    elsewhere may name any server, and logging there would send the user's MLflow credentials (and
    the tables) to it, so a folder naming another store is left alone, with one line saying so."""
    for path in paths:
        info = Path(path) / RUN_FILE
        if not info.is_file():
            continue
        try:
            run = json.loads(info.read_text())
            theirs, run_id = str(run["tracking_uri"]), str(run["run_id"])
        except (ValueError, KeyError, TypeError):
            print(f"[rayrcm] {path}: {RUN_FILE} is not a run record; the analysis was not logged there", flush=True)
            continue
        if not same_server(theirs, uri):
            print(f"[rayrcm] {path}: its run is on {theirs}, not on your tracking URI {uri}; the analysis was not logged "
                  f"there (rerun with --tracking-uri {theirs} if that server is yours)", flush=True)
            continue
        try:
            tracking.log_artifacts(uri, run_id, files, "analysis")
        except Exception as err:  # noqa: BLE001 - the tables are written; a logging failure is one line, not a traceback
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            print(f"[rayrcm] {path}: the analysis could not be logged to run {run_id} on {uri}: {first}", file=sys.stderr,
                  flush=True)


def analyze(paths: list[str], *, radii: list[float] | None = None, out: str | Path | None = None,
            log: bool = True, tracking_uri: str | None = None, per_class: bool = False) -> tuple[pd.DataFrame, list[Path]]:
    """Tables and curves over several results (folders or Cohen-format files), written to ``out``
    (default: the first folder's ``analysis/``) and logged to each certification's MLflow run when
    that run is on ``tracking_uri`` (default: the user's, ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``);
    ``per_class``: print the per-class tables too (they are always written, ``per_class.md``)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ConfigError("results", "", "give at least one certification folder or results file")
    if radii is not None:
        radii = check_radii(radii)
    results = _read(paths)
    first = Path(paths[0])
    folder = Path(out) if out else (first if first.is_dir() else first.parent) / "analysis"
    max_radii = dict(zip(results, (protocol_reach(p) for p in paths)))
    table = summary_table(results, radii, max_radii)
    files = write_analysis(results, folder, radii=radii, max_radii=max_radii)
    print(to_markdown(table), flush=True)
    if per_class:  # the same table per true class, each run's worst class last
        from rayrcm.analysis import per_class_markdown
        from rayrcm.analysis.report import table_radii

        print(per_class_markdown(results, table_radii(table), max_radii), flush=True)
    known = {k: v for k, v in max_radii.items() if v is not None}
    if known:
        print("[rayrcm] largest radius each protocol reaches (fixed, iss: sigma * Phi^-1(alpha^(1/n)); sequential: "
              "its largest decided radius): "
              + ", ".join(f"{k} {v:.3f}" for k, v in known.items()) + "; '-': beyond a run's reach", flush=True)
    print(f"[rayrcm] wrote {', '.join(str(f) for f in files)}", flush=True)
    if log:
        from rayrcm.sections import default_tracking_uri

        _log(paths, files, tracking_uri or default_tracking_uri())
    return table, files


# ----------------------------------------------------------------------------- rayrcm compare


def _from_run(run_id: str, uri: str, radii: list[float] | None, tmp: Path) -> list[Result]:
    """An MLflow run's results: its ``results.parquet`` (an evaluation), its rows and protocol (a
    certification), or its robustness metrics (a fine-tuning run: one result per mode). A
    certification or evaluation run is known also by its parent (the training run of its model)."""
    from rayrcm.analysis.compare import load_result, metric_cells
    from rayrcm.analysis.paper import Result, model_name
    from rayrcm.analysis.robustness import RESULTS_FILE

    run, names = tracking.run_artifacts(uri, run_id)
    label = run.info.run_name or run_id[:8]
    if RESULTS_FILE in names:
        wanted = [RESULTS_FILE] + [f for f in (PROTOCOL_FILE, "per_class.csv") if f in names]
    else:
        wanted = ["rows", PROTOCOL_FILE] if {"rows", PROTOCOL_FILE} <= names else []
    if wanted:
        dst = tmp / run_id
        dst.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            tracking.download(uri, run_id, name, dst)
        result = load_result(dst, radii, label=label)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            result.keys.add(f"run:{parent}")
        result.name = result.name or model_name(run.data.tags.get("rayrcm.model_uri", ""))
        return [result]
    tables = metric_cells(run.data.metrics)
    if not tables:
        raise ConfigError("run", run_id, f"holds no {RESULTS_FILE}, no certification rows and no robustness metrics")
    one = len(tables) == 1  # a single mode: the run is the model (its certifications are its children)
    return [Result(label if one else f"{label}/{prefix}", t, {f"run:{run_id}" if one else f"run:{run_id}/{prefix}"},
                   label if one else f"{label}/{prefix}") for prefix, t in tables.items()]


def _results(refs: list[str], uri: str | None, radii: list[float] | None, tmp: Path) -> list[Result]:
    """Each folder's or run's results, in the order given."""
    from rayrcm.analysis.compare import load_result

    paths = [r for r in refs if Path(r).expanduser().exists()]
    labels = dict(zip(paths, result_labels(paths)))
    out: list[Result] = []
    for ref in refs:
        if ref in labels:
            try:
                out.append(load_result(Path(ref).expanduser(), radii, label=labels[ref]))
            except ValueError as err:
                raise ConfigError("results", ref, str(err).split(": ", 1)[-1]) from None
        elif tracking.is_run_id(ref):
            target = tracking.normalize_uri(uri or default_tracking_uri())
            tracking.check_reachable(target)
            out.extend(_from_run(ref, target, radii, tmp))
        else:
            raise ConfigError("results", ref, "no such result folder or file, and not an MLflow run id (32 hex digits)")
    return out


def compare(refs: list[str], *, latex: bool = False, out: str | Path | None = None, radii: list[float] | None = None,
            tracking_uri: str | None = None, per_class: bool = False) -> PaperTable:
    """Evaluations, certifications and fine-tuning runs as a paper's table, one row per model
    (:mod:`rayrcm.analysis.paper`): Markdown on the console (and LaTeX with ``latex``), and to ``out``
    (Markdown; LaTeX next to it as ``.tex``); ``per_class``: each column's worst class beside it."""
    import tempfile

    from rayrcm.analysis.paper import paper_table
    from rayrcm.analysis.paper import to_latex as paper_latex
    from rayrcm.analysis.paper import to_markdown as paper_markdown

    refs = [str(r) for r in refs]
    if not refs:
        raise ConfigError("results", "", "give at least one result folder or MLflow run id")
    if radii is not None:
        radii = check_radii(radii)
    with tempfile.TemporaryDirectory(prefix="rayrcm-compare-") as tmp:
        paper = paper_table(_results(refs, tracking_uri, radii, Path(tmp)), per_class=per_class)
    if paper.table.empty:
        raise ConfigError("results", ",".join(refs), "hold no cell to compare")
    md = paper_markdown(paper)
    print(md, flush=True)
    if latex:
        print("\n" + paper_latex(paper), flush=True)
    if out:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md + "\n")
        written = [path]
        if latex:
            written.append(path.with_suffix(".tex"))
            written[-1].write_text(paper_latex(paper) + "\n")
        print(f"[rayrcm] wrote {', '.join(str(f) for f in written)}", flush=True)
    return paper


# ----------------------------------------------------------------------------- rayrcm export-results

EXPORT_FORMATS = ("robustbench",)


def export_results(refs: list[str], *, fmt: str = "robustbench", out: str | Path = "robustbench", name: str = "",
                   architecture: str = "", dataset: str = "", tracking_uri: str | None = None) -> list[Path]:
    """Evaluation results (folders or MLflow run ids) as RobustBench model cards
    (:func:`rayrcm.analysis.leaderboard.robustbench_cards`), written as RobustBench lays them out:
    ``<out>/<dataset>/<Linf|corruptions>/<name>.json``. One-line errors for a format, a result or a
    dataset that does not fit."""
    import re
    import tempfile

    from rayrcm.analysis.leaderboard import robustbench_cards

    if fmt not in EXPORT_FORMATS:
        raise ConfigError("--format", fmt, f"choose one of: {', '.join(EXPORT_FORMATS)}")
    refs = [str(r) for r in refs]
    if not refs:
        raise ConfigError("results", "", "give at least one evaluation folder or MLflow run id")
    with tempfile.TemporaryDirectory(prefix="rayrcm-export-") as tmp:
        results = _results(refs, tracking_uri, None, Path(tmp))
    written: list[Path] = []
    for r in results:
        label = name or r.name or r.label
        try:
            cards = robustbench_cards(r.cells, r.protocol, name=label, architecture=architecture or "unknown",
                                      dataset=dataset)
        except ValueError as err:
            raise ConfigError("results", r.label, str(err)) from None
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"
        for threat, card in cards.items():
            path = Path(out).expanduser() / card["dataset"] / threat / f"{stem}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(card, indent=4) + "\n")
            written.append(path)
            shown = card.get("autoattack_acc") or card.get("corruptions_acc")
            print(f"[rayrcm] {path}: {threat}, clean {card['clean_acc']}, "
                  f"{'AutoAttack' if threat == 'Linf' else 'corruptions'} {shown}"
                  + (f", mCE {card['corruptions_mce']}" if "corruptions_mce" in card else ""), flush=True)
    print("[rayrcm] fill in link, authors and venue (and architecture, --architecture) before submitting to RobustBench",
          flush=True)
    return written
