"""``rayrcm``: a thin command line over recipes and the Ray layer.

    rayrcm quickstart [--set key=value ...]
    rayrcm train RECIPE [--set key=value ...]        # a .py or .yaml recipe, one training stage
    rayrcm config RECIPE [--set key=value ...]       # print the resolved, validated config

Bad input gives one line on stderr (``rayrcm: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from rayrcm.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayrcm", description="Robust representation learning and certification on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="RCM pretrain + noisy fine-tune + evaluation on the bundled digits")
    t = sub.add_parser("train", help="run one training stage of a recipe on Ray Train")
    c = sub.add_parser("config", help="print the resolved config of a recipe")
    for sp in (t, c):
        sp.add_argument("recipe", help="a .py (config() or CONFIG) or .yaml recipe")
    for sp in (q, t, c):
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=2e-4 (repeatable)")
    return p


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rayrcm.config import apply_overrides, load_recipe, to_dict, validate

    if args.command == "quickstart":
        from rayrcm import quickstart

        quickstart.run(args.overrides)
        return 0
    cfg = validate(apply_overrides(load_recipe(args.recipe), args.overrides))
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from rayrcm.orchestration.trainer import fit

    result = fit(cfg)
    print(f"[rayrcm] done: run {result.run_id}, model {result.model_file}, metrics {result.metrics}")
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except ConfigError as err:
        print(f"rayrcm: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
