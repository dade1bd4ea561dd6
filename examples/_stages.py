"""The stage command line shared by the example recipes: ``train``, ``certify``, ``analyze``, each
with its own ``--help`` (its flags and an example). Ray, torch and MLflow are imported only when a
stage runs, so ``--help`` answers at once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

SET_HELP = ("override a value (repeatable); list the keys and their values with "
            "`rayrcm config {recipe}` (train) or `{prog} certify --dry-run` (certify)")


def _parser(prog: str, doc: str, recipe: str, examples: dict[str, str]) -> argparse.ArgumentParser:
    from rayrcm.cli_parse import RecipeParser

    fmt = argparse.RawDescriptionHelpFormatter
    p = RecipeParser(prog=prog, description=doc, formatter_class=fmt)
    sub = p.add_subparsers(dest="stage", required=True, metavar="{train,certify,analyze}")
    sets = SET_HELP.format(recipe=recipe, prog=prog)
    t = sub.add_parser("train", help="train the classifier on Ray Train, log it to MLflow, register it", formatter_class=fmt,
                       description="Train the recipe's classifier (one Ray Train run) and register it in MLflow.",
                       epilog=f"example:\n  {examples['train']}\n\nkeys: rayrcm config {recipe} [--set ...]")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=sets + ", e.g. --set data.path=DIR --set train.use_gpu=true")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    c = sub.add_parser("certify", help="certify the registered model with randomized smoothing (Ray Data)",
                       formatter_class=fmt,
                       description="CERTIFY (Cohen et al., 2019) of the registered model over the test split; prints "
                                   "the certified-accuracy table.",
                       epilog=f"example:\n  {examples['certify']}\n\nkeys: rayrcm certify --help names them "
                              "(model, data_path, smoothing.n, smoothing.skip, compute.workers, ...)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a certification key (repeatable), e.g. --set data_path=DIR --set smoothing.n=10000")
    c.add_argument("--dry-run", action="store_true", help="print the resolved certification config and exit")
    a = sub.add_parser("analyze", help="certified-accuracy table, ACR and curve of certification results",
                       formatter_class=fmt,
                       description="Certified accuracy at each radius, ACR and abstention rate; writes table.md, "
                                   "table.tex and certified_accuracy.png.",
                       epilog=f"example:\n  {examples['analyze']}")
    a.add_argument("results", nargs="*", help="certification folders or Cohen-format .tsv files "
                                              "(default: this recipe's certification folder)")
    a.add_argument("--radii", help="comma-separated radii (default 0, 0.25, ... up to the largest certifiable)")
    for sp in (p, t, c, a):
        sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's and MLflow's own logs too")
    return p


def main(argv: list[str] | None, *, prog: str, doc: str, recipe: str, config: Callable[[], Any],
         certify: Callable[[], list[str]], examples: dict[str, str]) -> None:
    """Run one stage of an example recipe (:mod:`rayrcm.stages`); bad input is one line and exit status 2."""
    args = _parser(prog, doc, recipe, examples).parse_args(argv)
    from rayrcm import stages

    with stages.recipe_errors(getattr(args, "verbose", False)):
        if args.stage == "analyze":
            stages.analyze(args.results or [str(_certify_folder(certify()))], args.radii)
        elif args.stage == "certify":
            stages.certify(certify() + args.overrides, args.dry_run)
        else:
            stages.train("train", config(), args.overrides, args.dry_run)


def _certify_folder(args: list[str]) -> Path:
    """Where the recipe's certification writes its results (``out_dir/name``)."""
    from rayrcm.orchestration import certify_job

    cfg = certify_job.config_from_args(args)
    return Path(cfg.out_dir).expanduser() / cfg.name
