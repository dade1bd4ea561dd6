"""Seed 004's texture-based non-semantic negatives (``method.negatives=texture``, ``moco/loader.py:74-137``):
the photo/texture pairing, the texture view replaying the query's random draws (same crop box, flip,
jitter, ...), a missing pair named before any worker starts, the objective's wiring, and a short
training through the in-process session."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.data.checks import check_dataset
from rayrcm.data.datasets import build_splits
from rayrcm.data.texture import TextureFolder, texture_of
from rayrcm.data.views import MultiView, data_transform
from rayrcm.errors import ConfigError
from rayrcm.objectives import build_objective

WNIDS = ("n01440764", "n01443537")
PER_CLASS = 4


def _noise(seed: int, size: int = 16):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture
def pairs(tmp_path: Path):
    """``photos/{train,val}/<wnid>/*.bmp`` and ``photos-texture/train/<wnid>/*.png``; ``texture(img)``
    makes each texture from its photo (the same image by default)."""

    def make(texture=lambda img: img) -> tuple[Path, Path]:
        photos, textures = tmp_path / "photos", tmp_path / "photos-texture"
        for c, wnid in enumerate(WNIDS):
            for k in range(PER_CLASS):
                img = _noise(100 * c + k)
                for split in ("train", "val"):
                    (photos / split / wnid).mkdir(parents=True, exist_ok=True)
                    img.save(photos / split / wnid / f"{wnid}_{k}.bmp")  # a lossless non-png photo format
                (textures / "train" / wnid).mkdir(parents=True, exist_ok=True)
                texture(img).save(textures / "train" / wnid / f"{wnid}_{k}.png")
        return photos, textures

    return make


def _cfg(photos: Path, textures: Path, *extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [
        "method.name=moco", "method.negatives=texture", "data.name=imagefolder", f"data.path={photos}",
        f"data.texture_path={textures}", "data.image_size=8", "data.hflip=true", "data.val_fraction=0",
        "data.batch_size=4", "method.queue_size=8", "model.patch_size=4", "method.dim=8", *extra])


def _train_views(cfg: ExperimentConfig, views: tuple[str, ...] | None = None) -> MultiView:
    splits = build_splits(cfg.data)
    names = views or cfg.method.views(cfg.data.augmentation)
    return MultiView(splits.train, [data_transform(v, cfg.data, large=splits.large) for v in names])


def test_texture_path_is_the_photo_path_in_the_texture_tree_with_png():
    # the authors go the other way: path.replace('-texture', '').replace('png', 'JPEG') (loader.py:125)
    got = texture_of("/d/imagenet100/train/n01/n01_7.JPEG", "/d/imagenet100", "/d/imagenet100-texture")
    assert got == "/d/imagenet100-texture/train/n01/n01_7.png"
    assert got.replace("-texture", "").replace("png", "JPEG") == "/d/imagenet100/train/n01/n01_7.JPEG"


def test_texture_mode_adds_a_third_view_of_the_query_pipeline(pairs):
    photos, textures = pairs()
    cfg = validate(_cfg(photos, textures))
    assert cfg.method.views("weak") == ("mocov2", "mocov2", "mocov2@texture")
    assert _cfg(photos, textures, "method.negatives=patch").method.views("weak") == ("mocov2", "mocov2")
    splits = build_splits(cfg.data)
    assert isinstance(splits.train.dataset, TextureFolder) and len(splits.train) == 2 * PER_CLASS


@pytest.mark.parametrize("seed", range(4))
def test_the_texture_view_replays_the_query_draws(pairs, seed):
    """Texture = photo: the texture view equals the query view (same crop box, flip, jitter, grey,
    blur), the key view does not, and the query and key are what they are without the texture view."""
    photos, textures = pairs()
    cfg = validate(_cfg(photos, textures))
    with_t, without = _train_views(cfg), _train_views(cfg, ("mocov2", "mocov2"))
    differ = 0
    for i in range(len(with_t)):
        torch.manual_seed(seed * 100 + i)
        (q, k, t), label = with_t[i]
        torch.manual_seed(seed * 100 + i)
        (q2, k2), label2 = without[i]
        assert torch.equal(t, q) and torch.equal(q, q2) and torch.equal(k, k2) and label == label2
        differ += not torch.equal(k, q)
    assert differ == len(with_t)


def test_a_different_texture_gets_the_same_crop_box_and_flip(pairs):
    """Texture = the photo's negative (255 - x): with crops and flips only (``crop`` views), the texture
    view is 1 - the query view up to resize rounding, so the box and the flip are the query's."""
    from PIL import ImageOps

    photos, textures = pairs(ImageOps.invert)
    cfg = validate(_cfg(photos, textures, "method.view=crop", "data.crop_min=0.2"))
    views = _train_views(cfg)
    assert cfg.method.views("weak") == ("crop", "crop", "crop@texture")
    flips = set()
    for i in range(len(views)):
        torch.manual_seed(i)
        (q, k, t), _ = views[i]
        assert (t - (1 - q)).abs().max() <= 1.5 / 255
        assert (k - (1 - q)).abs().max() > 0.1
        flips.add(torch.equal(q, q.flip(-1)))
    assert flips == {False}  # noise images: no view is its own mirror


def test_a_missing_texture_is_named_before_any_worker(pairs):
    photos, textures = pairs()
    gone = textures / "train" / WNIDS[1] / f"{WNIDS[1]}_2.png"
    gone.unlink()
    cfg = validate(_cfg(photos, textures))
    with pytest.raises(ConfigError, match="^texture file=") as err:
        check_dataset(cfg.data, batch_size=4, need_val=False)  # the driver's check before Ray starts
    assert str(gone) in str(err.value) and "\n" not in str(err.value)
    cfg = validate(_cfg(photos, textures.with_name("nowhere")))
    with pytest.raises(ConfigError, match="^data.texture_path=") as err:
        check_dataset(cfg.data, batch_size=4, need_val=False)
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)


def test_the_objective_takes_the_third_view_as_its_negative(pairs):
    photos, textures = pairs()
    cfg = validate(_cfg(photos, textures, "method.alpha=3", "method.temperature=0.5"))
    torch.manual_seed(0)
    obj = build_objective(cfg, 2).eval()  # eval: no momentum update, no enqueue
    g = torch.Generator().manual_seed(1)
    xq, xk, xt = (torch.rand(4, 3, 8, 8, generator=g) for _ in range(3))
    out = obj([xq, xk, xt], torch.zeros(4, dtype=torch.long), 5)
    q = F.normalize(obj._encode(obj.encoder, obj.head, xq, cfg.method.groups(1)).float(), dim=1)
    k, t = obj.key_features(xk, 5, 0), obj.key_features(xt, 5, 1)
    # transcribed from the authors' moco/builder.py (einsum logits, label 0), not from our helpers:
    # the texture negative's logit is scaled by alpha before the temperature
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, obj.queue.clone().detach())
    l_tex = 3.0 * torch.einsum("nc,nc->n", q, t).unsqueeze(-1)
    logits = torch.cat([l_pos, l_neg, l_tex], dim=1) / 0.5
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))
    torch.testing.assert_close(out.metrics["nonsem_logit"], (q * t).sum(1).mean())
    with pytest.raises(ValueError, match="third view"):
        obj([xq, xk], torch.zeros(4, dtype=torch.long), 5)


def test_a_short_training_in_process(pairs, tmp_path):
    """Two steps of MoCo with texture negatives through the session a Ray worker runs (no Ray)."""
    from rayrcm.train.session import build_session, run_training

    photos, textures = pairs()
    cfg = validate(_cfg(photos, textures, "train.steps=2", "train.checkpoint_every=10", "train.log_every=1",
                        f"train.storage_path={tmp_path / 'runs'}"))
    s = build_session(cfg, to_dict(cfg), device=torch.device("cpu"))
    logged: list[dict[str, float]] = []
    metrics = run_training(s, s.objective, on_log=lambda step, m: logged.append(m), on_checkpoint=lambda *_: None)
    assert math.isfinite(metrics["loss"]) and len(logged) == 2
    assert all(math.isfinite(m["nonsem_logit"]) for m in logged)
