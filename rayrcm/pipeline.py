"""A recipe's whole table as a graph of stages (pure: no Ray, no MLflow).

A recipe declares its stages (:class:`Stage`: a kind, a config, and which of its keys take the
model of which earlier stage); :func:`plan` checks the graph (an unknown stage, a missing input or
a cycle is one line), routes ``--set`` overrides to the stages that have the key (``STAGE:key=v``
for one stage; a key no stage has is one line), and gives every stage a **fingerprint**: the hash of
its resolved config, its inputs' keys and its inputs' fingerprints. A stage's job is named after its
fingerprint, so an unchanged stage is the same job (reused when finished, resumed from its
checkpoint when killed) and a changed one, and everything downstream of it, is a new job.
:mod:`rayrcm.orchestration.pipeline_job` runs the plan on Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Any

from rayrcm.errors import ConfigError, nearest

KINDS = ("train", "certify")  # what a stage runs: a Ray Train job (train, fine-tune, probe), a certification
PLACEHOLDER = "<{}>"  # an input's value until its stage has run: "<pretrain>"


@dataclass(frozen=True)
class Stage:
    """One stage: ``config()`` builds its config (an ``ExperimentConfig`` for ``train``, a
    ``CertifyConfig`` for ``certify``); ``inputs`` maps a key of that config to the stage whose model
    it takes (``{"model.init_from": "pretrain"}``); ``after``: stages it waits for without taking their
    model; ``row``: its row in the recipe's table (a certification's)."""

    name: str
    kind: str
    config: Callable[[], Any]
    inputs: Mapping[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    row: str = ""
    columns: Mapping[str, str] = field(default_factory=dict)

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.inputs.values(), *self.after]))


@dataclass(frozen=True)
class Planned:
    stage: Stage
    config: Any  # the resolved config, inputs still placeholders, named after the fingerprint
    fingerprint: str
    overrides: tuple[str, ...]


def _near(value: str, options: Any, key: bool = False) -> str:
    """`` (did you mean X?)``: a dotted key's nearest in its own section (``key``), else the closest name."""
    import difflib

    options = sorted(options)
    if key and "." in value:
        head, last = value.rsplit(".", 1)
        same = {o.rsplit(".", 1)[-1]: o for o in options if o.startswith(head + ".")}
        hit = nearest(last, list(same))
        near = same.get(hit) if hit else None
    else:
        near = next(iter(difflib.get_close_matches(value, options, n=1, cutoff=0.75)), None)
    return f" (did you mean {near}?)" if near and near != value else ""


def flat(cfg: Any) -> dict[str, Any]:
    """A config as ``{"dotted.key": value}``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(f"{prefix}{f.name}.", v)
            else:
                out[f"{prefix}{f.name}"] = v
    walk("", cfg)
    return out


def order(stages: list[Stage]) -> list[str]:
    """The stages in an order that runs every input first; one-line errors for a duplicate name, an
    unknown kind, an input naming no stage, or a cycle."""
    names = [s.name for s in stages]
    for s in stages:
        if names.count(s.name) > 1:
            raise ConfigError("stage", s.name, "is declared twice")
        if s.kind not in KINDS:
            raise ConfigError(f"stage {s.name}: kind", s.kind, f"must be one of {', '.join(KINDS)}")
        for need in s.needs:
            if need not in names:
                raise ConfigError(f"stage {s.name}: input", need, f"names no stage (stages: {', '.join(names)})"
                                  + _near(need, names))
    try:
        return list(TopologicalSorter({s.name: s.needs for s in stages}).static_order())
    except CycleError as err:
        raise ConfigError("stages", " -> ".join(err.args[1]), "form a cycle") from None


def route(stages: list[Stage], configs: Mapping[str, Any], overrides: list[str]) -> dict[str, list[str]]:
    """``--set`` values per stage: ``STAGE:key=value`` to that stage, ``key=value`` to every stage
    whose config has ``key``; one line for a stage or key that matches nothing."""
    names = [s.name for s in stages]
    keys = {name: set(flat(cfg)) for name, cfg in configs.items()}
    out: dict[str, list[str]] = {name: [] for name in names}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", item, "must be KEY=VALUE or STAGE:KEY=VALUE")
        target, _, rest = item.partition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        key = rest.split("=", 1)[0].strip()
        if target:
            if target not in names:
                raise ConfigError("--set", item, f"names no stage (stages: {', '.join(names)})" + _near(target, names))
            if key not in keys[target]:
                raise ConfigError("--set", item, f"stage {target} has no key {key}" + _near(key, keys[target], key=True))
            out[target].append(rest)
            continue
        hit = [n for n in names if key in keys[n]]
        if not hit:
            every = set().union(*keys.values())
            raise ConfigError("--set", item, f"matches no stage's key (stages: {', '.join(names)})" + _near(key, every, key=True))
        for n in hit:
            out[n].append(rest)
    return out


def fingerprint(cfg: Any, inputs: Mapping[str, str], upstream: Mapping[str, str]) -> str:
    """The hash of a stage's config (inputs as placeholders) and of its inputs' fingerprints."""
    body = {"config": flat(cfg), "inputs": {k: upstream[v] for k, v in sorted(inputs.items())},
            "after": sorted(upstream.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(stages: list[Stage], overrides: list[str], apply: Callable[[Stage, Any, list[str]], Any],
         name: Callable[[Stage, Any, str], Any]) -> list[Planned]:
    """Every stage resolved, in run order: its overrides applied (``apply(stage, cfg, overrides)``,
    validated there), its fingerprint taken, its job named after it (``name(stage, cfg, fp)``)."""
    run_order = order(stages)
    by_name = {s.name: s for s in stages}
    configs = {s.name: s.config() for s in stages}
    routed = route(stages, configs, overrides)
    fps: dict[str, str] = {}
    out = []
    for stage_name in run_order:
        s = by_name[stage_name]
        holders = [f"{k}={PLACEHOLDER.format(v)}" for k, v in s.inputs.items()]
        cfg = apply(s, configs[stage_name], routed[stage_name] + holders)
        fps[stage_name] = fingerprint(cfg, s.inputs, {n: fps[n] for n in s.needs})
        out.append(Planned(s, name(s, cfg, fps[stage_name]), fps[stage_name], tuple(routed[stage_name])))
    return out


__all__ = ["KINDS", "PLACEHOLDER", "Planned", "Stage", "fingerprint", "flat", "order", "plan", "route"]
