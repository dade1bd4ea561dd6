"""Encoders (registered by name), heads, the classifier that is certified, and EMA copies."""

from rayrcm.models.classifier import Classifier, Normalize, build_classifier
from rayrcm.models.dual_bn import (
    DualBatchNorm,
    bn_route,
    branch_view,
    convert_dual_bn,
    single_bn_state,
)
from rayrcm.models.ema import ema_update, make_frozen_copy
from rayrcm.models.encoders import ENCODERS, Encoder, build_encoder
from rayrcm.models.heads import ACLProjector, MoCoV3Projector

__all__ = [
    "ACLProjector",
    "MoCoV3Projector",
    "DualBatchNorm",
    "bn_route",
    "branch_view",
    "convert_dual_bn",
    "single_bn_state",
    "ENCODERS",
    "Classifier",
    "Encoder",
    "Normalize",
    "build_classifier",
    "build_encoder",
    "ema_update",
    "make_frozen_copy",
]
