"""Off-the-shelf backbones by their timm names (FT-CADIS's ViT-B/16 and CLIP ViT-B/16-384), built
without downloading anything, loaded from a user's plain timm ``state_dict`` file."""

from __future__ import annotations

import pytest
import timm
import torch

from rayrcm.errors import ConfigError
from rayrcm.models.classifier import build_classifier
from rayrcm.models.encoders import ViTEncoder, build_encoder
from rayrcm.sections import ModelConfig


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_base_patch16_clip_384"])
def test_a_plain_timm_state_dict_loads_as_the_backbone_with_identical_features(name, tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=7, img_size=32).eval()
    torch.save(reference.state_dict(), tmp_path / "off_the_shelf.pt")  # what a user holds, head included
    clf = build_classifier(ModelConfig(encoder=name, init_from=str(tmp_path / "off_the_shelf.pt")), 32, 7).eval()
    assert isinstance(clf.encoder, ViTEncoder)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(clf.encoder(x), features)
        torch.testing.assert_close(clf(x), reference(x * 2 - 1))  # its head kept; rayrcm normalizes (x - 0.5) / 0.5
    other = build_classifier(ModelConfig(encoder=name, init_from=str(tmp_path / "off_the_shelf.pt")), 32, 10)
    assert other.head.out_features == 10  # other classes: a fresh head, the backbone still loaded
    assert build_encoder(ModelConfig(encoder=name, lora_rank=4), 32)(x).shape == (2, 768)  # LoRA on q, v applies


def test_a_state_dict_of_another_architecture_is_one_line(tmp_path):
    torch.save(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32).state_dict(),
               tmp_path / "vit.pt")
    with pytest.raises(ConfigError) as err:
        build_classifier(ModelConfig(encoder="vit_digits", init_from=str(tmp_path / "vit.pt")), 32, 10)
    assert "model.init_from" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_encoder(ModelConfig(encoder="vit_base_patch16_224", patch_size=4), 32)
    assert "model.patch_size" in str(err.value)
