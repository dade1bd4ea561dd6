"""The one dotted-override parser of rayrcm: ``key=value`` and ``section.key=value`` items, typed by
the dataclass field they land in.

Every command uses it: ``rayrcm train/config/tune --set``, ``rayrcm certify --set``, ``--sweep``
and the recipes. :func:`parse_dotted` turns the items into a nested mapping;
:func:`update_dataclass` applies such a mapping (or a YAML recipe's) to a frozen dataclass,
coercing strings to the field's type, with one-line :class:`~rayrcm.errors.ConfigError` s that name
the dotted key. Nothing here knows a registry, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from rayrcm.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")  # the dataclass update_dataclass returns, updated


def _parse_scalar(key: str, raw: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_scalar(key, raw, inner[0])
    if origin is tuple:
        return tuple(_parse_scalar(key, p.strip(), args[0]) for p in raw.split(",") if p.strip())
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            value = float(raw)
        else:
            return raw
    except ValueError:
        raise ConfigError(key, raw, f"expected a value of type {typ.__name__}") from None
    return _finite(key, value)


FINITE = "must be a finite number"


def _finite(key: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(key, value, FINITE)
    return value


def _optional_inner(typ: Any) -> Any:
    """``X`` of ``X | None`` / ``Optional[X]``; ``typ`` itself otherwise."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in typing.get_args(typ) if a is not type(None)]
        return inner[0] if len(inner) == 1 else typ
    return typ


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML/Python value (or a string from the command line) to the field's type.

    Numbers must be finite (no NaN or infinity) and ``true``/``false`` is not a number."""
    if isinstance(value, str):
        return _parse_scalar(key, value, typ)
    if value is None:
        return value
    typ = _optional_inner(typ)
    origin = typing.get_origin(typ)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(typ)
        elem = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        if elem in (int, float):
            for v in value:
                coerce(key, v, elem)  # checks each element; the values are kept as given
        return tuple(value)
    if typ in (int, float) and isinstance(value, bool):
        raise ConfigError(key, value, f"expected a number ({typ.__name__}), not true/false")
    if typ in (int, float, bool, str) and isinstance(value, (list, tuple, dict)):
        what = "a mapping" if isinstance(value, dict) else "a list"
        raise ConfigError(key, value, f"expected a single value of type {typ.__name__}, not {what}")
    if typ is int and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(key, value, "expected a whole number (int)")
        return int(value)
    if typ is float and isinstance(value, (int, float)):
        return _finite(key, float(value))
    return value


def check_finite(obj: Any, prefix: str = "") -> None:
    """Every float of the dataclass ``obj`` (nested sections and tuples of floats included) is
    finite; a one-line :class:`ConfigError` naming the dotted key otherwise."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value) and not isinstance(value, type):
            check_finite(value, key + ".")
        elif isinstance(value, float):
            _finite(key, value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(key, tuple(value), FINITE)


def update_dataclass(obj: D, tree: dict[str, Any], prefix: str = "") -> D:
    """``obj`` with ``tree`` applied: nested mappings go into nested dataclass fields; unknown keys
    and badly typed values raise a one-line :class:`ConfigError` naming the dotted key."""
    hints = typing.get_type_hints(type(obj))
    current = {f.name: getattr(obj, f.name) for f in fields(obj)}
    changes = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in current:
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(dotted, value, f"unknown key; {where} has: {', '.join(sorted(current))}")
        if is_dataclass(current[key]):
            if not isinstance(value, dict):
                raise ConfigError(dotted, value, "is a section; set its keys, e.g. " + f"{dotted}.<key>=...")
            changes[key] = update_dataclass(current[key], value, dotted + ".")
        else:
            changes[key] = coerce(dotted, value, hints[key])
    return replace(obj, **changes)


def parse_dotted(items: list[str], *, min_depth: int = 1) -> dict[str, Any]:
    """``["a.b=1", "c=2"]`` -> ``{"a": {"b": "1"}, "c": "2"}`` (any depth >= ``min_depth``)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or len(parts) < min_depth:
            shape = "section.key=value" if min_depth > 1 else "key=value or section.key=value"
            raise ConfigError(item, item, f"overrides look like {shape}")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, value, "mixes a section and a value")
        node[parts[-1]] = value
    return tree


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten to ``{"optim.lr": 0.001, ...}`` (MLflow params, Ray Train config)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(to_flat_dict(value, key + "."))
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a dataclass of sections."""
    return {f.name: dataclasses.asdict(getattr(cfg, f.name)) if is_dataclass(getattr(cfg, f.name)) else getattr(cfg, f.name)
            for f in fields(cfg)}
