"""Every recipe's command line (``experiments/`` and ``examples/``), declared rather than written: a
recipe lists its commands (:class:`Command`: a name, a help line, an example, its own options and
what it runs, built by :func:`train`, :func:`certify`, :func:`analyze`, :func:`tune` or
:func:`table`, the stage kinds of :mod:`rayrcm.stages`) and :func:`main` makes one subcommand of
each, with its own ``--help`` (its flags and an example), ``--set KEY=VALUE`` and ``--dry-run`` where
the command takes them and ``--verbose`` everywhere, then runs the chosen command inside
:func:`rayrcm.stages.recipe_errors`: bad input one line and exit 2, a failed run one line and exit
1, Ctrl-C one line and 130. Ray, torch and MLflow load only when a command runs, so ``--help``
answers at once."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayrcm import stages
from rayrcm.cli import add_sweep_args, add_verbose_arg
from rayrcm.cli_parse import RecipeParser

if TYPE_CHECKING:
    from rayrcm.config import ExperimentConfig
    from rayrcm.orchestration.sweep import SweepConfig
    from rayrcm.pipeline import Stage

Args = argparse.Namespace
KEYS = "keys: --set takes any config key; list them with --dry-run"
CERTIFY_KEYS = KEYS + " (certification keys: model, data_path, smoothing.n, compute.workers, ...)"
TABLE_KEYS = ("--set KEY=VALUE goes to every stage with KEY, --set STAGE:KEY=VALUE to one; a finished stage with the "
              "same settings is reused")
SET_HELP = "override a config value (repeatable)"


@dataclass(frozen=True)
class Option:
    """One of a command's own flags or positionals: ``argparse.add_argument(*flags, **kwargs)``."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def option(*flags: str, **kwargs: Any) -> Option:
    return Option(flags, kwargs)


@dataclass(frozen=True)
class Command:
    """A recipe's subcommand: ``run(args)`` does its work (inside the recipe's one-line errors);
    ``settings``: it takes ``--set`` (and ``--dry-run`` unless ``dry_run`` is false); ``keys``: the
    help's last paragraph."""

    name: str
    help: str
    run: Callable[[Args], object]
    example: str = ""
    options: Sequence[Option] = ()
    keys: str = KEYS
    settings: bool = True
    dry_run: bool = True
    description: str = ""
    extend: Callable[[argparse.ArgumentParser], None] | None = None


def train(name: str, help: str, config: Callable[[Args], ExperimentConfig], *, example: str,
          options: Sequence[Option] = (), description: str = "", keys: str = KEYS) -> Command:
    """A Ray Train stage: ``config(args)`` with the ``--set`` values, validated (:func:`stages.train`)."""
    return Command(name, help, lambda a: stages.train(name, config(a), a.overrides, a.dry_run), example, options,
                   keys, description=description)


def certify(help: str, args: Callable[[Args], list[str]], *, example: str, options: Sequence[Option] = (),
            name: str = "certify", description: str = "", keys: str = CERTIFY_KEYS) -> Command:
    """``rayrcm certify`` with the recipe's keys (``args(args)``) and the user's ``--set`` values after them."""
    return Command(name, help, lambda a: stages.certify([*args(a), *a.overrides], a.dry_run), example, options,
                   keys, description=description)


def analyze(*, example: str, default: Callable[[], list[str]] | None = None, description: str = "",
            help: str = "certified-accuracy table, ACR and curve of certification results") -> Command:
    """``rayrcm analyze RESULTS... [--radii]``; ``default()``: the results when none are named."""
    results = option("results", nargs="*" if default else "+",
                     help="certification folders or Cohen-format .tsv files"
                          + (" (default: this recipe's certification folder)" if default else ""))
    radii = option("--radii", help="comma-separated radii (default 0, 0.25, ... up to the largest certifiable)")

    def run(a: Args) -> None:
        stages.analyze(a.results or (default() if default else []), a.radii)

    return Command("analyze", help, run, example, (results, radii), keys="", settings=False, description=description)


def tune(help: str, config: Callable[[Args], ExperimentConfig], sweep: Callable[[Args], SweepConfig], *, example: str,
         options: Sequence[Option] = ()) -> Command:
    """A Ray Tune sweep of ``config(args)`` (with ``--set``) over ``sweep(args)``; ``--space``/``--sweep`` flags."""

    def run(a: Args) -> None:
        from rayrcm.config import apply_overrides, validate

        cfg = validate(apply_overrides(config(a), a.overrides), check_paths=not a.dry_run)
        stages.tune(cfg, sweep(a), a.sweep, a.space, a.dry_run)

    return Command("tune", help, run, example, options, extend=add_sweep_args)


def table(recipe: str, stages_of: Callable[[Args], list[Stage]], *, example: str, names: str,
          options: Sequence[Option] = (), help: str = "", description: str = "") -> Command:
    """``all``: the recipe's stages (``stages_of(args)``; ``names`` lists them for the help) as one resumable job."""
    return Command("all", help or "the whole table in one resumable job",
                   lambda a: stages.table(recipe, stages_of(a), a.overrides, a.dry_run), example, options,
                   f"stages: {names}; {TABLE_KEYS}", description=description)


def certify_folder(args: list[str]) -> str:
    """Where a certification with ``args`` writes its results (``out_dir/name``)."""
    from pathlib import Path

    from rayrcm.orchestration import certify_job

    cfg = certify_job.config_from_args(args)
    return str(Path(cfg.out_dir).expanduser() / cfg.name)


def classifier_commands(config: Callable[[], ExperimentConfig], certify_args: Callable[[], list[str]], *,
                        examples: dict[str, str], recipe: str) -> list[Command]:
    """``train``, ``certify`` and ``analyze`` of a recipe that trains one classifier (``config()``),
    certifies its registered model (``certify_args()``) and reads that certification's folder."""
    return [
        train("train", "train the classifier on Ray Train, log it to MLflow, register it", lambda a: config(),
              example=examples["train"], keys=f"keys: rayrcm config {recipe} [--set ...]",
              description="Train the recipe's classifier (one Ray Train run) and register it in MLflow."),
        certify("certify the registered model with randomized smoothing (Ray Data)", lambda a: certify_args(),
                example=examples["certify"],
                description="CERTIFY (Cohen et al., 2019) of the registered model over the test split; prints the "
                            "certified-accuracy table.",
                keys="keys: rayrcm certify --help names them (model, data_path, smoothing.n, smoothing.skip, "
                     "compute.workers, ...)"),
        analyze(example=examples["analyze"], default=lambda: [certify_folder(certify_args())],
                description="Certified accuracy at each radius, ACR and abstention rate; writes table.md, table.tex "
                            "and certified_accuracy.png."),
    ]


def parser(doc: str, commands: Sequence[Command], prog: str | None = None) -> argparse.ArgumentParser:
    """The recipe's parser: a subcommand per command, each with its own ``--help``."""
    prog = prog or (sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "experiments/RECIPE.py")
    fmt = argparse.RawDescriptionHelpFormatter
    p = RecipeParser(description=doc, formatter_class=fmt)
    sub = p.add_subparsers(dest="stage", required=True)
    for c in commands:
        epilog = "\n\n".join(x for x in ((f"example:\n  {c.example.format(prog=prog)}" if c.example else ""), c.keys) if x)
        sp = sub.add_parser(c.name, help=c.help, description=c.description or c.help, epilog=epilog or None,
                            formatter_class=fmt)
        for o in c.options:
            sp.add_argument(*o.flags, **o.kwargs)
        if c.settings:
            sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
            if c.dry_run:
                sp.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        if c.extend:
            c.extend(sp)
        add_verbose_arg(sp)
    add_verbose_arg(p)
    return p


def main(argv: list[str] | None, *, doc: str, commands: Sequence[Command], prog: str | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run its command in the recipe's one-line errors."""
    by_name = {c.name: c for c in commands}
    assert len(by_name) == len(commands), "two commands of one name"
    args = parser(doc, commands, prog).parse_args(argv)
    with stages.recipe_errors(getattr(args, "verbose", False)):
        by_name[args.stage].run(args)


__all__ = ["CERTIFY_KEYS", "KEYS", "Command", "Option", "analyze", "certify", "certify_folder", "classifier_commands",
           "main", "option", "parser", "table", "train", "tune"]
