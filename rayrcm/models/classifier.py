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

``model.input_resize = S`` resizes the [0, 1] input to ``S x S`` first, as the FT-CADIS authors
upsample CIFAR-10 32 -> 224 and ImageNet to 384 (``classifier.py:61, 93``; certification
``architecture.py:121, 189``)::

    x -> F.interpolate(x, (S, S), mode="bicubic", antialias=True)   (align_corners=False, no clamp)

and the encoder is built for ``S`` px (a ViT's patch grid follows). The authors resize the
[-1, 1] image; resizing [0, 1] pixels before normalization is the same map (interpolation is linear
and its weights sum to 1), to float rounding. The input (noise, attacks, certified radii) stays at
the data's size. ``model.lora_rank`` puts LoRA on the encoder (:mod:`rayrcm.models.lora`).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from rayrcm.errors import ConfigError
from rayrcm.models.encoders import Encoder, build_encoder
from rayrcm.sections import ModelConfig


def resize_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` resized to ``(B, C, size, size)``, bicubic with antialiasing, as the FT-CADIS
    authors (``classifier.py:61``); the identity when ``x`` already has that size. Half-precision
    inputs are resized in float32 (torch has no bfloat16 antialiased bicubic on the CPU)."""
    if x.shape[-2:] == (size, size):
        return x
    low = x.dtype in (torch.float16, torch.bfloat16)
    out = F.interpolate(x.float() if low else x, (size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.to(x.dtype) if low else out


class Normalize(nn.Module):
    """``(resize(x) - mean) / std * scale``; the default maps [0, 1] pixels to [-1, 1]; ``resize``
    (``model.input_resize``, 0 = off) is :func:`resize_input`."""

    mean: torch.Tensor  # buffers
    inv_std: torch.Tensor

    def __init__(self, mean: float = 0.5, std: float = 0.5, scale: float = 1.0, resize: int = 0) -> None:
        super().__init__()
        self.std_value = std
        self.resize = int(resize)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("inv_std", torch.tensor(scale / std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            x = resize_input(x, self.resize)
        return (x - self.mean) * self.inv_std


class Classifier(nn.Module):
    """``logits = head(norm(encoder(normalize(x))))`` for ``x`` ``(B, 3, H, W)`` in [0, 1] (see the module docstring)."""

    def __init__(self, encoder: Encoder, num_classes: int, *, hidden_dim: int = 0, layernorm: bool = False, input_scale: float = 1.0,
                 final_norm: bool = True, input_resize: int = 0) -> None:
        super().__init__()
        if not final_norm and not encoder.has_final_norm:
            raise ConfigError("model.final_norm", final_norm, "only encoders with a final norm (ViTs) can leave it out")
        self.final_norm = final_norm
        d = encoder.num_features
        self.normalize = Normalize(scale=input_scale, resize=input_resize)  # the resize too (model.input_resize)
        self.encoder = encoder
        self.norm = nn.LayerNorm(d) if layernorm else nn.Identity()
        if hidden_dim:
            self.head: nn.Module = nn.Sequential(nn.Linear(d, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_classes))
        else:
            self.head = nn.Linear(d, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.head(self.norm(self.encoder.forward_features(self.normalize(x), final_norm=self.final_norm))))


def load_encoder_file(encoder: Encoder, path: str | Path, expected_encoder: str) -> dict[str, torch.Tensor]:
    """Load encoder weights (``weights_only=True``, ``strict=True``) from a rayrcm model or checkpoint
    file, or from a plain ``state_dict`` of the timm model ``model.encoder`` names (an off-the-shelf
    classifier saved with ``torch.save(model.state_dict(), path)``). Returns that file's ``head.*``
    weights (empty for rayrcm files), which :func:`build_classifier` keeps when they fit its head."""
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
    head: dict[str, torch.Tensor] = {}
    if state and not any(k.startswith(("model.", "encoder.")) for k in state):  # a plain timm model's state_dict
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        state = {f"model.{k}": v for k, v in state.items() if not k.startswith("head.")}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError("model.init_from", str(path), f"does not match encoder {expected_encoder!r} ({first})") from None
    return head


def encoder_image_size(cfg: ModelConfig, image_size: int) -> int:
    """The size a classifier's encoder sees: ``model.input_resize`` if set, else the data's ``image_size``."""
    return cfg.input_resize or image_size


def check_encoder_file(path: str | Path, cfg: ModelConfig, image_size: int) -> None:
    """Fail early (before any cluster work) when ``path`` does not fit ``cfg.encoder``."""
    load_encoder_file(build_encoder(cfg, encoder_image_size(cfg, image_size)), path, cfg.encoder)


def build_classifier(cfg: ModelConfig, image_size: int, num_classes: int) -> Classifier:
    """A fresh classifier for ``image_size`` px inputs; ``cfg.init_from`` (a local file by now)
    initializes the encoder (built for ``model.input_resize`` px when set), and the head too when it
    is a plain timm classifier's ``state_dict`` whose head has this shape."""
    encoder = build_encoder(cfg, encoder_image_size(cfg, image_size))
    head = load_encoder_file(encoder, cfg.init_from, cfg.encoder) if cfg.init_from else {}
    clf = classifier_for(cfg, encoder, num_classes)
    fits = isinstance(clf.head, nn.Linear) and {k: v.shape for k, v in head.items()} == \
        {k: v.shape for k, v in clf.head.state_dict().items()}
    if fits:  # an off-the-shelf timm classifier of these classes keeps its head (FT-CADIS fine-tunes it)
        clf.head.load_state_dict(head, strict=True)
    return clf


def classifier_for(cfg: ModelConfig, encoder: Encoder, num_classes: int) -> Classifier:
    """The classifier of model config ``cfg`` around ``encoder`` (fresh head): training and rebuilding
    an exported file both build through here."""
    return Classifier(encoder, num_classes, hidden_dim=cfg.head_hidden_dim, layernorm=cfg.layernorm,
                      input_scale=cfg.input_scale, final_norm=cfg.final_norm, input_resize=cfg.input_resize)
