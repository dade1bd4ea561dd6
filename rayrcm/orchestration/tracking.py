"""MLflow tracking, in one place.

* One experiment per recipe; one run per job, found again by the ``rayrcm.job`` tag, so restarts
  and reruns of a job log into the same run id.
* The driver creates the run and logs params once; rank 0 of the Ray Train workers logs metrics
  with the explicit run id; no other process writes.
* Status: a new run is RUNNING from the start. A rerun can leave an existing run as it was
  (``reopen=False``) and :func:`mark_running` it once it starts real work, so a rerun that fails
  before doing any work leaves a FINISHED run FINISHED; :func:`fail_if_running` ends a run that
  a failure left RUNNING as FAILED.
* Models are logged as an MLflow ``pyfunc`` whose artifact is rayrcm's own ``model.pt``
  (state dict + resolved config, loaded with ``weights_only=True``), chosen on purpose over
  pickled modules (unsafe to load) and ``torch.export`` (needs fixed input shapes). Registered
  versions are tagged with dataset, method, encoder and sigma, and can carry an alias.
* :func:`resolve_model` turns ``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model``,
  a bare run id or a local path into a local ``model.pt``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayrcm.errors import ConfigError

JOB_TAG = "rayrcm.job"
# MLflow's per-file download bars drown the progress lines of our jobs; set it to true to see them
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def normalize_uri(uri: str) -> str:
    """Make sqlite paths absolute (workers run in other directories) and create their folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:  # a plain folder: MLflow's file store, refused by MLflow 3 by default
        raise ConfigError("tracking.uri", uri, "use sqlite:///path/mlflow.db or http(s)://host:port of an mlflow server")
    return uri


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why the MLflow server at ``uri`` does not answer its health check, or None when it does
    (and for a local sqlite store)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return None if resp.status == 200 else f"it answered HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when an MLflow server URI does not answer."""
    reason = unreachable(uri, timeout)
    if reason is not None:
        raise ConfigError("tracking.uri", uri, f"MLflow server unreachable ({reason})")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def client(uri: str):
    """An ``MlflowClient`` for ``uri``: for the tracking layer's own modules (the metric buffer); the rest
    of rayrcm goes through this module's functions."""
    return _client(uri)


def is_run_id(ref: str) -> bool:
    """Whether ``ref`` looks like an MLflow run id (32 hex digits)."""
    return bool(_RUN_ID.match(ref))


def run_artifacts(uri: str, run_id: str) -> tuple[Any, set[str]]:
    """``(run, the names of its top-level artifacts)``; a missing run is a one-line :class:`ConfigError`."""
    c = _client(uri)
    try:
        run = c.get_run(run_id)
    except Exception as err:  # noqa: BLE001  # MLflow raises several types for a missing run
        raise ConfigError("run", run_id, f"not found in {uri} ({str(err).splitlines()[0][:160]})") from None
    return run, {a.path for a in c.list_artifacts(run_id)}


def download(uri: str, run_id: str, name: str, dst: str | Path) -> None:
    """Download the artifact ``name`` of a run into the folder ``dst``."""
    _client(uri).download_artifacts(run_id, name, str(dst))


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def start_job_run(uri: str, experiment: str, job: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                  parent_run_id: str | None = None, reopen: bool = True, run_name: str | None = None) -> str:
    """The run of ``job`` (created on first use, reused on restart); params are logged once.
    ``reopen=False``: an existing run keeps its status until :func:`mark_running`. ``run_name``:
    what the MLflow UI shows (default: the job's name; a sweep's trials show their values)."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment)
    found = find_job_run(uri, experiment, job)
    if found:
        if reopen:
            mark_running(uri, found)
        return found
    name = run_name or job
    all_tags = {JOB_TAG: job, "mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=name)
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def start_results_run(p: Any, protocol_file: str, stage: str, params: dict[str, Any],
                      tags: dict[str, str] | None = None) -> str | None:
    """Open a results job (certify, predict, evaluate): write its protocol next to its rows
    (``p.out / protocol_file``, the model reference added), then, with tracking on, find or create
    its run: params ``protocol.*`` and ``model`` then ``params``; tags ``rayrcm.stage`` and
    ``rayrcm.model_uri`` then ``tags``. An existing run keeps its status until there is work to do
    (:func:`mark_running`). ``p``: the job's ``Prepared`` (``out``, ``protocol``, ``model_ref``,
    ``uri``, ``experiment``, ``name``, ``parent_run_id``)."""
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / protocol_file).write_text(json.dumps({**p.protocol, "model": p.model_ref}, indent=1, sort_keys=True))
    if not p.uri:
        return None
    params = {**{f"protocol.{k}": v for k, v in p.protocol.items()}, "model": p.model_ref, **params}
    tags = {"rayrcm.stage": stage, "rayrcm.model_uri": p.model_ref, **(tags or {})}
    if getattr(p, "superseded", False):
        retire_job_run(p.uri, p.experiment, p.name)
    return start_job_run(p.uri, p.experiment, p.name, params, tags=tags, parent_run_id=p.parent_run_id, reopen=False)


def end_run(uri: str, run_id: str, ok: bool) -> None:
    terminate(uri, run_id, "FINISHED" if ok else "FAILED")


def mark_running(uri: str, run_id: str) -> None:
    """Mark a reused run RUNNING again (a rerun that starts real work)."""
    from mlflow.entities import RunStatus

    _client(uri).update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def fail_if_running(uri: str, run_id: str) -> None:
    """After a failure: end the run FAILED if it is RUNNING; a run the failed attempt never
    reopened (FINISHED, FAILED) stays as it was. Never raises: the failure is the news, and an
    unreachable server is one line after a short health check (not minutes of HTTP retries)."""
    reason = unreachable(uri)
    if reason is not None:
        print(f"[rayrcm] could not mark MLflow run {run_id} FAILED: {uri} is unreachable ({reason})", flush=True)
        return
    try:
        if run_status(uri, run_id) == "RUNNING":
            end_run(uri, run_id, ok=False)
    except Exception as err:  # noqa: BLE001 - an unreachable server must not hide the real error
        print(f"[rayrcm] could not mark MLflow run {run_id} FAILED ({str(err).splitlines()[0][:160]})", flush=True)


class MetricLogger:
    """Logs scalar metrics to one run by id, synchronously. The driver's logger (see
    :class:`~rayrcm.orchestration.metric_buffer.BufferedMetricLogger` for the training workers')."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = _client(uri), run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_folder(self, folder: str | Path, artifact_path: str) -> None:
        """The files of ``folder`` under ``artifact_path`` (``log_artifact`` of a folder would nest it once more)."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def log_model(uri: str, run_id: str, model_file: str | Path, *, register_as: str = "", alias: str = "",
              version_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log ``model.pt`` as the run's ``model`` and register/alias it when asked."""
    import mlflow

    from rayrcm.orchestration.console import quiet_stderr

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), quiet_stderr():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"model": str(model_file)},
            pip_requirements=["rayrcm", "torch", "timm"],
        )
    return {"model_uri": info.model_uri, **register(uri, info.model_uri, run_id, register_as, alias, version_tags)}


ALIAS_CHANGE_TAG = "rayrcm.alias_change"  # "alias name@alias: v1 -> v2" on the run and the new version


def alias_target(uri: str, name: str, alias: str) -> tuple[int, dict[str, str]] | None:
    """``(version, version tags)`` that ``models:/name@alias`` points at now, or None when unset."""
    from mlflow.exceptions import MlflowException

    try:
        mv = _client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias
        return None
    return int(mv.version), dict(mv.tags or {})


SWEEP_VERSION_TAG = "sweep"  # a model version registered by a sweep: the sweep's name


def check_alias_owner(uri: str, name: str, alias: str, owner_tag: str, owner: str, *, key: str, allow: str) -> None:
    """Refuse with one line (naming ``key`` and ``allow``, the setting that allows it) to move
    ``name@alias`` off a version that another job registered: one whose ``owner_tag`` is not ``owner``."""
    if not (name and alias):
        return
    now = alias_target(uri, name, alias)
    if now is None or now[1].get(owner_tag) == owner:
        return
    version, tags = now
    who = (f"sweep {tags[SWEEP_VERSION_TAG]}" if tags.get(SWEEP_VERSION_TAG)
           else f"job {tags['job']}" if tags.get("job") else "another job")
    raise ConfigError(key, alias, f"models:/{name}@{alias} points at v{version}, registered by {who}; set {allow} "
                      "to move it to this sweep's best model, or choose another alias")


def register(uri: str, model_uri: str, run_id: str, name: str, alias: str = "", tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Register ``model_uri`` (logged by ``run_id``) as a new version of ``name``, point ``alias`` at
    it, and tag the run with the registered reference. Nothing happens when ``name`` is empty.
    Moving an alias prints and tags (run and new version) ``alias name@alias: vN -> vM``."""
    if not name:
        return {}
    import mlflow

    from rayrcm.orchestration.console import quiet_stderr

    mlflow.set_tracking_uri(uri)
    client = _client(uri)
    with quiet_stderr():  # MLflow prints "Successfully registered model" to stderr; the caller says it
        mv = mlflow.register_model(model_uri, name, tags=tags or {})
    out: dict[str, Any] = {"name": name, "version": int(mv.version), "registry_uri": f"models:/{name}/{mv.version}"}
    if alias:
        before = alias_target(uri, name, alias)
        client.set_registered_model_alias(name, alias, mv.version)
        out["alias_uri"] = f"models:/{name}@{alias}"
        change = f"alias {name}@{alias}: {f'v{before[0]}' if before else '(unset)'} -> v{mv.version}"
        out["alias_change"] = change
        client.set_model_version_tag(name, mv.version, ALIAS_CHANGE_TAG, change)
        client.set_tag(run_id, ALIAS_CHANGE_TAG, change)
        print(f"[rayrcm] {change}", flush=True)
    client.set_tag(run_id, "rayrcm.registered_model", out.get("alias_uri", out["registry_uri"]))
    return out


def find_job_run(uri: str, experiment: str, job: str) -> str | None:
    """The run id of ``job`` in ``experiment`` (by its ``rayrcm.job`` tag), or None."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job}'", max_results=1)
    return found[0].info.run_id if found else None


def retire_job_run(uri: str, experiment: str, job: str) -> None:
    """A job's run whose params no longer describe the job (its folder changed protocol before any
    result): renamed out of the job (tag ``rayrcm.job`` = ``<job> (superseded)``, so the next run of
    ``job`` is a new one) and ended KILLED if it was left RUNNING; nothing of it is deleted."""
    found = find_job_run(uri, experiment, job)
    if found is None:
        return
    client = _client(uri)
    client.set_tag(found, JOB_TAG, f"{job} (superseded)")
    client.set_tag(found, "rayrcm.superseded", "its protocol changed before any result was written")
    if run_status(uri, found) == "RUNNING":
        terminate(uri, found, "KILLED")


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    client = _client(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log scalar metrics to a run at ``step`` (one call; for a series use :class:`MetricLogger`)."""
    MetricLogger(uri, run_id).log(step, metrics)


def log_artifacts(uri: str, run_id: str, paths: Sequence[str | Path], artifact_path: str | None = None) -> None:
    """Upload local files to a run's artifacts (under ``artifact_path`` when given)."""
    client = _client(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def run_status(uri: str, run_id: str) -> str:
    return _client(uri).get_run(run_id).info.status


def terminate(uri: str, run_id: str, status: str) -> None:
    """End a run as ``FINISHED``, ``FAILED`` or ``KILLED``."""
    _client(uri).set_terminated(run_id, status=status)


def resolve_model(ref: str, uri: str | None = None, dst: str | Path | None = None, *, key: str = "model") -> Path:
    """A local ``model.pt`` for a registry URI, a ``runs:/`` URI, a run id or a path; errors name
    ``key`` (the option the reference came from: ``model``, ``model.init_from``)."""
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (p / "model.pt", p / "artifacts" / "model.pt"):
            if cand.is_file():
                return cand
        raise ConfigError(key, ref, "folder holds no model.pt")
    if _RUN_ID.match(ref):
        ref = f"runs:/{ref}/model"
    if not ref.startswith(("models:/", "runs:/")):
        raise ConfigError(key, ref, "not a file, a run id, runs:/<id>/model or models:/<name>@<alias>")
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    local = Path(dst or tempfile.mkdtemp(prefix="rayrcm-model-"))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(local)))
    except Exception as err:  # MLflow raises several types for a missing model/alias/run
        raise ConfigError(key, ref, f"cannot be resolved in {uri or 'the tracking server'} ({str(err).splitlines()[0][:200]})") from None
    for cand in (got / "artifacts" / "model.pt", got / "model.pt", got):
        if cand.is_file():
            return cand
    raise ConfigError(key, ref, "the artifact holds no model.pt")


def model_lineage(ref: str, uri: str) -> tuple[str | None, str | None]:
    """``(run id, experiment name)`` of the run that logged the model ``ref``; ``(None, None)`` for a path."""
    if Path(ref).expanduser().exists():
        return None, None
    client = _client(uri)
    run_id = None
    if _RUN_ID.match(ref):
        run_id = ref
    elif ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].split("/")[0]
    elif ref.startswith("models:/"):
        name, _, version = ref[len("models:/"):].partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            run_id = client.get_model_version_by_alias(name, alias).run_id
        elif version.split("/")[0].isdigit():
            run_id = client.get_model_version(name, version.split("/")[0]).run_id
    if not run_id:
        return None, None
    run = client.get_run(run_id)
    return run_id, client.get_experiment(run.info.experiment_id).name


def load_model(ref: str, uri: str | None = None):
    """``(model, meta)`` for any model reference: :func:`resolve_model` fetches the file,
    :func:`rayrcm.models.export.build_from_file` rebuilds it."""
    from rayrcm.models.export import build_from_file

    return build_from_file(resolve_model(ref, uri))
