"""``python experiments/<recipe>.py all``: a recipe's whole table as one resumable job on Ray.

The plan (:func:`rayrcm.pipeline.plan`) names every stage's job after its fingerprint. Each stage
runs as a Ray task that waits for the tasks of its inputs (Ray's own scheduling: the fine-tunings of
three sigmas run side by side when the cluster has room for them, and wait for it when not), then
trains (:func:`~rayrcm.orchestration.trainer.fit`) or certifies
(:func:`~rayrcm.orchestration.certify_job.run`). A stage that finished is recorded
(``<storage>/pipelines/<recipe>/<stage>.json``: fingerprint, job, run, model reference) and reused by
the next ``all``; a stage killed midway is the same job again and resumes from its checkpoint (or
its rows). One MLflow parent run holds the table (Markdown, LaTeX, the certified-accuracy plot) and
links every stage's run; each stage's run carries its fingerprint (``rayrcm.fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, cast

from rayrcm.errors import ConfigError
from rayrcm.orchestration import lineage, tracking
from rayrcm.pipeline import Planned, Stage, plan

if TYPE_CHECKING:
    from rayrcm.certify.protocol import CertifyConfig
    from rayrcm.config import ExperimentConfig

StageConfig = Union["ExperimentConfig", "CertifyConfig"]  # a train stage's, a certify stage's

FINGERPRINT_TAG = "rayrcm.fingerprint"
PIPELINE_TAG = "rayrcm.pipeline_run_id"


@dataclass
class StageOutput:
    stage: str
    fingerprint: str
    job: str
    run_id: str | None
    ref: str  # the model a downstream stage takes (a run id, else the file), or the results folder
    out: str = ""  # a certification's results folder
    metrics: dict[str, float] = field(default_factory=dict)  # a training stage's final metrics
    reused: bool = False


@dataclass
class PipelineResult:
    name: str
    parent_run_id: str | None
    outputs: dict[str, StageOutput]
    table: Any  # rayrcm.analysis.paper.PaperTable, or None without a certification
    folder: Path


def _apply(stage: Stage, cfg: StageConfig, overrides: list[str], check_paths: bool = False) -> StageConfig:
    """A stage's config with its overrides, validated (``check_paths``: the data folders too), its paths
    and tracking URI made absolute (its task runs in another folder)."""
    if stage.kind == "train":
        from rayrcm.config import apply_overrides, validate
        from rayrcm.orchestration.trainer import storage_root

        cfg = validate(apply_overrides(cast("ExperimentConfig", cfg), overrides), check_paths=check_paths)
        data = cfg.data if not cfg.data.path or "://" in cfg.data.path else \
            replace(cfg.data, path=str(Path(cfg.data.path).expanduser().resolve()))
        track = replace(cfg.tracking, uri=tracking.normalize_uri(cfg.tracking.uri)) if cfg.tracking.enabled else cfg.tracking
        return replace(cfg, data=data, tracking=track, train=replace(cfg.train, storage_path=storage_root(cfg)))
    from rayrcm.certify.protocol import validate_certify
    from rayrcm.orchestration import certify_job

    cfg = validate_certify(certify_job.config_from_args(overrides, base=cast("CertifyConfig", cfg)))
    track = replace(cfg.tracking, uri=tracking.normalize_uri(cfg.tracking.uri)) if cfg.tracking.enabled else cfg.tracking
    return replace(cfg, out_dir=str(Path(cfg.out_dir).expanduser().resolve()), tracking=track,
                   data_path=str(Path(cfg.data_path).expanduser().resolve()) if cfg.data_path else "")


def _name(recipe: str):
    def name(stage: Stage, cfg: StageConfig, fp: str) -> StageConfig:
        if stage.kind == "train":
            exp = cast("ExperimentConfig", cfg)
            return replace(exp, train=replace(exp.train, name=f"{exp.train.name}-{fp[:8]}"))
        return replace(cast("CertifyConfig", cfg), name=f"{recipe}-{stage.name}-{fp[:8]}")
    return name


def _fill(p: Planned, refs: dict[str, str]) -> Any:
    """The stage's config with its inputs' model references in place of their placeholders."""
    sets = [f"{key}={refs[src]}" for key, src in p.stage.inputs.items()]
    if not sets:
        return p.config
    if p.stage.kind == "train":
        from rayrcm.config import apply_overrides

        return apply_overrides(p.config, sets)
    from rayrcm.orchestration import certify_job

    return certify_job.config_from_args(sets, base=p.config)


def _record_file(folder: Path, stage: str) -> Path:
    return folder / f"{stage}.json"


def reusable(folder: Path, p: Planned) -> StageOutput | None:
    """The record of a finished run of this very stage (same fingerprint) whose output is still there."""
    f = _record_file(folder, p.stage.name)
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != p.fingerprint:
        return None
    out = StageOutput(**{k: rec[k] for k in ("stage", "fingerprint", "job", "run_id", "ref", "out")},
                      metrics=rec.get("metrics", {}), reused=True)
    there = Path(out.out).is_dir() if p.stage.kind == "certify" else (out.run_id or Path(out.ref).is_file())
    return out if there else None


def run_stage(p: Planned, refs: dict[str, str], folder: str, parent: str | None) -> StageOutput:
    """Run one stage (in a Ray task) and record it."""
    cfg = _fill(p, refs)
    tags = {FINGERPRINT_TAG: p.fingerprint, **({PIPELINE_TAG: parent} if parent else {})}
    if p.stage.kind == "train":
        from rayrcm.orchestration.trainer import fit

        # nested under the table's run, but a probe stays the child of the run it probes (its own rule)
        res = fit(cfg, tags=tags, parent_run_id=None if cfg.method.child_of_source else parent)
        metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
        out = StageOutput(p.stage.name, p.fingerprint, cfg.job_name, res.run_id, res.run_id or str(res.model_file),
                          metrics=metrics)
    else:
        from rayrcm.orchestration import certify_job

        cert = certify_job.run(cfg, show_table=False)
        if cert.run_id and cfg.tracking.enabled:
            tracking.set_tags(tracking.normalize_uri(cfg.tracking.uri), cert.run_id, tags)
        out = StageOutput(p.stage.name, p.fingerprint, cfg.name, cert.run_id, str(cert.out), str(cert.out))
    f = _record_file(Path(folder), p.stage.name)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in vars(out).items() if k != "reused"}, indent=1))
    tmp.replace(f)  # whole or not at all
    return out


def _remote():
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def stage(p: Planned, folder: str, parent: str | None, *upstream: StageOutput) -> StageOutput:
        return run_stage(p, {o.stage: o.ref for o in upstream}, folder, parent)

    return stage


def _uri(planned: list[Planned]) -> str | None:
    for p in planned:
        if p.stage.kind == "train" and p.config.tracking.enabled:
            return p.config.tracking.uri
    return None


def _folder(planned: list[Planned], recipe: str) -> Path:
    from rayrcm.sections import default_storage

    train = [p for p in planned if p.stage.kind == "train"]
    root = train[0].config.train.storage_path if train else default_storage("train")
    if "://" in root:
        raise ConfigError("train.storage_path", root, "the table's records need a shared folder path (NFS), not a URI")
    return Path(root) / "pipelines" / recipe


def dry_run_lines(recipe: str, planned: list[Planned], folder: Path) -> list[str]:
    lines = [f"[rayrcm] {recipe} all: {len(planned)} stages (records in {folder})"]
    width = max(len(p.stage.name) for p in planned)
    for p in planned:
        found = reusable(folder, p)
        job = p.config.job_name if p.stage.kind == "train" else p.config.name
        what = f"reuse  {found.run_id or found.ref}" if found else "run"
        needs = f" <- {', '.join(p.stage.needs)}" if p.stage.needs else ""
        lines.append(f"  {p.stage.name:<{width}}  {p.stage.kind:<7}  {p.fingerprint[:8]}  {what:<40}  {job}{needs}")
    return lines


def run_all(recipe: str, stages: list[Stage], overrides: list[str], *, dry_run: bool = False,
            experiment: str = "", ray_init: dict[str, Any] | None = None) -> PipelineResult | None:
    """Plan (one-line errors before Ray), then run the stages that are not finished and make the table."""
    from functools import partial

    planned = plan(stages, overrides, partial(_apply, check_paths=not dry_run), _name(recipe))
    folder = _folder(planned, recipe)
    if dry_run:
        print("\n".join(dry_run_lines(recipe, planned, folder)), flush=True)
        return None
    import ray

    from rayrcm.orchestration.cluster import ensure_ray

    uri = _uri(planned)
    overall = hashlib.sha256("".join(p.fingerprint for p in planned).encode()).hexdigest()[:8]
    parent = None
    if uri:
        tracking.check_reachable(uri)
        exp = experiment or [p.config.tracking.experiment for p in planned if p.stage.kind == "train"][-1]
        parent = tracking.start_job_run(uri, exp, f"{recipe}-all-{overall}",
                                        {f"stage.{p.stage.name}": p.fingerprint for p in planned},
                                        tags={"rayrcm.stage": "pipeline"})
    ensure_ray(**(ray_init or {}))
    remote = _remote()
    outputs: dict[str, Any] = {}
    for p in planned:
        found = reusable(folder, p)
        if found:
            print(f"[rayrcm] {p.stage.name}: reused ({found.job}, fingerprint {p.fingerprint[:8]})", flush=True)
            outputs[p.stage.name] = found
            continue
        shipped = replace(p, stage=replace(p.stage, config=dict))  # the recipe's builders stay in the driver
        outputs[p.stage.name] = remote.options(name=f"{recipe}:{p.stage.name}").remote(
            shipped, str(folder), parent, *[outputs[n] for n in p.stage.needs])
    ok = False
    try:
        done = {name: (o if isinstance(o, StageOutput) else _get(ray, o, recipe, name)) for name, o in outputs.items()}
        table = _table(recipe, planned, done, folder, uri, parent)
        ok = True
    finally:
        if uri and parent and not ok:
            tracking.fail_if_running(uri, parent)
    return PipelineResult(recipe, parent, done, table, folder)


def _rows(planned: list[Planned], done: dict[str, StageOutput]) -> list[Any]:
    """The table's results: each certification with a ``row`` (its folder), each training stage with
    a ``row`` (its robustness metrics and ``columns``)."""
    import pandas as pd

    from rayrcm.analysis.compare import load_result, metric_cells
    from rayrcm.analysis.paper import Result
    from rayrcm.analysis.robustness import RESULT_COLUMNS

    out = []
    for p in planned:
        o, label = done[p.stage.name], p.stage.row
        if not label:
            continue
        if p.stage.kind == "certify":
            r = load_result(o.out, label=label)
        else:
            cells = metric_cells(o.metrics).get("test", pd.DataFrame(columns=RESULT_COLUMNS))
            r = Result(label, cells)
        r.name, r.keys = label, {f"row:{label}"}  # stages of one row (a pretraining's k-NN, its probe) are one model
        r.extra = {col: o.metrics[m] for col, m in p.stage.columns.items() if m in o.metrics}
        out.append(r)
    return out


def _get(ray: Any, ref: Any, recipe: str, stage: str) -> StageOutput:
    """A stage's output; its failure as the one line it would be on its own (a ``ConfigError`` or
    ``RunFailed`` raised in the stage's task), else one line naming the stage."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise stage_failure(err, recipe, stage) from None


def stage_failure(err: Exception, recipe: str, stage: str) -> Exception:
    """The error to show for a stage task's failure: its own ``ConfigError``/``RunFailed`` (Ray's
    wrapper of it prints a traceback), else a ``RunFailed`` line naming the stage and the cause."""
    from rayrcm.errors import RunFailed

    cause: Any = getattr(err, "cause", None)
    while getattr(cause, "cause", None) is not None and type(cause).__name__.startswith("RayTaskError"):
        cause = cause.cause
    if isinstance(cause, (ConfigError, RunFailed)):
        return cause
    first = (str(cause or err).strip().splitlines() or [type(cause or err).__name__])[-1][:300]
    return RunFailed(f"{recipe} all: stage {stage} failed: {first}; rerun the same command to resume (finished stages "
                     "are reused)")


def _table(recipe: str, planned: list[Planned], done: dict[str, StageOutput], folder: Path, uri: str | None,
           parent: str | None) -> Any:
    """The paper's table over the stages with a ``row``, written, printed and logged to the parent run
    (with the certified-accuracy plot when there are certifications); every stage run linked from it."""
    from rayrcm.analysis.paper import paper_table, to_latex, to_markdown

    results = _rows(planned, done)
    paper = None
    files: list[Path] = []
    if results:
        paper = paper_table(results)
        md, tex = to_markdown(paper), to_latex(paper)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.md").write_text(md + "\n")
        (folder / "table.tex").write_text(tex + "\n")
        files = [folder / "table.md", folder / "table.tex"]
        certs = [p for p in planned if p.stage.kind == "certify" and p.stage.row]
        if certs:
            files.append(_plot(certs, done, folder, recipe))
        print(f"\n{md}\n[rayrcm] {recipe} all: wrote {', '.join(str(f) for f in files)}", flush=True)
    if uri and parent:
        for p in planned:
            o = done[p.stage.name]
            if o.run_id:
                lineage.add_note(uri, parent, f"{p.stage.name}: {lineage.run_link(uri, o.run_id)}"
                                 + (" (reused)" if o.reused else ""))
        if files:
            tracking.log_artifacts(uri, parent, files)
        lineage.finish_run(uri, parent)
    return paper


def _plot(certs: list[Planned], done: dict[str, StageOutput], folder: Path, recipe: str) -> Path:
    from rayrcm.analysis import plot_curves, read_results
    from rayrcm.analysis.compare import certify_reach
    from rayrcm.result_parts import PROTOCOL_FILE

    rows = {p.stage.row or p.stage.name: read_results(done[p.stage.name].out) for p in certs}
    reach = {p.stage.row or p.stage.name: certify_reach(json.loads((Path(done[p.stage.name].out) / PROTOCOL_FILE).read_text()))
             for p in certs}
    return plot_curves(rows, folder / "certified_accuracy.png", title=f"{recipe}: certified accuracy", max_radii=reach)


__all__ = ["FINGERPRINT_TAG", "PIPELINE_TAG", "PipelineResult", "StageOutput", "dry_run_lines", "reusable", "run_all",
           "run_stage", "stage_failure"]
