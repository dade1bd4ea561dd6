"""Encoder registry. Every encoder maps ``(B, 3, H, W)`` normalized images to ``(B, D)`` features.

Interface (timm's, reduced): ``forward_features(x) -> (B, num_features)``. ViTs pool the CLS token
after the final norm; ``forward_features(x, final_norm=False)`` gives the CLS token before it (the RCM
authors' fine-tuning with ``layernorm=False``). No pretrained weights are ever fetched
(``pretrained=False`` always).

ViT options (``model.init``, ``model.freeze_patch_embed``), as the RCM authors' ``rRCMViT``
(``rrcm/vit.py``) for ImageNet: ``init="mocov3"`` is their ``moco_init_weights`` (MoCo v3's): every
Linear xavier-uniform, except ``qkv`` whose Q, K and V are each xavier-uniform as ``(D, D)`` matrices,
i.e. ``U(+-sqrt(6 / (D + D)))``; the patch embedding ``U(+-sqrt(6 / (3 p^2 + D)))``; all biases 0.
LayerNorms (1, 0), the CLS token (``N(0, 1e-6^2)``) and the position embedding
(``trunc_normal(std=0.02)``) are initialised as timm and the authors do. ``freeze_patch_embed``
is their ``stop_grad_conv1``: the patch projection keeps its initial weights. ``init="timm"`` is
timm's default ViT init.

Sizes: ``rcm_b`` = ViT-B (768 wide, 12 layers, 12 heads), ``rcm_s`` = 512 wide, 6 layers, 8 heads
(the RCM paper's RCM-S, not timm's ViT-S); patch 16 at 224 px and 4 at 32 px unless
``model.patch_size`` says otherwise. ``vit_digits`` is a 128-wide, 4-layer ViT for the quickstart.
``image_size`` is the size the encoder sees: a classifier with ``model.input_resize`` builds its
encoder (the ViT patch grid and position embedding) for the resized size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from rayrcm.errors import ConfigError
from rayrcm.registry import Registry
from rayrcm.sections import ModelConfig

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


class Encoder(nn.Module):
    """Wraps a feature extractor with ``num_features`` and ``forward_features``."""

    has_final_norm = False  # True: forward_features(x, final_norm=False) skips a final norm layer

    def __init__(self, model: nn.Module, num_features: int) -> None:
        super().__init__()
        self.model = model
        self.num_features = num_features

    def forward_features(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        if not final_norm:
            raise ValueError(f"{type(self.model).__name__} has no final norm to leave out")
        return cast(torch.Tensor, self.model(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


Builder = Callable[[ModelConfig, int], Encoder]
ENCODERS: Registry[Builder] = Registry("encoder")


def build_encoder(cfg: ModelConfig, image_size: int) -> Encoder:
    """The encoder ``cfg.encoder`` for ``image_size`` px inputs; ``cfg.lora_rank > 0`` freezes a ViT and
    adds LoRA to the q and v of every block (:mod:`rayrcm.models.lora`)."""
    encoder = ENCODERS.get(cfg.encoder)(cfg, image_size)
    if cfg.lora_rank:
        if not isinstance(encoder, ViTEncoder):
            raise ConfigError("model.lora_rank", cfg.lora_rank,
                              f"only ViT encoders take LoRA ({cfg.encoder!r} is not one)")
        from rayrcm.models.lora import apply_lora

        apply_lora(encoder.model, cfg.lora_rank, cfg.lora_alpha)
    return encoder


class ViTEncoder(Encoder):
    """A timm ``VisionTransformer`` (``num_classes=0``, CLS-token pooling): ``(B, 3, H, W) -> (B, D)``."""

    has_final_norm = True

    def forward_features(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        if final_norm:
            return cast(torch.Tensor, self.model(x))  # timm: blocks -> norm -> CLS token
        v = cast("VisionTransformer", self.model)  # timm's forward_features without its final norm, then the CLS token
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        return cast(torch.Tensor, v.blocks(x)[:, 0])


@torch.no_grad()
def mocov3_init_(vit: VisionTransformer) -> None:
    """The RCM authors' ``rRCMViT.moco_init_weights`` (MoCo v3's ViT init) on a timm ViT, in place."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # Q, K and V as three separate (D, D) matrices
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = vit.patch_embed.proj
    val = math.sqrt(6.0 / float(3 * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -val, val)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def _vit_encoder(vit: VisionTransformer, cfg: ModelConfig) -> ViTEncoder:
    """``vit`` with the config's ViT options: MoCo v3's init, a frozen patch embedding."""
    if cfg.init == "mocov3":
        mocov3_init_(vit)
    if cfg.freeze_patch_embed:
        for p in vit.patch_embed.parameters():
            p.requires_grad_(False)
    return ViTEncoder(vit, vit.num_features)


def _vit(width: int, depth: int, heads: int) -> Builder:
    def build(cfg: ModelConfig, image_size: int) -> Encoder:
        from timm.models.vision_transformer import VisionTransformer

        patch = cfg.patch_size or (16 if image_size >= 128 else 4)
        vit = VisionTransformer(
            img_size=image_size,
            patch_size=patch,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            num_classes=0,
            global_pool="token",
            qkv_bias=False,  # as in the RCM authors' ViT
        )
        return _vit_encoder(vit, cfg)

    return build


def _vit_only(cfg: ModelConfig) -> None:
    if cfg.init != "timm":
        raise ConfigError("model.init", cfg.init, f"only ViT encoders take a ViT init ({cfg.encoder!r} is not one)")
    if cfg.freeze_patch_embed:
        raise ConfigError("model.freeze_patch_embed", True, f"only ViT encoders have a patch embedding ({cfg.encoder!r} is not one)")


ENCODERS.register("rcm_b")(_vit(768, 12, 12))
ENCODERS.register("rcm_s")(_vit(512, 6, 8))
ENCODERS.register("vit_digits")(_vit(128, 4, 4))


def _timm_vit(name: str) -> Builder:
    """A standard timm ViT by its timm name, architecture only (``pretrained=False``: nothing is
    downloaded): the backbone of an off-the-shelf classifier whose weights the user holds, e.g.
    FT-CADIS's ``vit_base_patch16_clip_384`` (``architecture.py:164``) or the ViT-B/16 with qkv bias
    of its CIFAR-10 classifier (``architecture.py:102``), loaded with ``model.init_from``."""

    def build(cfg: ModelConfig, image_size: int) -> Encoder:
        import timm

        vit = cast("VisionTransformer", timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size))
        patch = vit.patch_embed.patch_size[0]
        if cfg.patch_size not in (0, patch):
            raise ConfigError("model.patch_size", cfg.patch_size, f"{name} has {patch} px patches (0 or {patch})")
        return _vit_encoder(vit, cfg)

    return build


ENCODERS.register("vit_base_patch16_224")(_timm_vit("vit_base_patch16_224"))  # timm's ViT-B/16 (qkv bias)
ENCODERS.register("vit_base_patch16_clip_384")(_timm_vit("vit_base_patch16_clip_384"))  # CLIP ViT-B/16, pre-norm


def _timm_resnet(name: str) -> Builder:
    def build(cfg: ModelConfig, image_size: int) -> Encoder:
        import timm

        _vit_only(cfg)
        net = timm.create_model(name, pretrained=False, num_classes=0)
        if image_size <= 64:  # CIFAR-style stem: 3x3 conv, stride 1, no max-pool
            net.conv1 = nn.Conv2d(3, cast(nn.Conv2d, net.conv1).out_channels, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        return Encoder(net, cast(int, net.num_features))

    return build


ENCODERS.register("resnet18")(_timm_resnet("resnet18"))
ENCODERS.register("resnet50")(_timm_resnet("resnet50"))


def _cifar_net(kind: str, depth: int) -> Builder:
    def build(cfg: ModelConfig, image_size: int) -> Encoder:
        from rayrcm.models.cifar_nets import cifar_resnet, wide_resnet

        _vit_only(cfg)
        net = cifar_resnet(depth) if kind == "resnet" else wide_resnet(depth, 10)
        return Encoder(net, net.num_features)

    return build


ENCODERS.register("cifar_resnet110")(_cifar_net("resnet", 110))
ENCODERS.register("cifar_resnet20")(_cifar_net("resnet", 20))  # small BatchNorm nets for the digits recipes
ENCODERS.register("cifar_resnet8")(_cifar_net("resnet", 8))
ENCODERS.register("wrn28_10")(_cifar_net("wrn", 28))
