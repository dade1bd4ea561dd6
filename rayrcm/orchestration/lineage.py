"""Lineage in the MLflow UI: a run's description (its note) links the runs it came from and those
that used its model, each way once."""

from __future__ import annotations

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
