"""The command line's parsing and its one-line errors, shared by ``rayrcm`` and the recipes'
stages: argparse that suggests the flag or command meant, a recipe's own syntax (``--set
key=VALUE``) in its errors, and Ctrl-C as one line."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator
from typing import NoReturn

from rayrcm.certify.sampling import SAMPLING_MODES, mode_flags
from rayrcm.errors import ConfigError, RunFailed, nearest

# flag -> dotted key of rayrcm.certify.CertifyConfig (a sampling mode's own flags: its entry's, rayrcm.certify.sampling)
CERTIFY_FLAGS = {
    "model": "model", "denoiser": "denoiser", "dataset": "dataset", "data_path": "data_path", "split": "split",
    "name": "name", "out": "out_dir", "corruption": "corruption", "severity": "severity",
    "sigma": "smoothing.sigma", "n0": "smoothing.n0", "n": "smoothing.n", "alpha": "smoothing.alpha",
    "seed": "smoothing.seed", "skip": "smoothing.skip", "max": "smoothing.max", "indices": "smoothing.indices",
    "chunk": "smoothing.chunk", "sampling": "smoothing.sampling",
    **{flag.name: flag.key for _, flag in mode_flags()},
    "batch": "compute.batch", "workers": "compute.workers", "gpu": "compute.use_gpu",
    "precision": "compute.precision", "channels_last": "compute.channels_last",
    "tracking_uri": "tracking.uri", "experiment": "tracking.experiment", "plugin": "plugins",
}



def add_sampling_args(c: argparse.ArgumentParser) -> None:
    """``--sampling`` and every sampling mode's own flags (:mod:`rayrcm.certify.sampling`) of ``rayrcm certify``."""
    modes = [f"{n} ({SAMPLING_MODES.get(n).help})" for n in SAMPLING_MODES]
    c.add_argument("--sampling", help=", ".join(modes[:-1]) + " or " + modes[-1] if len(modes) > 1 else modes[0])
    for _, flag in mode_flags():
        c.add_argument("--" + flag.name.replace("_", "-"), help=flag.help)


def check_sampling_flags(given: dict[str, object]) -> None:
    """Refuse a sampling mode's flag given with another mode (``given``: flag -> value, the certify flags set),
    and a contradiction among a mode's flags; one line. (``radii``, ``tolerance``: the config check refuses them.)"""
    for name in SAMPLING_MODES:
        SAMPLING_MODES.get(name).check_flags(given)
    sampling = given.get("sampling") or "fixed"
    for mode, flag in mode_flags():
        if flag.refused_elsewhere and flag.name in given and sampling != mode:
            raise ConfigError(flag.name, given[flag.name], f"is for --sampling {mode}, not sampling={sampling}")


INTERRUPTED = "rayrcm: interrupted; rerun the same command to resume"


@contextlib.contextmanager
def one_line_errors(recipe: bool = False) -> Iterator[None]:
    """The command line's errors, for ``rayrcm`` and every recipe stage alike: bad input one line and
    exit 2 (``recipe``: in the recipe's own syntax, :func:`recipe_message`); a failed run one line and
    exit 1; Ctrl-C one line and 130."""
    try:
        yield
    except ConfigError as err:
        print(f"rayrcm: error: {recipe_message(err) if recipe else err}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as err:  # the run failed, not its input
        print(f"rayrcm: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # finished work is on disk: the rerun resumes
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        sys.exit(130)


# flags the recipes define themselves (their stages' own options): never rewritten to --set
RECIPE_FLAGS = frozenset({"alpha", "denoiser", "sigma", "radii", "set", "dry_run", "verbose"})
SWITCHES = frozenset({"gpu", "channels_last"})  # certify flags that take no value


def set_form(flag: str, value: str | None = None) -> str | None:
    """A ``rayrcm certify`` flag as a recipe stage takes it (``n``, ``1000`` -> ``--set smoothing.n=1000``;
    a switch -> ``=true``); None for a flag the recipes have themselves or that certify lacks."""
    flag = flag.replace("-", "_")
    key = CERTIFY_FLAGS.get(flag)
    if key is None or flag in RECIPE_FLAGS:
        return None
    shown = "true" if flag in SWITCHES else value if value and not value.startswith("-") else key.rsplit(".", 1)[-1].upper()
    return f"--set {key}={shown}"


def recipe_message(err: Exception) -> str:
    """An error in a recipe's own syntax: a ``rayrcm certify`` flag it names (``--name``,
    ``--n 1000``, ``--gpu``) becomes the recipe's ``--set key=VALUE`` (:func:`set_form`); the
    recipes' own flags stay."""
    def swap(m: re.Match) -> str:
        form = set_form(m.group(1), None if m.group(1).replace("-", "_") in SWITCHES else m.group(2))
        if form is None:
            return m.group(0)
        return form + (f" {m.group(2)}" if m.group(2) and m.group(1).replace("-", "_") in SWITCHES else "")

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)(?![\w=-])(?: ([\w.,:@/-]+)(?=[\s;,)]|$))?", swap, str(err))


class Parser(argparse.ArgumentParser):
    """argparse with a suggestion for an unknown flag (``--num-samples`` -> ``--n``; a close spelling)
    among the flags of the command given."""

    def error(self, message: str) -> NoReturn:
        m = re.match(r"unrecognized arguments: (--?[\w-]+)", message)
        if m:
            flags = [o for a in self._command_actions() for o in a.option_strings if o.startswith("--")]
            near = nearest(m.group(1).lstrip("-").replace("-", "_"), [f[2:].replace("-", "_") for f in flags])
            if near is not None:
                message += f" (did you mean --{near.replace('_', '-')}?)"
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            near = nearest(m.group(1), [c.strip(" '") for c in m.group(2).split(",")])
            message += f" (did you mean {near}?)" if near else ""
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line, as every bad input (--help shows the usage)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _command_actions(self) -> list[argparse.Action]:
        """This parser's actions, or those of the subcommand named on the command line."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = next((a for a in getattr(self, "_argv", []) if a in action.choices), None)
                if chosen is not None:
                    return list(action.choices[chosen]._actions)
        return list(self._actions)


class RecipeParser(Parser):
    """A recipe's parser: a ``rayrcm certify`` flag given to a recipe stage (``--n 1000``) is
    answered with the recipe's own syntax (``--set smoothing.n=1000``)."""

    def error(self, message: str) -> NoReturn:
        m = re.match(r"unrecognized arguments: --([\w-]+)(?: (\S+))?", message)
        form = set_form(m.group(1), m.group(2)) if m else None
        if form is not None:
            self.exit(2, f"{self.prog}: error: {message} (a recipe stage takes {form})\n")
        super().error(message)
