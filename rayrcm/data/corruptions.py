"""Common corruptions generated on the fly with CIFAR-10-C's own parameters, labelled "generated".

Source of every parameter table below: Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019), the script that made CIFAR-10-C,
``ImageNet-C/create_c/make_cifar_c.py`` in github.com/hendrycks/robustness (commit ca36008), one
function per corruption (the table in each function below is that function's ``c = [...]`` list,
severities 1-5). These are not ImageNet-C's strengths (``make_imagenet_c.py``, the
``imagecorruptions`` package): e.g. Gaussian noise std .04-.10 here against .08-.38 there.

**Generated, not released.** Each image's corruption is a new random draw from a
``numpy.random.Generator`` keyed by ``(seed, image index, corruption, severity)``
(:func:`key_rng`), so the same key gives the same bytes on any worker, in any batch, in any
order; but the draws are not those of the released ``.npy`` files, so results must be labelled
"generated" (:func:`generated_set_name`: ``cifar10-c-generated``) and are not comparable with
published CIFAR-10-C numbers (read the released files with :mod:`rayrcm.data.shift` for that).

**Implemented** (numpy, scipy, PIL only; OpenCV and scikit-image calls of the original are
re-written: ``skimage.filters.gaussian`` -> ``scipy.ndimage.gaussian_filter`` with skimage's
defaults (``mode='nearest'``, ``truncate=4``); ``cv2.filter2D`` / ``cv2.warpAffine`` ->
``scipy.ndimage`` with OpenCV's reflect-101 border (``mode='mirror'``); ``skimage.color`` HSV ->
:func:`rgb_to_hsv` / :func:`hsv_to_rgb`, the same formulas): 12 of the 15 standard corruptions
-- gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, zoom_blur, fog, brightness,
contrast, elastic_transform, pixelate, jpeg_compression -- and 3 of the 4 extras: speckle_noise,
gaussian_blur, saturate.

**Not generated** (:data:`UNAVAILABLE`; asking for one is a one-line :class:`ConfigError`):
frost (needs the frost photographs ``frost1.png`` ... ``frost6.jpg`` shipped with the script),
motion_blur and snow (ImageMagick's motion blur through Wand, a system library), spatter (OpenCV's
Canny edges, distance transform and histogram equalisation). Use the released files for them.

Faithful details: outputs are truncated to uint8 as the script's ``np.uint8(...)`` does; glass blur
keeps the script's "swap" of two numpy views, which copies the neighbour into the pixel and leaves
the neighbour unchanged (the released files were made so); the offsets are drawn with
``randint(-1, 1)``, i.e. in {-1, 0}. Parameters are in pixels of a 32x32 image; other sizes get
the same pixel values (fog's fractal and glass blur's pass adapt to the size). The bytes depend on
numpy's PCG64 streams (stable across platforms; pin numpy to compare across releases). Pure
numpy/scipy/PIL: no Ray, no MLflow.

>>> import numpy as np
>>> x = np.full((32, 32, 3), 128, np.uint8)
>>> y = corrupt(x, "gaussian_noise", 3, seed=0, index=7)
>>> y.shape, y.dtype, bool((y == corrupt(x, "gaussian_noise", 3, seed=0, index=7)).all())
((32, 32, 3), dtype('uint8'), True)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, cast

import numpy as np
import torch

from rayrcm.data.color import hsv_to_rgb, rgb_to_hsv
from rayrcm.errors import ConfigError

GENERATED = "generated"
SEVERITIES = (1, 2, 3, 4, 5)

# Parameter tables, make_cifar_c.py (hendrycks/robustness, commit ca36008), severities 1-5.
CIFAR10C_PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of the additive noise, [0, 1] units
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper fraction
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # (disk radius, alias blur)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # (sigma, delta, passes)
    # zoom factors; the script's float arange: 7, 12, 16, 21, 26 factors (1.00-1.06 at severity 1)
    "zoom_blur": tuple(np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # (strength, fractal wibble decay)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor about the per-channel mean
    "elastic_transform": tuple((32 * a, 32 * s, 32 * f) for a, s, f in  # (alpha, sigma, affine jitter) in px
                               ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                (0.1, 0.03, 0.03))),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scaling factor (PIL box filter both ways)
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),  # std of the multiplicative noise
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in px
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation * a + b
}

UNAVAILABLE: dict[str, str] = {
    "frost": "needs the frost photographs (frost1.png ... frost6.jpg) that make_cifar_c.py blends in",
    "motion_blur": "needs ImageMagick's motion blur through Wand (a system library) in make_cifar_c.py",
    "snow": "needs ImageMagick's motion blur through Wand (a system library) in make_cifar_c.py",
    "spatter": "needs OpenCV (Canny edges, distance transform, histogram equalisation) in make_cifar_c.py",
}

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


def generated_set_name(dataset: str = "cifar10") -> str:
    """The label of a set generated here from ``dataset``'s clean images, e.g. ``cifar10-c-generated``."""
    return f"{dataset}-c-{GENERATED}"


def corruption_names() -> list[str]:
    """The corruptions that can be generated, in make_cifar_c.py's order (standard 15, then extras)."""
    return [n for n in STANDARD + EXTRA if n in CIFAR10C_PARAMS]


def check_corruption(name: str, severity: int) -> None:
    """One line naming ``name`` or ``severity`` when it cannot be generated."""
    if name in UNAVAILABLE:
        raise ConfigError("corruption", name, f"not generated here: it {UNAVAILABLE[name]}; "
                          "use the released CIFAR-10-C files for it")
    if name not in CIFAR10C_PARAMS:
        raise ConfigError("corruption", name, f"choose one of: {', '.join(corruption_names())}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ConfigError("severity", severity, "must be an integer from 1 to 5")


def key_rng(seed: int, index: int, name: str, severity: int) -> np.random.Generator:
    """The generator of one corrupted image: PCG64 seeded by ``(seed, index, crc32(name), severity)``."""
    if seed < 0 or index < 0:
        raise ConfigError("seed" if seed < 0 else "index", seed if seed < 0 else index, "must be >= 0")
    code = zlib.crc32(name.encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), code, int(severity)]))


# ----------------------------------------------------------------------------- helpers


def _unit(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) / 255.0


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """``skimage.filters.gaussian(x, sigma, multichannel=True)``: no blur across the channel axis."""
    from scipy.ndimage import gaussian_filter

    sigmas = (sigma, sigma, 0) if x.ndim == 3 else sigma
    return cast(np.ndarray, gaussian_filter(x, sigmas, mode=mode, truncate=truncate))


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py's ``disk``: a normalised disk on a 17x17 grid, blurred by a 3x3 Gaussian
    (``cv2.GaussianBlur(ksize=(3, 3), sigmaX=alias_blur)``, reflect-101 border)."""
    from scipy.ndimage import correlate1d

    half = 8 if radius <= 8 else int(np.ceil(radius))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    k = 3 if radius <= 8 else 5
    taps = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * alias_blur**2)).astype(np.float32)
    taps /= taps.sum()
    kernel = correlate1d(correlate1d(disk, taps, axis=0, mode="mirror"), taps, axis=1, mode="mirror")
    r = half - int(np.flatnonzero(kernel.any(axis=0)).min())  # symmetric support: crop the zero taps (speed)
    return cast(np.ndarray, kernel[half - r:half + r + 1, half - r:half + r + 1])


def _plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """make_cifar_c.py's ``plasma_fractal`` (diamond-square heightmap in [0, 1]), drawn from ``rng``."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corner = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corner + np.roll(corner, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        dr = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(lt)
        tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return cast(np.ndarray, maparray / maparray.max())


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """make_cifar_c.py's ``clipped_zoom``: zoom the centre crop by ``factor`` (bilinear), trim to size."""
    from scipy.ndimage import zoom

    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = zoom(img[top:top + ch, left:left + cw], (factor, factor, 1), order=1)
    th, tw = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return cast(np.ndarray, out[th:th + h, tw:tw + w])


# ----------------------------------------------------------------------------- corruptions
# Each takes a uint8 (H, W, 3) image, its severity's parameters and a generator; returns floats in
# [0, 255] (make_cifar_c.py's return values, before its np.uint8 truncation).


def gaussian_noise(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(img)
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(img)
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def impulse_noise(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """``skimage.util.random_noise(mode='s&p', amount=c)``: each value flipped with probability c,
    to 1 or 0 with equal odds."""
    x = _unit(img)
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return x * 255


def speckle_noise(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(img)
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def gaussian_blur(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return cast(np.ndarray, np.clip(_gaussian(_unit(img), c), 0, 1) * 255)


def _glass_pass(x: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> None:
    """One pass of make_cifar_c.py's glass-blur loop, in place, for ``max_delta = 1``: for h, w from
    ``size - 1`` down to 2 the script runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views,
    which sets ``x[h, w] = x[h', w']`` and leaves ``x[h', w']`` as it was. With offsets ``dy, dx``
    ``(H - 2, W - 2)`` in {-1, 0} every read is of a pixel the pass has not written yet, so the loop is
    one gather."""
    h, w = x.shape[:2]
    rows, cols = np.arange(2, h)[:, None], np.arange(2, w)[None, :]
    x[2:, 2:] = x[rows + dy, cols + dx]


def glass_blur(img: np.ndarray, c: tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, ``passes`` local pixel shuffles (:func:`_glass_pass`, offsets drawn as the
    script's ``randint(-1, 1)``, i.e. in {-1, 0}), Gaussian blur again."""
    sigma, delta, passes = c
    assert delta == 1, "the vectorised pass holds for max_delta = 1 (all of CIFAR-10-C's severities)"
    x = (_gaussian(_unit(img), sigma) * 255).astype(np.uint8)
    h, w = x.shape[:2]
    for _ in range(passes):
        dy, dx = rng.integers(-delta, delta, size=(2, h - 2, w - 2))
        _glass_pass(x, dy, dx)
    return cast(np.ndarray, np.clip(_gaussian(_unit(x), sigma), 0, 1) * 255)


def defocus_blur(img: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import correlate

    x = _unit(img)
    kernel = _disk(radius=c[0], alias_blur=c[1])
    out = np.stack([correlate(x[:, :, d], kernel, mode="mirror") for d in range(x.shape[2])], axis=-1)
    return cast(np.ndarray, np.clip(out, 0, 1) * 255)


def zoom_blur(img: np.ndarray, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = _unit(img).astype(np.float32)
    out = np.zeros_like(x)
    for factor in c:
        out += _clipped_zoom(x, float(factor))
    return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


def fog(img: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    x = _unit(img)
    h, w = x.shape[:2]
    max_val = x.max()
    size = max(32, 1 << int(np.ceil(np.log2(max(h, w)))))  # the script's 32, or the next power of two
    x += c[0] * _plasma_fractal(size, c[1], rng)[:h, :w][..., np.newaxis]
    return cast(np.ndarray, np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255)


def brightness(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    hsv = rgb_to_hsv(_unit(img))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return cast(np.ndarray, np.clip(hsv_to_rgb(hsv), 0, 1) * 255)


def saturate(img: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    hsv = rgb_to_hsv(_unit(img))
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return cast(np.ndarray, np.clip(hsv_to_rgb(hsv), 0, 1) * 255)


def contrast(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """x' = clip((x - m) * c + m, 0, 1) with m the per-channel mean over the image."""
    x = _unit(img)
    means = x.mean(axis=(0, 1), keepdims=True)
    return cast(np.ndarray, np.clip((x - means) * c + means, 0, 1) * 255)


def jpeg_compression(img: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    buf = BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=c)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def pixelate(img: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BOX))


def elastic_transform(img: np.ndarray, c: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """A random affine map of three points (``cv2.getAffineTransform`` / ``warpAffine``, bilinear,
    reflect-101), then a smooth random displacement field (bilinear, reflect)."""
    from scipy.ndimage import map_coordinates

    alpha, sigma, jitter = c
    x = _unit(img).astype(np.float32)
    h, w, ch = x.shape
    centre, square = np.array([w, h], dtype=np.float32) // 2, min(h, w) // 3  # (x, y) = (column, row) as in OpenCV
    pts1 = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square], dtype=np.float32)
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape).astype(np.float32)
    affine = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # dst = affine @ [x, y, 1]
    inv = np.linalg.inv(np.r_[affine, [[0, 0, 1]]])[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    src_x = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    src_y = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    x = np.stack([map_coordinates(x[..., d], [src_y, src_x], order=1, mode="mirror") for d in range(ch)], -1)
    dx = (_gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha)
    dy = (_gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha)
    out = np.stack([map_coordinates(x[..., d], [yy + dy, xx + dx], order=1, mode="reflect") for d in range(ch)], -1)
    return cast(np.ndarray, np.clip(out, 0, 1) * 255)


_FUNCTIONS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {  # Any: each its own parameter
    f.__name__: f for f in (gaussian_noise, shot_noise, impulse_noise, speckle_noise, gaussian_blur, glass_blur,
                            defocus_blur, zoom_blur, fog, brightness, saturate, contrast, jpeg_compression,
                            pixelate, elastic_transform)
}
assert set(_FUNCTIONS) == set(CIFAR10C_PARAMS)


# ----------------------------------------------------------------------------- public API


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int, index: int) -> np.ndarray:
    """The corrupted copy of one uint8 ``(H, W, 3)`` image (``index``: its place in the clean set),
    uint8 ``(H, W, 3)``, truncated as make_cifar_c.py's ``np.uint8``. Same key, same bytes."""
    check_corruption(name, severity)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {tuple(image.shape)}")
    out = _FUNCTIONS[name](np.ascontiguousarray(image), CIFAR10C_PARAMS[name][severity - 1],
                           key_rng(seed, index, name, severity))
    return cast(np.ndarray, np.clip(out, 0, 255).astype(np.uint8))


def corrupt_array(images: np.ndarray, indices: Sequence[int], name: str, severity: int, *, seed: int) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` images with their clean-set ``indices`` -> corrupted, same layout."""
    if images.ndim != 4 or len(indices) != len(images):
        raise ValueError(f"expected (N, H, W, 3) images and N indices, got {tuple(images.shape)} and {len(indices)}")
    check_corruption(name, severity)
    out = np.empty_like(images)
    for k, (image, i) in enumerate(zip(images, indices)):
        out[k] = corrupt(image, name, severity, seed=seed, index=int(i))
    return out


def corrupt_tensor(images: torch.Tensor, indices: Sequence[int] | torch.Tensor, name: str, severity: int, *,
                   seed: int) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` tensors (the evaluation view, :func:`rayrcm.data.datasets.eval_images`)
    -> corrupted, same layout and device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    arr = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    out = corrupt_array(arr, idx, name, severity, seed=seed)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)
