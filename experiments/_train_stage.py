"""The end every one-stage-per-command recipe shares: apply ``--set`` overrides, validate (one-line
errors), print the resolved config for ``--dry-run``, else train on Ray Train and say which MLflow
run holds the result; and ``all``, the recipe's table as one resumable job. Exit 2 on a bad value,
1 on a failed run."""

from __future__ import annotations

from rayrcm.cli_parse import one_line_errors
from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate


def run_training_stage(stage: str, base: ExperimentConfig, overrides: list[str], dry_run: bool) -> None:
    with one_line_errors(recipe=True):
        cfg = validate(apply_overrides(base, overrides), check_paths=not dry_run)
        if dry_run:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return
        from rayrcm.orchestration.trainer import fit

        result = fit(cfg)
        print(f"[rayrcm] {stage} done: run {result.run_id}")


def run_table(recipe: str, stages: list, overrides: list[str], dry_run: bool) -> None:
    """``all``: the recipe's stages as one job (:func:`rayrcm.orchestration.pipeline_job.run_all`)."""
    with one_line_errors(recipe=True):
        from rayrcm.orchestration.pipeline_job import run_all

        run_all(recipe, stages, overrides, dry_run=dry_run)
