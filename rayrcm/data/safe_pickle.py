"""A restricted unpickler for data files (CIFAR batches and meta files).

``pickle.load`` runs whatever callable a file names, so a crafted data file on a shared file
system would run code on every node that reads it. :func:`load_data_pickle` admits only the plain
types such files hold (dict, list, tuple, str, bytes, numbers, bools, None) and the few globals
numpy needs to rebuild an ndarray, its dtype or a numpy scalar. Anything else, and any damaged or
truncated file, is refused with one :class:`~rayrcm.errors.ConfigError` line naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from rayrcm.errors import ConfigError


def _numpy_core() -> Any:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (``latin1`` only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only admitted as encode(str, 'latin1')")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core", "numpy._core"):  # files written under numpy 1.x or 2.x
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _DataUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _DataUnpickler._allowed is None:
            _DataUnpickler._allowed = _allowed_globals()
        try:
            return _DataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def load_data_pickle(path: str | Path, *, what: str = "data file") -> Any:
    """Unpickle ``path`` (latin1 for Python 2 strings, as CIFAR's own files need) through the
    restricted unpickler; one :class:`ConfigError` line naming the file on any failure."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as err:
        raise ConfigError(what, str(path), f"cannot read it ({err.strerror or type(err).__name__})") from None
    try:
        with f:
            return _DataUnpickler(f, encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - a damaged file can raise nearly anything
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(what, str(path), f"not a plain-data pickle or damaged/truncated ({reason}); "
                          "only dicts, lists, str, bytes, numbers and numpy arrays are allowed") from None


def load_weights_file(path: str | Path, key: str = "model") -> Any:
    """A ``torch.save`` file read with ``weights_only=True`` (tensors and plain containers; a file
    that names any other callable never runs it). A missing, empty, truncated, non-torch or
    code-carrying file is one :class:`~rayrcm.errors.ConfigError` line naming it under ``key``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(key, str(path), "no such file")
    if p.stat().st_size == 0:
        raise ConfigError(key, str(path), "is an empty file, not a model file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's weights-only refusal, a paragraph: keep its one fact
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(skip)]
        detail = (lines[0] if lines else type(err).__name__).replace("WeightsUnpickler error: ", "")[:160]
        if "GLOBAL" in detail:
            raise ConfigError(key, str(path), f"names code to run; refused without running it ({detail})") from None
        raise ConfigError(key, str(path), f"is not a model file ({detail})") from None
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: one line, not torch's traceback
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ConfigError(key, str(path), f"is not a readable model file ({type(err).__name__}: {first.strip()[:160]})") from None
