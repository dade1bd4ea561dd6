"""What a certification sampling mode is: everything the job, its actors and the command line ask of
``smoothing.sampling``, in one object (an entry of :data:`rayrcm.certify.sampling.SAMPLING_MODES`).

A mode decides how many draws an image gets and what is certified from them. It knows

* its config: the job modes it serves (``modes``), its own checks (:meth:`~SamplingMode.check`),
  the refusal of its own keys under another mode (:meth:`~SamplingMode.refuse`), its command-line
  flags (``flags``, :meth:`~SamplingMode.check_flags`);
* what it records: its protocol keys (:meth:`~SamplingMode.protocol`, ``protocol_keys``) and its
  part of the default job name (:meth:`~SamplingMode.name_parts`);
* what the job says: the draws (:meth:`~SamplingMode.draws`, :meth:`~SamplingMode.note`), the radii
  decided (:meth:`~SamplingMode.grid`), the largest radius it can certify (:meth:`~SamplingMode.reach`)
  and why (:meth:`~SamplingMode.reach_note`, :meth:`~SamplingMode.reach_warnings`);
* the work: the rows of an image (:meth:`~SamplingMode.rows`), what a counting actor does with a
  batch of them (:meth:`~SamplingMode.count`), how the driver adds a delivered row to its image's
  totals (:meth:`~SamplingMode.add`) and the image's results row once all are in
  (:meth:`~SamplingMode.record`).

The defaults are those of the fixed protocol (Cohen et al.); pure (no Ray, no MLflow, no torch at import).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rayrcm.certify.stats import lower_confidence_bound, max_certifiable_radius
from rayrcm.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from rayrcm.certify.config import CertifyConfig, SmoothingConfig
    from rayrcm.certify.smoothing import Smoother

Batch = dict[str, np.ndarray]  # a batch of rows (Ray Data's numpy format): one array per column


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """A one-line :class:`~rayrcm.errors.ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, allowed)


@dataclass(frozen=True)
class Flag:
    """A ``rayrcm certify`` flag of one mode: ``--<name>`` (underscores as dashes) sets config ``key``."""

    name: str
    key: str
    help: str
    # given with another mode, the command line refuses it; False: the config check does (the key's default says unset)
    refused_elsewhere: bool = True


class Counter(Protocol):
    """What a counting actor (:class:`~rayrcm.orchestration.certify_actor.CountActor`) hands a mode."""

    sm: Smoother  # the base classifier under noise, on the actor's device
    images: torch.Tensor  # uint8 (K, C, H, W): the job's images still to do (a row's ``pos`` indexes them)
    settings: Any  # rayrcm.certify.collect.CountSettings
    device_name: str


class SamplingMode(ABC):
    """One sampling mode (see the module docstring); subclasses override what differs from the fixed protocol."""

    name = ""  # its smoothing.sampling value (and registry name)
    title = ""  # in messages: "<title> sampling is for certify, not predict"
    help = ""  # its part of the --sampling help
    modes: tuple[str, ...] = ("certify", "predict")  # the job modes it serves
    flags: tuple[Flag, ...] = ()
    protocol_keys: tuple[str, ...] = ()  # the protocol keys only this mode records (a protocol of another mode lacks them)

    # ------------------------------------------------------------------ the config
    def check(self, cfg: CertifyConfig) -> None:
        """This mode's own checks when ``cfg`` samples with it (one-line ConfigErrors)."""
        return None

    def refuse(self, cfg: CertifyConfig) -> None:
        """Refuse this mode's own keys when ``cfg`` samples with another mode."""
        return None

    def check_flags(self, given: Mapping[str, Any]) -> None:
        """Refuse a contradiction among the command-line flags ``given`` (flag -> value, the flags set)."""
        return None

    # ------------------------------------------------------------------ what is recorded
    def protocol(self, cfg: CertifyConfig) -> dict[str, Any]:
        """The protocol keys this mode adds (or sets) beyond the common ones."""
        return {}

    def name_parts(self, s: SmoothingConfig) -> list[str]:
        """Its parts of the default job name (a job of another mode never resumes into this one's folder)."""
        return []

    # ------------------------------------------------------------------ what the job says
    def draws(self, s: SmoothingConfig) -> str:
        return f"n0={s.n0}, n={s.n}"

    def note(self, s: SmoothingConfig) -> str:
        """Said after alpha in the job's first line ("" for nothing)."""
        return ""

    def grid(self, s: SmoothingConfig) -> tuple[float, ...] | None:
        """The radii decided per image, or None: every radius up to the reach is measured."""
        return None

    def reach(self, s: SmoothingConfig) -> float:
        """The largest radius a certification can report."""
        return max_certifiable_radius(s.n, s.alpha, s.sigma)

    def reach_note(self, s: SmoothingConfig, reach: float) -> str:
        """One line saying where the table stops and why."""
        return (f"[rayrcm] with n={s.n}, alpha={s.alpha:g} no radius can exceed sigma * Phi^-1(alpha^(1/n)) = {reach:.3f} "
                f"(sigma={s.sigma:g}): radii beyond it are not reported")

    def reach_warnings(self, s: SmoothingConfig) -> list[str]:
        """What a certification's settings cannot reach, said before any draw: every image abstains when
        even n successes in n draws do not bound p_A above 1/2."""
        if lower_confidence_bound(s.n, s.n, s.alpha) > 0.5:
            return []
        need = math.floor(math.log2(1 / s.alpha)) + 1  # alpha^(1/n) > 1/2
        return [f"with smoothing.n={s.n} and alpha={s.alpha:g} every image abstains: even {s.n} successes in {s.n} draws "
                f"do not bound p_A above 1/2 (that takes n >= {need} at this alpha); raise smoothing.n or alpha"]

    # ------------------------------------------------------------------ the work
    def settings(self, cfg: CertifyConfig) -> dict[str, Any]:
        """The :class:`~rayrcm.certify.collect.CountSettings` fields this mode sets (built once, on the driver)."""
        return {}

    def images_per_call(self, cfg: CertifyConfig, rows: int) -> int:
        """How many rows a counting actor takes per call (of ``rows`` rows in all)."""
        return 1

    @abstractmethod
    def roles(self, cfg: CertifyConfig) -> dict[int, int]:
        """The roles whose per-class counts an image's totals sum, with their draws."""

    @abstractmethod
    def rows(self, cfg: CertifyConfig, todo: Sequence[int], labels: Any) -> list[dict[str, Any]]:
        """The rows of work ``{pos, index, role, chunk, num, ...}`` of the images ``todo`` (``pos`` into it)."""

    @abstractmethod
    def count(self, counter: Counter, batch: Batch) -> Batch:
        """What a counting actor returns for a batch of rows: ``pos role chunk num seconds device`` per row and
        this mode's results (``counts``, ...)."""

    @abstractmethod
    def add(self, totals: dict[Any, Any], row: dict[str, Any]) -> None:
        """Add one delivered row to its image's ``totals`` (role -> per-class counts, pre-filled with zeros)."""

    @abstractmethod
    def record(self, cfg: CertifyConfig, totals: dict[Any, Any], label: int) -> dict[str, Any]:
        """The image's results (``predict``, ``radius``, ...) from its totals once every row is in."""
