"""Encoders (registered by name), heads, the classifier that is certified, and EMA copies."""

from rayrcm.models.classifier import Classifier, Normalize, build_classifier
from rayrcm.models.ema import ema_update, make_frozen_copy
from rayrcm.models.encoders import ENCODERS, Encoder, build_encoder
from rayrcm.models.heads import ProjectionHead

__all__ = [
    "ENCODERS",
    "Classifier",
    "Encoder",
    "Normalize",
    "ProjectionHead",
    "build_classifier",
    "build_encoder",
    "ema_update",
    "make_frozen_copy",
]
