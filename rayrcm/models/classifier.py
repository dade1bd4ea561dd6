"""The classifier that is trained, attacked and certified: ``normalize -> encoder -> head``.

Normalization is the first layer, so the classifier takes [0, 1] pixels and every noise level,
attack budget and certified radius is in pixel units.

The features the head sees: the encoder's ``forward_features`` with its final norm (``final_norm``,
the default) or, for a ViT, the CLS token before that norm (``final_norm=False``). This is the RCM
authors' fine-tuning flag ``layernorm`` (``rrcm_tune.py``, ``reload_forward``): True applies the
*pretrained* final LayerNorm to the CLS token, False feeds the head the raw CLS token. With the head
frozen (consistency fine-tuning), the feature scale is the logit scale, so the two differ in
training, not only in parametrisation. ``layernorm=True`` adds a further, freshly initialised
LayerNorm before the head (rayrcm's older reading of that flag; kept so files trained with it load).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rayrcm.errors import ConfigError
from rayrcm.models.encoders import Encoder, build_encoder
from rayrcm.sections import ModelConfig


class Normalize(nn.Module):
    """``(x - mean) / std * scale``; the default maps [0, 1] pixels to [-1, 1]."""

    def __init__(self, mean: float = 0.5, std: float = 0.5, scale: float = 1.0) -> None:
        super().__init__()
        self.std_value = std
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("inv_std", torch.tensor(scale / std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class Classifier(nn.Module):
    """``logits = head(norm(encoder(normalize(x))))`` for ``x`` ``(B, 3, H, W)`` in [0, 1] (see the module docstring)."""

    def __init__(self, encoder: Encoder, num_classes: int, *, hidden_dim: int = 0, layernorm: bool = False, input_scale: float = 1.0,
                 final_norm: bool = True) -> None:
        super().__init__()
        if not final_norm and not encoder.has_final_norm:
            raise ConfigError("model.final_norm", final_norm, "only encoders with a final norm (ViTs) can leave it out")
        self.final_norm = final_norm
        d = encoder.num_features
        self.normalize = Normalize(scale=input_scale)
        self.encoder = encoder
        self.norm = nn.LayerNorm(d) if layernorm else nn.Identity()
        if hidden_dim:
            self.head: nn.Module = nn.Sequential(nn.Linear(d, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_classes))
        else:
            self.head = nn.Linear(d, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder.forward_features(self.normalize(x), final_norm=self.final_norm)))


def load_encoder_file(encoder: Encoder, path: str | Path, expected_encoder: str) -> None:
    """Load encoder weights from a rayrcm checkpoint file (``weights_only=True``, ``strict=True``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("model.init_from", str(path), "no such checkpoint file")
    from rayrcm.data.safe_pickle import load_weights_file

    blob = load_weights_file(p, "model.init_from")
    state = blob.get("model", blob) if isinstance(blob, dict) else blob
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    saved = meta.get("encoder")
    if saved and saved != expected_encoder:
        raise ConfigError("model.init_from", str(path), f"holds encoder {saved!r}, but model.encoder is {expected_encoder!r}")
    if any(k.startswith("encoder.") for k in state):  # a whole classifier: keep its encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError("model.init_from", str(path), f"does not match encoder {expected_encoder!r} ({first})") from None


def check_encoder_file(path: str | Path, cfg: ModelConfig, image_size: int) -> None:
    """Fail early (before any cluster work) when ``path`` does not fit ``cfg.encoder``."""
    load_encoder_file(build_encoder(cfg, image_size), path, cfg.encoder)


def build_classifier(cfg: ModelConfig, image_size: int, num_classes: int) -> Classifier:
    """A fresh classifier; ``cfg.init_from`` (a local file by now) initializes the encoder."""
    encoder = build_encoder(cfg, image_size)
    if cfg.init_from:
        load_encoder_file(encoder, cfg.init_from, cfg.encoder)
    return classifier_for(cfg, encoder, num_classes)


def classifier_for(cfg: ModelConfig, encoder: Encoder, num_classes: int) -> Classifier:
    """The classifier of model config ``cfg`` around ``encoder`` (fresh head): training and rebuilding
    an exported file both build through here."""
    return Classifier(encoder, num_classes, hidden_dim=cfg.head_hidden_dim, layernorm=cfg.layernorm,
                      input_scale=cfg.input_scale, final_norm=cfg.final_norm)
