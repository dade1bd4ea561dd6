"""RCM on the bundled digits: the quickstart's recipe, stage by stage.

    python experiments/rcm_digits.py pretrain   [--set key=value ...]
    python experiments/rcm_digits.py finetune   --set model.init_from=<run id | models:/... | path> [...]
    python experiments/rcm_digits.py certify    [--set model=models:/rcm-digits@sigma-0_25 --set smoothing.n=10000 ...]
    python experiments/rcm_digits.py analyze    RESULTS...
    python experiments/rcm_digits.py quickstart [--set key=value ...]   # pretrain, finetune, certify

``certify`` takes the keys of ``rayrcm.certify.CertifyConfig`` (``model``, ``smoothing.sigma``,
``smoothing.n``, ``compute.workers``, ...). On a cluster:
``ray job submit --working-dir . -- python experiments/rcm_digits.py quickstart``.
"""

from __future__ import annotations

import argparse
import sys

from rayrcm.cli import main as cli_main
from rayrcm.config import apply_overrides, validate
from rayrcm.errors import ConfigError
from rayrcm.quickstart import certify_config, finetune_config, pretrain_config, sigma_alias

STAGES = ["pretrain", "finetune", "certify", "analyze", "quickstart"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("results", nargs="*", help="analyze: certification folders or .tsv files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.stage == "quickstart":
        return cli_main(["quickstart", *sum((["--set", o] for o in args.overrides), [])])
    if args.stage == "analyze":
        return cli_main(["analyze", *args.results])
    try:
        if args.stage == "certify":
            from rayrcm.orchestration import certify_job

            ft = finetune_config()
            base = certify_config(f"models:/{ft.tracking.register_as}@{sigma_alias(ft.method.sigma)}", ft.tracking.uri)
            certify_job.run(certify_job.config_from_args(args.overrides, base))
            return None
        from rayrcm.orchestration.trainer import fit

        base = pretrain_config() if args.stage == "pretrain" else finetune_config()
        result = fit(validate(apply_overrides(base, args.overrides)))
        print(f"[rayrcm] {args.stage} done: run {result.run_id}, metrics {result.metrics}")
    except ConfigError as err:
        print(f"rayrcm: error: {err}", file=sys.stderr)
        sys.exit(2)
    return None


if __name__ == "__main__":
    main()
