"""Randomized-smoothing certification (pure PyTorch + scipy/statsmodels; no Ray, no MLflow).

Importing the package does not import torch (the command line reads the sampling modes' flags from
it): the device half (:class:`Smoother`, :func:`certify`, :func:`predict`) loads on first use."""

from typing import TYPE_CHECKING, Any

from rayrcm.certify.iss import SampleSizePlan, certify_iss
from rayrcm.certify.protocol import (
    CertifyConfig,
    ComputeConfig,
    SmoothingConfig,
    select_indices,
    validate_certify,
)
from rayrcm.certify.rows import ESTIMATION, PREDICTION, SELECTION, Row, noise_seed, plan_rows
from rayrcm.certify.stats import (
    ABSTAIN,
    Certificate,
    Prediction,
    certified_radius,
    certify_from_counts,
    lower_confidence_bound,
    max_certifiable_radius,
    predict_from_counts,
)

if TYPE_CHECKING:
    from rayrcm.certify.smoothing import Smoother, certify, predict

_DEVICE = ("Smoother", "certify", "predict")  # from rayrcm.certify.smoothing, imported on first use


def __getattr__(name: str) -> Any:
    if name in _DEVICE:
        from rayrcm.certify import smoothing

        return getattr(smoothing, name)
    raise AttributeError(f"module 'rayrcm.certify' has no attribute {name!r}")


__all__ = [
    "ABSTAIN", "ESTIMATION", "PREDICTION", "SELECTION", "Certificate", "CertifyConfig", "ComputeConfig", "Prediction", "Row",
    "SampleSizePlan", "SmoothingConfig", "Smoother", "certified_radius", "certify", "certify_from_counts", "certify_iss",
    "lower_confidence_bound", "max_certifiable_radius", "noise_seed", "plan_rows", "predict", "predict_from_counts", "select_indices", "validate_certify",
]
