"""Train and eval image transforms of the official DeiT-style pipeline (RandAugment or ThreeAugment)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode


class PilGaussianBlur:
    """Gaussian blur with a radius drawn uniformly from ``[radius_min, radius_max]`` (DeiT-III ``GaussianBlur``).

    torchvision's ``GaussianBlur`` is parameterised by a kernel size; DeiT blurs with PIL's radius-based filter,
    which this reproduces.
    """

    def __init__(self, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = random.uniform(self.radius_min, self.radius_max)
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(radius_min={self.radius_min}, radius_max={self.radius_max})"


def build_transform(
        is_training: bool,
        img_size: int,
        *,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        three_augment: bool = False,
        color_jitter: float | None = 0.3,
        reprob: float = 0.25,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
) -> Callable[[Image.Image], torch.Tensor]:
    """Builds the PIL image -> normalized ``(3, img_size, img_size)`` tensor transform.

    Train (default): timm ``create_transform``, i.e. RandomResizedCrop(``scale``, ratio 3/4-4/3, ``interpolation``)
    + horizontal flip + RandAugment ``auto_augment`` + ToTensor + Normalize + RandomErasing(``reprob``, pixel mode,
    one box). timm drops ColorJitter whenever ``auto_augment`` is set, exactly as the official code.

    Train with ``three_augment`` (DeiT-III, ``augment.new_data_aug_generator``): RandomResizedCrop + flip +
    one of {Grayscale, Solarize, GaussianBlur(sigma 0.1-2)} + ColorJitter(``color_jitter`` x3) + ToTensor +
    Normalize. ``auto_augment`` and ``reprob`` are ignored, as in the official code.

    Eval: Resize(``int(img_size / crop_pct)``, ``interpolation``) + CenterCrop(``img_size``) + ToTensor + Normalize.

    Args:
        is_training: Selects the train or the eval pipeline.
        img_size: Output side in pixels.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        crop_pct: Eval center-crop fraction (0.875: 224 -> resize 256; 1.0: resize straight to ``img_size``).
        mean: Per-channel normalization mean.
        std: Per-channel normalization std.
        auto_augment: timm RandAugment/AutoAugment policy string; None disables it (ColorJitter then applies).
        three_augment: Use the DeiT-III ThreeAugment train pipeline instead.
        color_jitter: Brightness/contrast/saturation strength; None or 0 disables it.
        reprob: Random-erasing probability (RandAugment pipeline only).
        scale: RandomResizedCrop area range.
        hflip: Horizontal-flip probability.

    Returns:
        A callable mapping a PIL image to a float tensor of shape ``(3, img_size, img_size)``.
    """
    if not is_training:
        return transforms.Compose([
            # int() floors like the official `int(args.input_size / args.eval_crop_ratio)`: 128 / 0.875 -> 146.
            transforms.Resize(int(img_size / crop_pct), interpolation=InterpolationMode(interpolation)),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    if three_augment:
        tfl = [
            RandomResizedCropAndInterpolation(img_size, scale=tuple(scale), interpolation=interpolation),
            transforms.RandomHorizontalFlip(p=hflip),
            transforms.RandomChoice([
                transforms.Grayscale(num_output_channels=3),
                transforms.RandomSolarize(threshold=128, p=1.0),  # == PIL ImageOps.solarize(img) as in DeiT
                PilGaussianBlur(radius_min=0.1, radius_max=2.0),
            ]),
        ]
        if color_jitter:
            tfl.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
        tfl += [transforms.ToTensor(), transforms.Normalize(mean, std)]
        return transforms.Compose(tfl)

    transform = create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=color_jitter or None,
        auto_augment=auto_augment or None,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=reprob,
        re_mode="pixel",
        re_count=1,
    )
    _use_pil_compatible_posterize(transform)
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's ``posterize`` with the old-Pillow meaning of ``bits_to_keep <= 0``: an all-zero image.

    RandAugment's posterize level reaches 0 bits (``PosterizeIncreasing`` at magnitude 10, ``Posterize`` at low
    magnitudes). Old Pillow applied the all-zero lookup table; Pillow 13 raises ``ValueError``, which would
    kill a DataLoader worker mid-epoch.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _use_pil_compatible_posterize(transform: transforms.Compose) -> None:
    """Swaps :func:`_posterize` into the posterize ops of any timm RandAugment/AutoAugment/AugMix in ``transform``."""
    for t in transform.transforms:
        ops = list(getattr(t, "ops", [])) + [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
