"""Sampling-mode registry: one module per mode, one line here per mode.

A mode (``smoothing.sampling``, ``rayrcm certify --sampling``) is a :class:`~rayrcm.certify.sampling.base.SamplingMode`:
its config checks, its protocol keys and job-name parts, its command-line flags, the rows of an image, what a
counting actor does with them and how the driver turns an image's rows into its results row. The job (its
actors, its preparation, its report) and the command line ask the entry named by ``smoothing.sampling``.
"""

from __future__ import annotations

from rayrcm.certify.sampling import fixed, iss, sequential
from rayrcm.certify.sampling.base import Flag, SamplingMode
from rayrcm.registry import Registry

SAMPLING_MODES: Registry[SamplingMode] = Registry("sampling")
SAMPLING_MODES.register("fixed")(fixed.FixedSampling())
SAMPLING_MODES.register("iss")(iss.InputSpecificSampling())
SAMPLING_MODES.register("sequential")(sequential.SequentialSampling())


def sampling_mode(name: str) -> SamplingMode:
    """The entry of sampling mode ``name`` (``smoothing.sampling``)."""
    return SAMPLING_MODES.get(name)


def mode_flags() -> list[tuple[str, Flag]]:
    """Every mode's command-line flags, ``(mode name, flag)``, in registry order."""
    return [(name, flag) for name in SAMPLING_MODES for flag in SAMPLING_MODES.get(name).flags]


__all__ = ["SAMPLING_MODES", "Flag", "SamplingMode", "mode_flags", "sampling_mode"]
