"""The end every one-stage-per-command recipe shares: apply ``--set`` overrides, validate (one-line
errors), print the resolved config for ``--dry-run``, else train on Ray Train and say which MLflow
run holds the result. Exit 2 on a bad value, 1 on a failed run."""

from __future__ import annotations

import sys

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.errors import ConfigError, RunFailed


def run_training_stage(stage: str, base: ExperimentConfig, overrides: list[str], dry_run: bool) -> None:
    try:
        cfg = validate(apply_overrides(base, overrides), check_paths=not dry_run)
        if dry_run:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return
        from rayrcm.orchestration.trainer import fit

        result = fit(cfg)
        print(f"[rayrcm] {stage} done: run {result.run_id}")
    except (ConfigError, RunFailed) as err:
        print(f"rayrcm: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
