"""Randomized-smoothing certification (pure PyTorch + scipy/statsmodels; no Ray, no MLflow)."""

from rayrcm.certify.iss import SampleSizePlan, certify_iss
from rayrcm.certify.protocol import (
    CertifyConfig,
    ComputeConfig,
    SmoothingConfig,
    select_indices,
    validate_certify,
)
from rayrcm.certify.smoothing import (
    ESTIMATION,
    PREDICTION,
    SELECTION,
    Row,
    Smoother,
    certify,
    noise_seed,
    plan_rows,
    predict,
)
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

__all__ = [
    "ABSTAIN", "ESTIMATION", "PREDICTION", "SELECTION", "Certificate", "CertifyConfig", "ComputeConfig", "Prediction", "Row",
    "SampleSizePlan", "SmoothingConfig", "Smoother", "certified_radius", "certify", "certify_from_counts", "certify_iss",
    "lower_confidence_bound", "max_certifiable_radius", "noise_seed", "plan_rows", "predict", "predict_from_counts", "select_indices", "validate_certify",
]
