"""Import the user's own extensions (methods, evaluations, export kinds, datasets, encoders).

A plugin is a module that registers things when imported (``OBJECTIVES.register("mine")(...)``).
It must be imported in every process that builds from a config: the driver, every Ray Train
worker and every certification actor, so configs name them (``train.plugins``, certify's
``plugins``) and each process calls :func:`load_plugins` first. A plugin is a dotted module name
(importable on every node) or a path to a ``.py`` file (imported by its file name, with its folder
put on ``sys.path``; on a cluster the file must be on shared storage or in the job's working dir).

Model files never name code to import: a model whose export kind comes from a plugin is rebuilt
only where the user loaded that plugin.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from rayrcm.errors import ConfigError


def load_plugin(spec: str, key: str = "train.plugins") -> ModuleType:
    """Import one plugin (idempotent: a module already imported is returned as it is)."""
    if not spec.strip():
        raise ConfigError(key, spec, "give module names or .py files")
    if spec.endswith(".py"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(key, spec, "no such file")
        name = path.stem
        loaded = sys.modules.get(name)
        if loaded is not None:
            if Path(getattr(loaded, "__file__", "") or "").resolve() != path:
                raise ConfigError(key, spec, f"its module name {name!r} is already taken by {getattr(loaded, '__file__', name)}")
            return loaded
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        return _import(name, spec, key)
    try:
        return _import(spec, spec, key)
    except ModuleNotFoundError as err:
        if err.name != spec.split(".")[0] and err.name != spec:  # the plugin imports a module that is missing
            raise ConfigError(key, spec, f"plugin {spec} failed to import: {type(err).__name__}: {err}") from None
        raise ConfigError(key, spec, f"cannot be imported ({err}); give an importable module or a .py file") from None


def _import(name: str, spec: str, key: str) -> ModuleType:
    """Import ``name``; anything the plugin's own code raises is one line naming it (a missing module
    ``name`` itself is left to the caller)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            raise
        sys.modules.pop(name, None)
        raise ConfigError(key, spec, f"plugin {spec} failed to import: {type(err).__name__}: {err}") from None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: a SyntaxError, a raise, ... in one line
        sys.modules.pop(name, None)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(key, spec, f"plugin {spec} failed to import: {type(err).__name__}: {first}") from None


def load_plugins(specs: Iterable[str], key: str = "train.plugins") -> list[ModuleType]:
    return [load_plugin(s, key) for s in specs]
