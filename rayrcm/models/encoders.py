"""Encoder registry. Every encoder maps ``(B, 3, H, W)`` normalized images to ``(B, D)`` features.

Interface (timm's, reduced): ``forward_features(x) -> (B, num_features)``. ViTs pool the CLS token
after the final norm. No pretrained weights are ever fetched (``pretrained=False`` always).

Sizes: ``rcm_b`` = ViT-B (768 wide, 12 layers, 12 heads), ``rcm_s`` = 512 wide, 6 layers, 8 heads
(the RCM paper's RCM-S, not timm's ViT-S); patch 16 at 224 px and 4 at 32 px unless
``model.patch_size`` says otherwise. ``vit_digits`` is a 128-wide, 4-layer ViT for the quickstart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rayrcm.registry import Registry
from rayrcm.sections import ModelConfig


class Encoder(nn.Module):
    """Wraps a feature extractor with ``num_features`` and ``forward_features``."""

    def __init__(self, model: nn.Module, num_features: int) -> None:
        super().__init__()
        self.model = model
        self.num_features = num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


Builder = Callable[[ModelConfig, int], Encoder]
ENCODERS: Registry[Builder] = Registry("encoder")


def build_encoder(cfg: ModelConfig, image_size: int) -> Encoder:
    return ENCODERS.get(cfg.encoder)(cfg, image_size)


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
        return Encoder(vit, vit.num_features)

    return build


ENCODERS.register("rcm_b")(_vit(768, 12, 12))
ENCODERS.register("rcm_s")(_vit(512, 6, 8))
ENCODERS.register("vit_digits")(_vit(128, 4, 4))


def _timm_resnet(name: str) -> Builder:
    def build(cfg: ModelConfig, image_size: int) -> Encoder:
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=0)
        if image_size <= 64:  # CIFAR-style stem: 3x3 conv, stride 1, no max-pool
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        return Encoder(net, net.num_features)

    return build


ENCODERS.register("resnet18")(_timm_resnet("resnet18"))
ENCODERS.register("resnet50")(_timm_resnet("resnet50"))


def _cifar_net(kind: str, depth: int) -> Builder:
    def build(cfg: ModelConfig, image_size: int) -> Encoder:
        from rayrcm.models.cifar_nets import cifar_resnet, wide_resnet

        net = cifar_resnet(depth) if kind == "resnet" else wide_resnet(depth, 10)
        return Encoder(net, net.num_features)

    return build


ENCODERS.register("cifar_resnet110")(_cifar_net("resnet", 110))
ENCODERS.register("cifar_resnet20")(_cifar_net("resnet", 20))  # small BatchNorm nets for the digits recipes
ENCODERS.register("cifar_resnet8")(_cifar_net("resnet", 8))
ENCODERS.register("wrn28_10")(_cifar_net("wrn", 28))
