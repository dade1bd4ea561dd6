"""Datasets in [0, 1], the fixed digits split, on-disk formats written here, and the encoder registry."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rayrcm.config import DataConfig, ModelConfig
from rayrcm.data import MultiView, build_splits, build_transform
from rayrcm.errors import ConfigError
from rayrcm.models import ENCODERS, build_classifier, build_encoder
from rayrcm.models.classifier import load_encoder_file
from rayrcm.train.checkpoint import save_model


def test_digits_split_is_fixed_and_in_unit_range():
    s = build_splits(DataConfig(name="digits", image_size=16, val_fraction=0.1))
    assert len(s.train) + len(s.val) == 1437 and len(s.test) == 360 and s.num_classes == 10
    again = build_splits(DataConfig(name="digits", image_size=16, val_fraction=0.1))
    assert s.val.indices == again.val.indices
    views = MultiView(s.test, [build_transform("none", 16), build_transform("strong", 16)])
    (a, b), label = views[0]
    assert a.shape == b.shape == (3, 16, 16) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.max() > 0.5 and 0 <= label < 10


def _write_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)],
                 "batch_label": "x", "filenames": ["f"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def test_cifar10_from_disk(tmp_path):
    _write_cifar10(tmp_path)
    s = build_splits(DataConfig(name="cifar10", path=str(tmp_path), image_size=32, val_fraction=0.0))
    assert len(s.train) == 100 and len(s.test) == 20 and s.num_classes == 10
    (x,), _ = MultiView(s.train, [build_transform("weak", 32)])[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_imagefolder_from_disk(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    s = build_splits(DataConfig(name="imagefolder", path=str(tmp_path), image_size=32, val_fraction=0.0))
    assert s.num_classes == 2 and len(s.train) == 6 and s.large
    (x,), y = MultiView(s.test, [build_transform("none", 32, large=True)])[0]
    assert x.shape == (3, 32, 32) and y in (0, 1)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_contract(name):
    """Every registered encoder: (B, 3, S, S) -> (B, num_features), finite, no weights fetched."""
    size = 32
    enc = build_encoder(ModelConfig(encoder=name), size)
    enc.eval()
    with torch.no_grad():
        f = enc.forward_features(torch.rand(2, 3, size, size))
    assert f.shape == (2, enc.num_features) and torch.isfinite(f).all()


def test_rcm_sizes():
    b = build_encoder(ModelConfig(encoder="rcm_b"), 32).model
    s = build_encoder(ModelConfig(encoder="rcm_s"), 224).model
    assert (b.embed_dim, len(b.blocks), b.blocks[0].attn.num_heads, b.patch_embed.patch_size) == (768, 12, 12, (4, 4))
    assert (s.embed_dim, len(s.blocks), s.blocks[0].attn.num_heads, s.patch_embed.patch_size) == (512, 6, 8, (16, 16))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    clf = build_classifier(ModelConfig(encoder="vit_digits"), 16, 10)
    path = tmp_path / "model.pt"
    save_model(path, clf.encoder, {"encoder": "vit_digits"})
    load_encoder_file(build_encoder(ModelConfig(encoder="vit_digits"), 16), path, "vit_digits")  # fits
    with pytest.raises(ConfigError, match="holds encoder 'vit_digits'"):
        load_encoder_file(build_encoder(ModelConfig(encoder="resnet18"), 16), path, "resnet18")
    save_model(path, clf.encoder, {})  # no metadata: the strict load still refuses
    with pytest.raises(ConfigError, match="does not match encoder 'resnet18'"):
        load_encoder_file(build_encoder(ModelConfig(encoder="resnet18"), 16), path, "resnet18")


@pytest.mark.parametrize("kind", ["none", "weak", "crop", "strong", "autoaug", "mocov3", "mocov3_1", "mocov3_2", "center"])
@pytest.mark.parametrize("large", [False, True])
def test_every_augmentation_gives_float_images_in_the_unit_range(kind, large):
    from PIL import Image

    from rayrcm.config import AUGMENTATIONS

    assert kind in AUGMENTATIONS
    t = build_transform(kind, 24, large=large, hflip=True)
    torch.manual_seed(0)
    for raw in (torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8), Image.new("RGB", (48, 40), (200, 10, 90))):
        x = t(raw)
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_crop_pct_one_is_a_short_side_resize_and_centre_crop():
    img = torch.zeros(3, 20, 40, dtype=torch.uint8)
    img[:, :, 10:30] = 255  # the centre 20x20 square is white
    x = build_transform("none", 10, large=True, crop_pct=1.0)(img)
    assert x.shape == (3, 10, 10) and x[:, :, 1:-1].min().item() == pytest.approx(1.0)  # only the edges blur
