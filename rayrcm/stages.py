"""The stages every recipe runs (``experiments/`` and ``examples/``), one runner each, so that a
recipe's command line only declares its stages and their configs: ``train`` (a Ray Train job),
``certify`` (``rayrcm certify``), ``analyze``, ``tune`` (a Ray Tune sweep) and ``table`` (``all``:
the recipe's stages as one resumable job). ``--dry-run`` prints what would run. Run them inside
:func:`recipe_errors`: bad input is one line and exit 2 in the recipe's own syntax (``--set
key=VALUE``), a failed run one line and exit 1, Ctrl-C one line and 130. Ray, torch and MLflow load
only when a stage runs, so a recipe's ``--help`` answers at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayrcm.config import ExperimentConfig
    from rayrcm.orchestration.certify_job import CertifyResult
    from rayrcm.orchestration.pipeline_job import PipelineResult
    from rayrcm.orchestration.sweep import SweepConfig, SweepResult
    from rayrcm.orchestration.trainer import FitResult
    from rayrcm.pipeline import Stage


@contextlib.contextmanager
def recipe_errors(verbose: bool = False) -> Iterator[None]:
    """The console mode (``--verbose``: Ray's and MLflow's own lines too) and the recipe's one-line errors."""
    from rayrcm.cli_parse import one_line_errors
    from rayrcm.orchestration import console

    console.configure(True if verbose else None)
    with one_line_errors(recipe=True):
        yield


def train(stage: str, base: ExperimentConfig, overrides: list[str], dry_run: bool = False) -> FitResult | None:
    """``base`` (an ``ExperimentConfig``) with ``--set`` overrides, validated; printed as YAML for
    ``dry_run``, else trained on Ray Train (:func:`~rayrcm.orchestration.trainer.fit`): returns its
    ``FitResult`` and says which run and model hold the result."""
    from rayrcm.config import apply_overrides, to_dict, validate

    cfg = validate(apply_overrides(base, overrides), check_paths=not dry_run)
    if dry_run:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return None
    from rayrcm.orchestration.trainer import fit

    result = fit(cfg)
    where = result.model.get("alias_uri") or result.model.get("registry_uri") or result.model_file
    print(f"[rayrcm] {stage} done: run {result.run_id}, model {where}" if result.run_id
          else f"[rayrcm] {stage} done: model {where}", flush=True)
    return result


def certify(args: list[str], dry_run: bool = False) -> CertifyResult | None:
    """``rayrcm certify`` with the recipe's dotted settings (``model=...``, ``smoothing.n=...``) and the
    user's ``--set`` values after them; the resolved config for ``dry_run``."""
    from rayrcm.orchestration import certify_job

    cfg = certify_job.config_from_args(args)
    if dry_run:
        print(cfg)
        return None
    return certify_job.run(cfg)


def analyze(results: list[str], radii: str | None = None) -> None:
    """``rayrcm analyze RESULTS... [--radii]``."""
    from rayrcm.cli import main

    main(["analyze", *results, *(["--radii", radii] if radii else [])])


def tune(cfg: ExperimentConfig, recipe_sweep: SweepConfig, sweep_args: list[str], space_args: list[str],
         dry_run: bool = False) -> SweepResult | None:
    """A Ray Tune sweep of ``cfg`` over the recipe's space (``--space`` replaces it), with ``--sweep``
    settings; the resolved sweep for ``dry_run``."""
    from rayrcm.orchestration import sweep as sweeps

    base = recipe_sweep if not space_args else sweeps.SweepConfig(**{**vars(recipe_sweep), "space": {}})
    sw = sweeps.config_from_args(sweep_args, space_args, base=base)
    if dry_run:
        import yaml

        _, sw, _ = sweeps.validate_sweep(cfg, sw)
        print(yaml.safe_dump({"sweep": vars(sw)}, sort_keys=False), end="")
        return None
    return sweeps.run(cfg, sw)


def table(recipe: str, stages: list[Stage], overrides: list[str], dry_run: bool = False) -> PipelineResult | None:
    """``all``: the recipe's stages as one resumable job (:func:`~rayrcm.orchestration.pipeline_job.run_all`)."""
    from rayrcm.orchestration.pipeline_job import run_all

    return run_all(recipe, stages, overrides, dry_run=dry_run)


__all__ = ["analyze", "certify", "recipe_errors", "table", "train", "tune"]
