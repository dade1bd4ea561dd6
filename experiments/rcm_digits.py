"""RCM on the bundled digits: the quickstart's recipe, stage by stage.

    python experiments/rcm_digits.py pretrain   [--set key=value ...]
    python experiments/rcm_digits.py finetune   --set model.init_from=<run id | models:/... | path> [...]
    python experiments/rcm_digits.py quickstart [--set key=value ...]   # both, then the table

On a cluster: ``ray job submit --working-dir . -- python experiments/rcm_digits.py quickstart``.
"""

from __future__ import annotations

import argparse
import sys

from rayrcm.cli import main as cli_main
from rayrcm.config import apply_overrides, validate
from rayrcm.errors import ConfigError
from rayrcm.quickstart import finetune_config, pretrain_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["pretrain", "finetune", "quickstart"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.stage == "quickstart":
        return cli_main(["quickstart", *sum((["--set", o] for o in args.overrides), [])])
    try:
        from rayrcm.orchestration.trainer import fit

        base = pretrain_config() if args.stage == "pretrain" else finetune_config()
        result = fit(validate(apply_overrides(base, args.overrides)))
        print(f"[rayrcm] {args.stage} done: run {result.run_id}, metrics {result.metrics}")
    except ConfigError as err:
        print(f"rayrcm: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
