"""RGB <-> HSV for ``(..., 3)`` float arrays in [0, 1], as scikit-image computes them (the CIFAR-10-C
saturate and brightness corruptions use them; scikit-image is not a dependency)."""

from __future__ import annotations

from typing import cast

import numpy as np


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """``skimage.color.rgb2hsv`` for ``(..., 3)`` floats in [0, 1] (hue 0 where max == min)."""
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    safe = np.where(delta == 0, 1.0, delta)
    s = np.where(delta == 0, 0.0, delta / np.where(v == 0, 1.0, v))
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.zeros_like(v)
    h = np.where(r == v, (g - b) / safe, h)  # later cases win, as in skimage
    h = np.where(g == v, 2.0 + (b - r) / safe, h)
    h = np.where(b == v, 4.0 + (r - g) / safe, h)
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """``skimage.color.hsv2rgb`` for ``(..., 3)`` floats."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.astype(np.int64) % 6
    table = np.stack([np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                      (v, p, q))])
    return cast(np.ndarray, np.take_along_axis(table, hi[None, ..., None].repeat(3, axis=-1), axis=0)[0])
