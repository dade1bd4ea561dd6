"""Corruptions generated with CIFAR-10-C's parameters (:mod:`rayrcm.data.corruptions`): every one at
every severity keeps shape, dtype and range; noise, blur and contrast grow with severity; the same
(seed, index, corruption, severity) gives the same bytes in any batch; hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayrcm.data import corruptions as C
from rayrcm.data.color import hsv_to_rgb, rgb_to_hsv
from rayrcm.errors import ConfigError


def _images(n: int = 4, size: int = 32) -> np.ndarray:
    """Structured uint8 test images: gradients, a checkerboard and some texture, different per image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for k in range(n):
        r = (xx * 7 + 13 * k) % 256
        g = (yy * 5 + 31 * k) % 256
        b = ((xx // 4 + yy // 4 + k) % 2) * 180 + 30
        img = np.stack([r, g, b], -1) + rng.integers(-20, 21, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("name", C.corruption_names())
def test_every_corruption_keeps_shape_dtype_and_changes_the_image(name):
    images = _images(2)
    for severity in C.SEVERITIES:
        out = C.corrupt_array(images, [0, 1], name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8  # uint8: range [0, 255] by type
        assert (out != images).any(), (name, severity)


def test_fifteen_names_split_into_generated_and_unavailable():
    assert len(C.STANDARD) == 15 and len(C.EXTRA) == 4
    assert set(C.CIFAR10C_PARAMS) | set(C.UNAVAILABLE) == set(C.STANDARD + C.EXTRA)
    assert not set(C.CIFAR10C_PARAMS) & set(C.UNAVAILABLE)
    assert C.generated_set_name("cifar10") == "cifar10-c-generated"
    assert all(len(v) == 5 for v in C.CIFAR10C_PARAMS.values())


@pytest.mark.parametrize("name", sorted(C.UNAVAILABLE))
def test_unavailable_corruption_is_one_line_naming_it(name):
    with pytest.raises(ConfigError, match=name) as err:
        C.corrupt(_images(1)[0], name, 1, seed=0, index=0)
    assert "\n" not in str(err.value) and "released" in str(err.value)


def test_bad_name_and_severity_are_one_line():
    with pytest.raises(ConfigError, match="choose one of"):
        C.check_corruption("gaussian", 1)
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ConfigError, match="severity"):
            C.check_corruption("contrast", bad)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
                                  "gaussian_blur", "defocus_blur", "zoom_blur", "contrast", "fog", "brightness"])
def test_distortion_grows_with_severity(name):
    images = _images(4)
    change = [np.abs(C.corrupt_array(images, range(4), name, s, seed=1).astype(float) - images).mean()
              for s in C.SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:])), (name, change)


def test_same_key_same_bytes_in_any_batch_and_order():
    images = _images(6)
    for name in ("gaussian_noise", "impulse_noise", "glass_blur", "fog", "elastic_transform"):
        whole = C.corrupt_array(images, range(6), name, 3, seed=5)
        order = [4, 1, 5, 0]
        part = C.corrupt_array(images[order], order, name, 3, seed=5)
        assert np.array_equal(part, whole[order])
        one = C.corrupt(images[2], name, 3, seed=5, index=2)
        assert np.array_equal(one, whole[2])
        assert not np.array_equal(C.corrupt(images[2], name, 3, seed=6, index=2), one)  # the seed matters
        assert not np.array_equal(C.corrupt(images[2], name, 3, seed=5, index=3), one)  # so does the index


def test_tensor_layout_matches_array_layout():
    images = _images(3)
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    out = C.corrupt_tensor(tensors, torch.tensor([7, 8, 9]), "shot_noise", 2, seed=0)
    assert out.shape == tensors.shape and out.dtype == torch.uint8
    expected = C.corrupt_array(images, [7, 8, 9], "shot_noise", 2, seed=0)
    assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), expected)


def test_other_sizes_work():
    for size in (16, 40):
        out = C.corrupt_array(_images(1, size), [0], "fog", 5, seed=0)
        assert out.shape == (1, size, size, 3)
        assert C.corrupt_array(_images(1, size), [0], "glass_blur", 5, seed=0).shape == (1, size, size, 3)


def test_contrast_by_hand():
    """x' = clip((x - m_c) * c + m_c) with m_c the per-channel mean, then uint8 truncation."""
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = [[0, 100], [200, 255]]  # mean 138.75 / 255
    img[..., 1] = 60
    img[..., 2] = [[10, 11], [250, 251]]  # mean 130.5
    out = C.corrupt(img, "contrast", 5, seed=0, index=0).astype(int)  # c = 0.15
    assert out[..., 0].tolist() == [[117, 132], [147, 156]]  # 138.75 + (x - 138.75) * 0.15, truncated
    assert (out[..., 1] == 60).all() or (out[..., 1] == 59).all()  # constant channel unchanged (up to float error)
    assert out[..., 2].tolist() == [[112, 112], [148, 148]]  # 112.425, 112.575, 148.425, 148.575


def test_brightness_by_hand():
    """Adding c to the HSV value scales a pixel by V' / V: (100, 50, 25), c = .05 -> x * (100/255 + .05) / (100/255)."""
    img = np.array([[[100, 50, 25], [0, 0, 0], [250, 10, 10]]], np.uint8)
    out = C.corrupt(img, "brightness", 1, seed=0, index=0).astype(int)
    scale = (100 / 255 + 0.05) / (100 / 255)
    assert out[0, 0].tolist() == [int(100 * scale), int(50 * scale), int(25 * scale)] == [112, 56, 28]
    assert out[0, 1].tolist() == [12, 12, 12]  # black: V = 0.05 with no saturation -> grey 12.75, truncated
    assert out[0, 2].tolist() == [255, 10, 10]  # V already 0.98 -> clipped at 1: 255 * (10/250) = 10.2


def test_gaussian_noise_on_grey_has_the_severity_std():
    grey = np.full((64, 64, 3), 128, np.uint8)
    for severity, c in zip(C.SEVERITIES, C.CIFAR10C_PARAMS["gaussian_noise"]):
        noisy = np.stack([C.corrupt(grey, "gaussian_noise", severity, seed=0, index=i) for i in range(4)])
        std = (noisy.astype(float) / 255).std()
        assert abs(std - c) < 0.03 * c, (severity, std, c)  # 49,152 draws: +-0.5 % sampling error


def test_saturate_and_hsv_round_trip():
    rng = np.random.default_rng(0)
    x = rng.random((20, 20, 3))
    x[0, 0], x[1, 1] = 0.0, 0.5
    assert np.allclose(hsv_to_rgb(rgb_to_hsv(x)), x)
    grey = np.full((4, 4, 3), 128, np.uint8)
    assert (C.corrupt(grey, "saturate", 1, seed=0, index=0) == 128).all()  # no saturation to scale
    # severity 5 adds 0.2 saturation at hue 0 (red): (V, V * 0.8, V * 0.8)
    assert C.corrupt(grey, "saturate", 5, seed=0, index=0)[0, 0].tolist() == [128, 102, 102]


def test_elastic_identity_without_jitter_and_disk_kernel():
    class NoJitter:
        def uniform(self, low, high, size):
            return np.zeros(size)

    img = _images(1)[0]
    assert np.array_equal(C.elastic_transform(img, (0, 0, 0.0), NoJitter()).round().astype(np.uint8), img)
    k = C._disk(1, 0.2)
    assert k.shape == (5, 5) and abs(k.sum() - 1) < 1e-6 and k[2, 2] == k.max()  # 5-pixel cross, blurred by 3x3


def test_glass_pass_equals_the_scripts_loop():
    """make_cifar_c.py's loop, transcribed (its tuple "swap" of numpy views included), against the gather."""
    rng = np.random.default_rng(3)
    for size in (32, 9):
        x = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        dy, dx = rng.integers(-1, 1, size=(2, size - 2, size - 2))
        ref = x.copy()
        for h in range(size - 1, 1, -1):
            for w in range(size - 1, 1, -1):
                hp, wp = h + dy[h - 2, w - 2], w + dx[h - 2, w - 2]
                ref[h, w], ref[hp, wp] = ref[hp, wp], ref[h, w]
        C._glass_pass(x, dy, dx)
        assert np.array_equal(x, ref)


def test_shot_and_impulse_noise_statistics_on_grey():
    grey = np.full((64, 64, 3), 128, np.uint8)
    x = 128 / 255
    shot = np.stack([C.corrupt(grey, "shot_noise", 5, seed=0, index=i) for i in range(4)]).astype(float) / 255
    assert abs(shot.std() - np.sqrt(x / 50)) < 0.03 * np.sqrt(x / 50)  # Poisson(x c) / c: variance x / c
    imp = np.stack([C.corrupt(grey, "impulse_noise", 5, seed=0, index=i) for i in range(4)])
    flipped = imp != 128
    assert set(np.unique(imp[flipped]).tolist()) == {0, 255}
    assert abs(flipped.mean() - 0.07) < 0.005 and abs((imp[flipped] == 255).mean() - 0.5) < 0.05


def test_a_corruption_without_its_generator_here_is_one_line():
    with pytest.raises(ConfigError, match="motion_blur"):
        C.check_corruption("motion_blur", 1)
    assert C.generated_set_name() == "cifar10-c-generated"
