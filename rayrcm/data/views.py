"""View pipelines (none / weak / crop / strong / autoaug / simclr / mocov3 / mocov2 / stablerep / center) from
torchvision, and mixup/cutmix from timm.

All pipelines end in float32 tensors in [0, 1]; normalization is the model's first layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from rayrcm.sections import DataConfig


def _resize(size: int, large: bool, crop_pct: float) -> list[v2.Transform]:
    """Small images: resize to ``size``; large: short side to ``size / crop_pct``, centre crop."""
    if large:
        return [v2.Resize(int(round(size / crop_pct)), antialias=True), v2.CenterCrop(size)]
    return [v2.Resize((size, size), antialias=True)]


class _ToPIL:
    """uint8 tensors (the bundled digits) to PIL, for timm's PIL-based augmentations."""

    def __call__(self, image: Any) -> Any:
        return v2.functional.to_pil_image(image) if isinstance(image, torch.Tensor) else image


class _ToPILRGB(_ToPIL):
    """Any image (uint8 tensor or PIL) as an RGB PIL image, as the RCM authors load theirs."""

    def __call__(self, image: Any) -> Any:
        return super().__call__(image).convert("RGB")


class PILGaussianBlur(v2.Transform):  # type: ignore[misc]  # torchvision ships no type information
    """SimCLR's / MoCo v3's blur as the RCM authors apply it (``dataset.py``, ``GaussianBlur``): PIL's
    ``ImageFilter.GaussianBlur(radius=s)`` with ``s ~ U(sigma)``; Pillow's ``radius`` is the standard
    deviation of the Gaussian. PIL images only (the pipelines below stay in PIL until ``ToImage``)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"radius": float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, Image.Image):
            raise TypeError(f"PILGaussianBlur takes PIL images, got {type(inpt).__name__}")
        return inpt.filter(ImageFilter.GaussianBlur(radius=params["radius"]))


class ShortSideCenterCrop:
    """The RCM authors' ``center_crop_arr`` (``dataset.py``; ``ShortSideResizeCenterCrop`` in
    ``rrcm_tune.py``): halve with BOX filtering while the short side is at least ``2 size``, resize
    the short side to ``size`` (bicubic), crop the centre ``size x size``. PIL in, PIL out."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        s = self.size
        if image.size == (s, s):
            return image
        while min(*image.size) >= 2 * s:
            image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.Resampling.BOX)
        scale = s / min(*image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.Resampling.BICUBIC)
        left, top = (image.size[0] - s) // 2, (image.size[1] - s) // 2
        return image.crop((left, top, left + s, top + s))


def mocov3_view(size: int, second: bool, *, hflip: bool = True) -> v2.Compose:
    """One of MoCo v3's two asymmetric views, exactly as the RCM authors' ``augmentation1`` /
    ``augmentation2`` (``dataset.py``, the same for CIFAR-10 and ImageNet): RandomResizedCrop(size,
    scale=(0.08, 1)) (bilinear), ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale with p = 0.2,
    Gaussian blur (sigma in [0.1, 2]) with p = 1.0 (first view) or 0.1 (second view), solarize
    (threshold 128) with p = 0.2 (second view only), horizontal flip. All on PIL images."""
    t: list[Any] = [_ToPILRGB(), v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
                    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
                    v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.1 if second else 1.0)]
    t += [v2.RandomSolarize(128, p=0.2)] if second else []
    t += [v2.RandomHorizontalFlip()] if hflip else []
    return v2.Compose([*t, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class DownSampleAndUpsample:
    """StableRep's ``DownSampleAndUpsample`` (``dataset/util.py:22-54``): resize the short side to a
    resolution drawn uniformly from ``down_res``, then back up to ``up_size``. PIL in, PIL out."""

    def __init__(self, down_res: Sequence[int], up_size: int) -> None:
        self.down_res, self.up_size = [int(r) for r in down_res], int(up_size)

    def __call__(self, image: Any) -> Any:
        res = self.down_res[int(torch.randint(len(self.down_res), ()))]
        return v2.Resize(self.up_size, antialias=True)(v2.Resize(res, antialias=True)(image))


def mocov2_view(size: int, *, scale_min: float = 0.2, hflip: bool = True, downsample: float = 0.0) -> v2.Compose:
    """MoCo v2's ``aug_plus`` (``main_moco.py``; seed 004's ``moco-non-sem-neg.py``): RandomResizedCrop(size,
    scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale with p = 0.2, Gaussian blur
    (sigma in [0.1, 2]) with p = 0.5, horizontal flip; all on PIL images. ``scale_min=0.08`` and
    ``downsample=0.05`` give StableRep's (``main_stablerep.py:185-202``): with probability ``downsample``
    the raw image is first brought down to 64 or 128 px and back up to 256 (at 224 px; scaled with ``size``)."""
    t: list[Any] = [_ToPILRGB()]
    if downsample > 0:
        res = [max(1, round(r * size / 224)) for r in (128, 64)]
        t.append(v2.RandomApply([DownSampleAndUpsample(res, max(1, round(256 * size / 224)))], p=downsample))
    t += [v2.RandomResizedCrop(size, scale=(scale_min, 1.0)),
          v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
          v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5)]
    t += [v2.RandomHorizontalFlip()] if hflip else []
    return v2.Compose([*t, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def build_transform(kind: str, size: int, *, large: bool = False, hflip: bool = False, crop_pct: float = 0.875,
                    crop_min: float = 0.4, autoaug: str = "rand-m9-mstd0.5-inc1") -> Any:
    """One view pipeline, ending in float32 [0, 1] tensors ``(3, size, size)``.

    * ``none``: resize (and centre crop at ``crop_pct`` for large images), optional flip;
    * ``weak``: pad-and-crop (small) or RandomResizedCrop (large), optional flip;
    * ``crop``: RandomResizedCrop with scale ``(crop_min, 1)``, optional flip (the RCM seed's
      fine-tuning "strong");
    * ``strong``: SimCLR / MoCo-v2 colour augmentation after a resized crop;
    * ``autoaug``: timm's ``create_transform`` training pipeline with RandAugment ``autoaug``
      (the RCM seed's "autoaug": random resized crop, flip, ``rand-m9-mstd0.5-inc1``, bicubic);
    * ``mocov3_1`` / ``mocov3_2``: MoCo v3's asymmetric pair (:func:`mocov3_view`), the RCM
      authors' pretraining views; ``mocov3`` is ``mocov3_1`` (an objective with two views, RCM,
      pairs it with ``mocov3_2``);
    * ``mocov2``: MoCo v2's augmentation with blur (:func:`mocov2_view`), seed 004's views;
    * ``stablerep``: StableRep's (:func:`mocov2_view` with scale 0.08-1 and the 5% downsample);
      these two are the authors' pipelines as they are, the random horizontal flip included whatever
      ``hflip`` says (``moco-non-sem-neg.py:244-256``, ``main_stablerep.py:185-195`` have no switch);
    * ``center``: the RCM authors' pretraining consistency input ``x_start``: short side to
      ``size``, centre crop (:class:`ShortSideCenterCrop`, identity for CIFAR's 32 px at 32), optional
      flip; also their ImageNet fine-tuning "weak" view.
    """
    to_float = v2.ToDtype(torch.float32, scale=True)
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    if kind == "none":
        return v2.Compose([v2.ToImage(), *_resize(size, large, crop_pct), *flip, to_float])
    if kind == "weak":
        crop = [v2.RandomResizedCrop(size, antialias=True)] if large else [v2.Resize((size, size), antialias=True), v2.RandomCrop(size, padding=max(1, size // 8))]
        return v2.Compose([v2.ToImage(), *crop, *flip, to_float])
    if kind == "crop":
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(crop_min, 1.0), antialias=True), *flip, to_float])
    if kind == "strong":  # SimCLR / MoCo-v2 colour augmentation
        crop = [v2.RandomResizedCrop(size, scale=(0.2 if large else 0.5, 1.0), antialias=True)]
        color = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
        return v2.Compose([v2.ToImage(), *crop, *flip, *color, to_float])
    if kind == "autoaug":
        from timm.data import create_transform

        timm_t = create_transform(input_size=size, is_training=True, auto_augment=autoaug, interpolation="bicubic",
                                  hflip=0.5 if hflip else 0.0, re_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                  color_jitter=None)  # type: ignore[arg-type]  # timm's annotation omits None (no jitter)
        return v2.Compose([_ToPILRGB(), timm_t])
    if kind == "simclr":
        return StrengthAugment(size, hflip=hflip)
    if kind in ("mocov3", "mocov3_1", "mocov3_2"):
        return mocov3_view(size, kind == "mocov3_2", hflip=hflip)
    if kind == "mocov2":  # the authors' pipelines flip always: ``hflip`` (data.hflip) does not apply
        return mocov2_view(size)
    if kind == "stablerep":
        return mocov2_view(size, scale_min=0.08, downsample=0.05)
    if kind == "center":
        return v2.Compose([_ToPILRGB(), ShortSideCenterCrop(size), *flip, v2.ToImage(), to_float])
    raise ValueError(f"unknown augmentation {kind!r}")


class StrengthAugment:
    """The ACL/DynACL authors' SimCLR augmentation at strength ``s`` in [0, 1] (1 = full SimCLR):
    RandomResizedCrop(scale=(1 - 0.9 s, 1), bicubic), optional flip, ColorJitter(0.4 s, 0.4 s, 0.4 s,
    0.1 s) with probability 0.8 s, grayscale with probability 0.2 s. DynACL lowers ``strength``
    between epochs (the training loop sets it before each epoch's loader starts)."""

    def __init__(self, size: int, *, hflip: bool = True, strength: float = 1.0) -> None:
        self.size, self.hflip, self.strength = size, hflip, strength
        self._built: tuple[float, Any] | None = None

    def pipeline(self) -> Any:
        if self._built is None or self._built[0] != self.strength:
            s = self.strength
            t = [v2.ToImage(), v2.RandomResizedCrop(self.size, scale=(1.0 - 0.9 * s, 1.0),
                                                    interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
            t += [v2.RandomHorizontalFlip()] if self.hflip else []
            t += [v2.RandomApply([v2.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)], p=0.8 * s),
                  v2.RandomGrayscale(p=0.2 * s), v2.ToDtype(torch.float32, scale=True)]
            self._built = (s, v2.Compose(t))
        return self._built[1]

    def __call__(self, image: Any) -> torch.Tensor:
        return cast(torch.Tensor, self.pipeline()(image))


TEXTURE_VIEW = "@texture"  # a view name's suffix: that view of the photo's texture, replaying view 0's draws


def data_transform(kind: str, cfg: DataConfig, *, large: bool) -> Any:
    """:func:`build_transform` with the options of a :class:`DataConfig`; ``<kind>@texture`` is view
    ``kind`` of each item's paired image (its texture) with view 0's random draws (:class:`PairedView`)."""
    if kind.endswith(TEXTURE_VIEW):
        return PairedView(data_transform(kind[:-len(TEXTURE_VIEW)], cfg, large=large), source=0)
    return build_transform(kind, cfg.image_size, large=large, hflip=cfg.hflip if kind != "none" else False,
                           crop_pct=cfg.crop_pct, crop_min=cfg.crop_min, autoaug=cfg.autoaug)


def eval_transform_uint8(size: int, *, large: bool = False, crop_pct: float = 0.875) -> v2.Transform:
    """The ``"none"`` view without the final conversion: uint8 ``(C, size, size)``; ``/ 255`` gives the
    float image (kept as uint8 so a certification's image list costs a quarter of the memory)."""
    return v2.Compose([v2.ToImage(), *_resize(size, large, crop_pct), v2.ToDtype(torch.uint8, scale=True)])


class ImageGroup:
    """The raw images of one item that holds several (StableRep's caption groups: one image per drawn
    root), read on access: :class:`MultiView` applies view ``k`` to image ``k``."""

    def __init__(self, items: Sequence[Any], loader: Callable[[Any], Any] | None = None) -> None:
        self.items, self.loader = list(items), loader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Any:
        item = self.items[k]
        return self.loader(item) if self.loader is not None else item


class PairedView:
    """A view of an item's *paired* image (seed 004's texture of a photo: the dataset's
    ``paired_image(index)``, e.g. :class:`~rayrcm.data.texture.TextureFolder`) that replays the random
    draws of view ``source``: the global torch RNG is set to the state view ``source`` started from,
    the pipeline runs on the paired image, and the RNG is put back where it was, so the other views
    draw exactly what they would without this one. The seed re-seeds ``random`` and torch before the
    query and again before the texture (``moco/loader.py:128-136``); every draw of these pipelines
    comes from torch's RNG."""

    def __init__(self, transform: Any, source: int = 0) -> None:
        self.transform, self.source = transform, source

    @staticmethod
    def partner(base: Dataset[Any], index: int) -> Any:
        """The paired image of item ``index`` of ``base`` (through ``Subset`` wrappers)."""
        while isinstance(base, Subset):
            index = base.indices[index]
            base = base.dataset
        if not hasattr(base, "paired_image"):
            raise TypeError(f"a paired view needs a dataset of image pairs (data.texture_path), "
                            f"not {type(base).__name__}")
        return base.paired_image(index)

    def replay(self, base: Dataset[Any], index: int, state: torch.Tensor) -> torch.Tensor:
        paired = self.partner(base, index)
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        try:
            return cast(torch.Tensor, self.transform(paired))
        finally:
            torch.set_rng_state(after)


class MultiView(Dataset[Any]):
    """Wrap a dataset of (raw image, label) into ``((view_1, ..., view_k), label)``. An item holding an
    :class:`ImageGroup` gets view ``k`` of its image ``k``; a :class:`PairedView` transform is applied to
    the item's paired image with the random draws of its source view."""

    def __init__(self, base: Dataset[Any], transforms: Sequence[v2.Transform]) -> None:
        self.base, self.transforms = base, list(transforms)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, ...], int]:
        image, label = self.base[i]
        if isinstance(image, ImageGroup) and len(image) < len(self.transforms):
            raise ValueError(f"item {i} holds {len(image)} images, fewer than the {len(self.transforms)} views")
        views: list[torch.Tensor] = []
        states: dict[int, torch.Tensor] = {}
        for k, t in enumerate(self.transforms):
            if isinstance(t, PairedView):
                views.append(t.replay(self.base, i, states[t.source]))
                continue
            states[k] = torch.get_rng_state()
            views.append(t(image[k] if isinstance(image, ImageGroup) else image))
        return tuple(views), label

    def set_augmentation_strength(self, strength: float) -> None:
        """Set the strength of every :class:`StrengthAugment` view (DynACL); other views are fixed."""
        for t in self.transforms:
            if isinstance(t, StrengthAugment):
                t.strength = strength


def build_mixup(cfg: DataConfig, num_classes: int) -> Any | None:
    """timm's Mixup/CutMix (with label smoothing) when either is on, else None."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
