"""What the MLflow UI shows: a run's description (its note) links the runs it came from and those
that used its model, each way once; an experiment's saved view opens its runs list with the metrics
that matter as columns."""

from __future__ import annotations

import json
import re

from rayrcm.orchestration import tracking

SOURCE_RUN_TAG = "rayrcm.source_run_id"  # the run that logged the model a job started from
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI (Markdown)


def run_link(uri: str, run_id: str) -> str:
    """A Markdown link to a run's page in the MLflow UI, named by its run name."""
    run = tracking.client(uri).get_run(run_id)
    return f"[{run.info.run_name or run_id}](#/experiments/{run.info.experiment_id}/runs/{run_id})"


def add_note(uri: str, run_id: str, line: str) -> None:
    """Append ``line`` to a run's description (the MLflow UI's note) unless it holds it already."""
    c = tracking.client(uri)
    note = c.get_run(run_id).data.tags.get(NOTE_TAG, "")
    if line not in note:
        c.set_tag(run_id, NOTE_TAG, f"{note}\n\n{line}" if note else line)


def link_source(uri: str, run_id: str, ref: str, key: str = "model.init_from", back: bool = True) -> str | None:
    """Link a job's run to the run that logged the model it started from (``ref``, as the user gave
    it): tags ``rayrcm.source_run_id``/``rayrcm.source_model``, a note with a link each way
    (``back=False``: none on the source run, e.g. a sweep's trial, whose sweep links it once).
    Returns the source run id (None for a local file)."""
    source, _ = tracking.model_lineage(ref, uri)
    tracking.set_tags(uri, run_id, {"rayrcm.source_model": ref, **({SOURCE_RUN_TAG: source} if source else {})})
    if source:
        add_note(uri, run_id, f"Started from {run_link(uri, source)} ({key} = `{ref}`).")
        if back:
            add_note(uri, source, f"Used by {run_link(uri, run_id)} ({key} = `{ref}`).")
    return source


VIEW_KEY = "rayrcm"  # the experiment's saved runs view: #/experiments/<id>?viewStateShareKey=rayrcm
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"  # where the MLflow UI (3.x) reads a shared view's state
# the metrics a runs list should show first, in this order: accuracy of the classifier, certified
# accuracy by radius, ACR, abstention; robustness (SA, PGD, AutoAttack, corruptions); k-NN
HEADLINE = (r"test_acc_clean", r"test_acc_sigma_.+", r"val_acc_sigma_.+", r"certified_acc_\d.*", r"acr",
            r"abstain_rate", r"worst_class_certified_acc_.+", r"(\w+_)?sa", r"(\w+_)?pgd\d+", r"(\w+_)?aa",
            r"cs\d(_generated)?", r"knn_acc")


def _rank(metric: str) -> int | None:
    return next((i for i, pat in enumerate(HEADLINE) if re.fullmatch(pat, metric)), None)


def headline_columns(metrics: list[str]) -> list[str]:
    """``metrics``' headline ones, in :data:`HEADLINE`'s order, as the MLflow UI names columns."""
    keep = sorted((m for m in metrics if _rank(m) is not None), key=lambda m: (_rank(m), m))
    return [f"metrics.`{m}`" for m in keep]


def update_runs_view(uri: str, run_id: str) -> str:
    """Add a finished run's headline metrics to its experiment's saved view (the stage tag first,
    then the metrics of every run so far, in :data:`HEADLINE`'s order, newest first); returns the
    view's address in the UI, relative to its root."""
    c = tracking.client(uri)
    run = c.get_run(run_id)
    exp = c.get_experiment(run.info.experiment_id)
    try:
        state = json.loads(exp.tags.get(VIEW_TAG, "{}"))
    except ValueError:
        state = {}
    known = [col[len("metrics.`"):-1] for col in state.get("selectedColumns", []) if col.startswith("metrics.`")]
    columns = ["tags.`rayrcm.stage`", *headline_columns(sorted(set(known) | set(run.data.metrics)))]
    if columns != state.get("selectedColumns"):
        c.set_experiment_tag(exp.experiment_id, VIEW_TAG, json.dumps(
            {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}))
    return f"#/experiments/{exp.experiment_id}?viewStateShareKey={VIEW_KEY}"


def finish_run(uri: str, run_id: str) -> None:
    """End a job's run FINISHED and add its headline metrics to the experiment's saved view (a view
    that cannot be updated, e.g. without edit rights on the experiment, is one line, never a failure)."""
    import sys

    tracking.end_run(uri, run_id, ok=True)
    try:
        update_runs_view(uri, run_id)
    except Exception as err:  # noqa: BLE001 - the run is finished; the view is a convenience
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        print(f"[rayrcm] the experiment's runs view was not updated: {first}", file=sys.stderr, flush=True)
