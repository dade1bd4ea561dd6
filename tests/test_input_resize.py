"""``model.input_resize``: the classifier resizes its [0, 1] input (bicubic, antialiased, as the FT-CADIS
authors' ``F.interpolate(x, (224, 224), mode="bicubic", antialias=True)``, ``classifier.py:61``) and
its encoder is built for the resized size; exported files rebuild the same way."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.errors import ConfigError
from rayrcm.models import build_classifier
from rayrcm.models.classifier import resize_input
from rayrcm.models.export import build_from_file
from rayrcm.train.checkpoint import model_meta, save_model

SIZE, RESIZED, CLASSES = 8, 16, 10


def _cfg(*extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), ["method.name=gaussian", f"data.image_size={SIZE}",
                                                f"model.input_resize={RESIZED}", *extra])


def _images(n: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_the_resize_is_torchs_antialiased_bicubic_without_clamp():
    x = _images()
    clf = build_classifier(_cfg().model, SIZE, CLASSES)
    expected = F.interpolate(x, (RESIZED, RESIZED), mode="bicubic", antialias=True)
    assert torch.equal(resize_input(x, RESIZED), expected)
    assert torch.equal(clf.normalize(x), (expected - 0.5) / 0.5)  # resize, then normalize to [-1, 1]
    # the antialiased kernel (a = -0.5) is not the plain bicubic one (a = -0.75): the setting matters
    assert not torch.allclose(expected, F.interpolate(x, (RESIZED, RESIZED), mode="bicubic", align_corners=False))
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    out = resize_input(step, 32)
    assert out.min() < 0 and out.max() > 1  # bicubic overshoot is kept, as the authors (no clamp)
    assert resize_input(x, SIZE) is x  # already that size: the identity
    half = x.bfloat16()  # no bfloat16 antialiased bicubic on the CPU: resized in float32
    assert torch.equal(resize_input(half, RESIZED), F.interpolate(half.float(), (RESIZED, RESIZED), mode="bicubic",
                                                                  antialias=True).bfloat16())


def test_a_digits_vit_is_built_for_the_resized_size():
    digits = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "model.input_resize=32"])
    vit = build_classifier(digits.model, 16, CLASSES).encoder.model
    assert tuple(vit.patch_embed.img_size) == (32, 32) and tuple(vit.patch_embed.patch_size) == (4, 4)
    assert vit.pos_embed.shape[1] == 1 + (32 // 4) ** 2
    clf = build_classifier(_cfg("model.patch_size=4").model, SIZE, CLASSES)
    assert clf.encoder.model.pos_embed.shape[1] == 1 + (RESIZED // 4) ** 2
    assert clf(_images()).shape == (3, CLASSES)  # the data's size goes in; the encoder sees RESIZED


@pytest.mark.parametrize("extra", [(), ("model.lora_rank=2", "model.lora_alpha=4")])
def test_an_exported_resizing_classifier_reloads_through_the_certification_loader(tmp_path, extra):
    torch.manual_seed(0)
    cfg = validate(_cfg(*extra))
    clf = build_classifier(cfg.model, SIZE, CLASSES).eval()
    with torch.no_grad():  # move every parameter (LoRA B included) off its initial value
        for p in clf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "model.pt"
    save_model(path, clf, model_meta(to_dict(cfg), "classifier", CLASSES))
    rebuilt, meta = build_from_file(path)
    assert meta["image_size"] == SIZE and meta["config"]["model"]["input_resize"] == RESIZED
    assert rebuilt.normalize.resize == RESIZED
    x = _images()
    assert torch.equal(rebuilt.eval()(x), clf(x))


def test_an_encoder_file_for_the_resized_size_is_accepted(tmp_path):
    from rayrcm.models.classifier import check_encoder_file

    cfg = _cfg()
    enc = build_classifier(cfg.model, SIZE, CLASSES).encoder
    torch.save({"model": enc.state_dict(), "meta": {"encoder": cfg.model.encoder}}, tmp_path / "enc.pt")
    check_encoder_file(tmp_path / "enc.pt", cfg.model, SIZE)  # built for RESIZED px: fits
    plain = build_classifier(_cfg("model.input_resize=0").model, SIZE, CLASSES).encoder  # built for SIZE px
    torch.save({"model": plain.state_dict(), "meta": {"encoder": cfg.model.encoder}}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="model.init_from"):  # its position embedding does not fit RESIZED
        check_encoder_file(tmp_path / "plain.pt", cfg.model, SIZE)


@pytest.mark.parametrize("override, key", [
    ("model.input_resize=-1", "model.input_resize"),
    ("model.input_resize=2", "model.input_resize"),
    ("model.patch_size=3", "model.patch_size"),  # must divide the resized size, which the message names
])
def test_bad_resize_values_are_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(override))
    assert err.value.key == key and "\n" not in str(err.value)
    if key == "model.patch_size":
        assert f"model.input_resize={RESIZED}" in str(err.value)
