"""Batched train/eval image transforms on (GPU or CPU) tensors, statistically equal to :func:`build_transform`.

:class:`DeviceTrainTransform` and :class:`DeviceEvalTransform` take a list of decoded ``uint8 (3, H_i, W_i)`` images
(all on one device, any sizes) and return the normalized ``float32 (B, 3, S, S)`` batch that the PIL pipeline of
:func:`visionmamba.data.build_transform` would give image by image. They run the same augmentation family with the
same parameter distributions; all random parameters of a batch are drawn on the CPU from one seeded
``torch.Generator`` (so a batch is a pure function of its images and its seed, on any device), then applied with a
few batched kernels per operation on the images' device.

What is identical to the CPU (PIL/timm) pipeline
    * RandomResizedCrop parameters: timm's ``RandomResizedCropAndInterpolation.get_params`` (10 attempts of area in
      ``scale`` and log-uniform aspect ratio in (3/4, 4/3), rounding as Python's ``round``, then the central-crop
      fallback), horizontal flip with probability ``hflip``.
    * RandAugment (timm ``rand-*`` policy strings, parsed by timm itself): the op list, ``n`` layers chosen uniformly
      with replacement (weighted without replacement for ``t``-weighted policies), per-op probability ``p``, the
      Gaussian magnitude noise ``mstd`` clipped to [0, ``mmax`` or 10] drawn per op application, the random sign,
      and every op's level-to-argument formula. Images stay ``uint8`` between the steps as they do in PIL.
    * Pointwise ops are bit-exact with PIL for the same argument: AutoContrast, Equalize, Invert, Posterize (0 bits
      gives a black image, as the CPU path's patched posterize), Solarize, SolarizeAdd, and the ImageEnhance blends
      Color / Contrast / Brightness (and ColorJitter / Desaturate built on them), including PIL's grayscale weights,
      its rounded contrast mean and its truncating blend. Sharpness uses PIL's 3x3 SMOOTH kernel with the border
      pixels kept, as PIL does.
    * Normalization (``ToTensor`` + ``Normalize``) and RandomErasing (timm, ``pixel`` mode, one box, same area /
      aspect distributions and placement; per-pixel standard-normal noise).
    * Eval: torchvision ``Resize(int(img_size / crop_pct))`` of the shorter side (same output size rule) +
      ``CenterCrop`` (same offset rounding) + normalize.

Documented differences (statistically irrelevant for training, but not bit-exact)
    * Resampling of the crop-resize (and the eval resize): ``F.interpolate(antialias=True)`` in float32 (PIL's
      separable support-scaled filters with the same bicubic a=-0.5 / bilinear kernels, so downscaling is antialiased
      like PIL), then rounded to uint8 like PIL; PIL computes in fixed point. Mean |diff| ~0.2 level, bilinear at
      most 1 level, bicubic up to ~13 levels at sharp edges of strongly upscaled small crops; ``nearest`` uses
      ``nearest-exact`` (PIL's pixel-centre rule) and is exact.
    * Rotate / ShearX / ShearY / TranslateX / TranslateY: the same inverse affine matrix as PIL (pixel centres,
      rotation about the image centre), PIL's fill colour and inside-test computed in float64 as PIL does, PIL's
      truncation to uint8, sampled by ``grid_sample`` with replicated borders. Bilinear agrees with PIL to 1 level,
      nearest except a few points PIL's fixed-point stepping puts across a pixel edge; ``grid_sample``'s bicubic
      kernel is a=-0.75 where PIL's ``Image.transform`` uses a=-1 (mean |diff| < 1 level, a few levels at edges).
    * GaussianBlur (ThreeAugment and timm's 3a ops): a true Gaussian of sigma = radius (kernel 2*ceil(3 sigma)+1,
      replicated edges); PIL approximates it with three extended box blurs of the same variance.
    * RandomErasing noise and every other random number come from torch generators (CPU for all parameters, the
      images' device for the erasing noise), not from Python's ``random`` / the worker's torch RNG: the same
      distributions, other streams. The decoded pixels themselves may differ from PIL by the JPEG decoder (nvJPEG vs
      libjpeg-turbo chroma upsampling/IDCT: a few levels, see ``tests/gpu/test_gpu_decode_gpu.py``); CPU decoding
      with ``torchvision.io.decode_jpeg`` is bit-identical to PIL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform

__all__ = [
    "DeviceEvalTransform",
    "DeviceTrainTransform",
    "RandAugmentSpec",
    "build_device_transform",
    "parse_rand_augment",
    "sample_erasing",
    "sample_resized_crops",
]

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# interpolation -> (F.interpolate mode, antialias): torch's antialiased kernels are PIL's support-scaled filters.
_RESIZE_MODES = {"bicubic": ("bicubic", True), "bilinear": ("bilinear", True), "nearest": ("nearest-exact", False)}
_LEVEL_DENOM = 10.0  # timm's magnitude scale: level = magnitude / 10
_TRANSLATE_PCT = 0.45  # timm's default translate_pct of the *Rel translations


# ------------------------------------------------------------------------------------------ parameter sampling
def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """float64 uniform draws on the CPU (Python's ``random.uniform`` precision)."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def sample_resized_crops(
        sizes: torch.Tensor,
        generator: torch.Generator,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        attempts: int = 10,
) -> torch.Tensor:
    """timm ``RandomResizedCropAndInterpolation.get_params`` for a batch, vectorized.

    Args:
        sizes: ``(B, 2)`` integer ``(height, width)`` of the images.
        generator: CPU generator all draws come from.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height), sampled log-uniformly.
        attempts: Tries before the central-crop fallback (timm: 10).

    Returns:
        ``(B, 4)`` int64 ``(top, left, height, width)`` of each crop.
    """
    sizes = sizes.to(torch.float64)
    num = sizes.shape[0]
    img_h, img_w = sizes[:, :1], sizes[:, 1:]  # (B, 1) each
    target_area = img_h * img_w * _uniform(generator, (num, attempts), scale[0], scale[1])  # (B, attempts)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(_uniform(generator, (num, attempts), *log_ratio))
    # torch.round rounds half to even, as Python's round() in timm
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w <= img_w) & (crop_h <= img_h)  # (B, attempts)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
    crop_h = crop_h.gather(1, first).squeeze(1)
    crop_w = crop_w.gather(1, first).squeeze(1)
    img_h, img_w = img_h.squeeze(1), img_w.squeeze(1)
    offsets = _uniform(generator, (num, 2))
    # random.randint(0, n) is inclusive: floor(u * (n + 1))
    top = torch.floor(offsets[:, 0] * (img_h - crop_h + 1)).clamp_max(img_h - crop_h)
    left = torch.floor(offsets[:, 1] * (img_w - crop_w + 1)).clamp_max(img_w - crop_w)

    # Central-crop fallback where no attempt fits: the whole image, clipped to the ratio range.
    fallback = ~fits.any(dim=1)
    if bool(fallback.any()):
        in_ratio = img_w / img_h
        fb_w, fb_h = img_w.clone(), img_h.clone()
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fb_h = torch.where(narrow, torch.round(img_w / min(ratio)), fb_h)
        fb_w = torch.where(wide, torch.round(img_h * max(ratio)), fb_w)
        crop_h = torch.where(fallback, fb_h, crop_h)
        crop_w = torch.where(fallback, fb_w, crop_w)
        top = torch.where(fallback, torch.div(img_h - fb_h, 2, rounding_mode="floor"), top)
        left = torch.where(fallback, torch.div(img_w - fb_w, 2, rounding_mode="floor"), left)
    crop_h, crop_w = crop_h.clamp_min(1), crop_w.clamp_min(1)  # tiny images: never an empty crop
    return torch.stack([top, left, crop_h, crop_w], dim=1).to(torch.int64)  # (B, 4)


def sample_erasing(
        batch: int,
        height: int,
        width: int,
        probability: float,
        generator: torch.Generator,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        attempts: int = 10,
) -> torch.Tensor:
    """timm ``RandomErasing`` (one box per image) boxes for a batch.

    Returns:
        ``(B, 4)`` int64 ``(top, left, height, width)``; height 0 where the image is not erased.
    """
    apply = _uniform(generator, (batch,)) < probability  # timm: skipped when random() > probability
    area = float(height * width)
    target_area = _uniform(generator, (batch, attempts), min_area, max_area) * area
    aspect = torch.exp(_uniform(generator, (batch, attempts), math.log(min_aspect), math.log(1 / min_aspect)))
    box_h = torch.round(torch.sqrt(target_area * aspect))
    box_w = torch.round(torch.sqrt(target_area / aspect))
    fits = (box_w < width) & (box_h < height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    box_h = box_h.gather(1, first).squeeze(1)
    box_w = box_w.gather(1, first).squeeze(1)
    offsets = _uniform(generator, (batch, 2))
    top = torch.floor(offsets[:, 0] * (height - box_h + 1)).clamp_max(height - box_h)
    left = torch.floor(offsets[:, 1] * (width - box_w + 1)).clamp_max(width - box_w)
    erase = apply & fits.any(dim=1)
    box_h = torch.where(erase, box_h, torch.zeros_like(box_h))
    return torch.stack([top, left, box_h, box_w], dim=1).to(torch.int64)  # (B, 4)


# ------------------------------------------------------------------------------------------------- RandAugment
# timm op name -> how the GPU path applies it. Every name of timm's default, increasing and weighted/3a sets.
_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
_BLEND_OPS = {"Color": "color", "ColorIncreasing": "color", "Contrast": "contrast", "ContrastIncreasing": "contrast",
              "Brightness": "brightness", "BrightnessIncreasing": "brightness", "Sharpness": "sharpness",
              "SharpnessIncreasing": "sharpness", "Desaturate": "color"}
SUPPORTED_OPS = frozenset((
    "AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
    "SolarizeIncreasing", "SolarizeAdd", "GaussianBlur", "GaussianBlurRand", *_GEOMETRIC_OPS, *_BLEND_OPS,
))


@dataclass(frozen=True)
class RandAugmentSpec:
    """A timm RandAugment policy, as timm's own parser reads it (see :func:`parse_rand_augment`)."""

    ops: tuple[str, ...]
    num_layers: int
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    choice_weights: tuple[float, ...] | None
    translate_const: float  # pixels of the absolute TranslateX/Y at magnitude 10 (timm: 0.45 * img_size)


def parse_rand_augment(config_str: str, img_size: int) -> RandAugmentSpec:
    """Parses a timm ``rand-...`` policy string with timm itself (so both paths read it identically).

    Raises:
        ValueError: Not a ``rand-`` policy (AutoAugment ``v0``/``original``, AugMix), or an op the GPU path lacks.
    """
    if not config_str.startswith("rand"):
        raise ValueError(f"the GPU augmentation implements timm RandAugment ('rand-...') policies, not {config_str!r}")
    translate_const = int(img_size * 0.45)  # timm transforms_imagenet_train's aa_params
    policy = rand_augment_transform(config_str, {"translate_const": translate_const})
    names = tuple(op.name for op in policy.ops)
    missing = sorted(set(names) - SUPPORTED_OPS)
    if missing:
        raise ValueError(f"RandAugment policy {config_str!r} uses ops the GPU augmentation does not implement: "
                         f"{', '.join(missing)}")
    first = policy.ops[0]
    weights = None if policy.choice_weights is None else tuple(float(w) for w in policy.choice_weights)
    return RandAugmentSpec(
        ops=names, num_layers=int(policy.num_layers), prob=float(first.prob), magnitude=float(first.magnitude),
        magnitude_std=float(first.magnitude_std or 0.0), magnitude_max=float(first.magnitude_max or _LEVEL_DENOM),
        choice_weights=weights, translate_const=float(translate_const))


def _level_to_arg(name: str, magnitude: torch.Tensor, sign: torch.Tensor, extra: torch.Tensor,
                  translate_const: float) -> torch.Tensor:
    """timm's ``LEVEL_TO_ARG[name]`` on float64 tensors (``sign`` is +-1: timm's ``_randomly_negate``)."""
    level = magnitude / _LEVEL_DENOM
    if name == "Rotate":
        return level * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return level * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return level * _TRANSLATE_PCT * sign
    if name in ("TranslateX", "TranslateY"):
        return level * translate_const * sign
    if name == "Posterize":
        return torch.floor(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(level * 4)
    if name == "PosterizeOriginal":
        return torch.floor(level * 4) + 4
    if name == "Solarize":
        return torch.floor(level * 256).clamp_max(256)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(level * 256).clamp_max(256)
    if name == "SolarizeAdd":
        return torch.floor(level * 110).clamp_max(128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (1.0 + level * 0.9 * sign).clamp_min(0.1)
    if name == "Desaturate":  # _minmax_level_to_arg(0.5, 1.0), then desaturate's 1 - factor
        return (1.0 - (0.5 + 0.5 * level).clamp(0.5, 1.0)).clamp(0.0, 1.0)
    if name == "GaussianBlur":
        return (0.1 + 1.9 * level).clamp(0.1, 2.0)
    if name == "GaussianBlurRand":  # radius ~ U(0.1, 2 * clamp(level, 0, 1))
        return 0.1 + (2.0 * level.clamp(0.0, 1.0) - 0.1) * extra
    return torch.zeros_like(magnitude)  # AutoContrast, Equalize, Invert


@dataclass
class _RandAugmentDraw:
    op: torch.Tensor  # (B, L) int64 index into spec.ops
    apply: torch.Tensor  # (B, L) bool
    arg: torch.Tensor  # (B, L) float64 op argument


def _sample_rand_augment(spec: RandAugmentSpec, batch: int, generator: torch.Generator) -> _RandAugmentDraw:
    layers, num_ops = spec.num_layers, len(spec.ops)
    if spec.choice_weights is None:  # np.random.choice(ops, n, replace=True)
        op = torch.randint(num_ops, (batch, layers), generator=generator)
    else:  # weighted: without replacement
        weights = torch.tensor(spec.choice_weights, dtype=torch.float64).expand(batch, num_ops)
        op = torch.multinomial(weights, layers, replacement=False, generator=generator)
    apply = _uniform(generator, (batch, layers)) <= spec.prob  # timm skips when random() > prob
    magnitude = torch.full((batch, layers), spec.magnitude, dtype=torch.float64)
    if math.isinf(spec.magnitude_std):
        magnitude = _uniform(generator, (batch, layers), 0.0, spec.magnitude)
    elif spec.magnitude_std > 0:
        magnitude = magnitude + spec.magnitude_std * torch.randn((batch, layers), generator=generator,
                                                                 dtype=torch.float64)
    magnitude = magnitude.clamp(0.0, spec.magnitude_max)
    sign = torch.where(_uniform(generator, (batch, layers)) > 0.5, -1.0, 1.0).to(torch.float64)
    extra = _uniform(generator, (batch, layers))
    arg = torch.zeros((batch, layers), dtype=torch.float64)
    for k, name in enumerate(spec.ops):
        chosen = op == k
        if bool(chosen.any()):
            arg[chosen] = _level_to_arg(name, magnitude[chosen], sign[chosen], extra[chosen], spec.translate_const)
    return _RandAugmentDraw(op=op, apply=apply, arg=arg)


# ------------------------------------------------------------------------------------ uint8 image operations
# All take x: uint8 (n, 3, H, W) and per-image arguments on x's device, and return uint8 (n, 3, H, W).
def _to_uint8_round(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _to_uint8_trunc(x: torch.Tensor) -> torch.Tensor:
    """PIL's blend: clamp, then truncate toward zero."""
    return x.clamp_(0, 255).floor_().to(torch.uint8)


def pil_grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``. uint8 (n, 1, H, W)."""
    xi = x.to(torch.int32)
    gray = (xi[:, 0] * 19595 + xi[:, 1] * 38470 + xi[:, 2] * 7471 + 0x8000) >> 16  # (n, H, W)
    return gray.unsqueeze(1).to(torch.uint8)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)`` (ImageEnhance): float32, clamped, truncated."""
    base = degenerate.to(torch.float32)
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    return _to_uint8_trunc(base + f * (x.to(torch.float32) - base))


def adjust_color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the grayscale image."""
    return _blend(pil_grayscale(x), x, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with a constant image of the rounded mean gray level."""
    gray = pil_grayscale(x)
    mean = gray.to(torch.float64).mean(dim=(-3, -2, -1), keepdim=True)  # (n, 1, 1, 1)
    return _blend(torch.floor(mean + 0.5), x, factor)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return _to_uint8_trunc(x.to(torch.float32) * factor.to(torch.float32).view(-1, 1, 1, 1))


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with PIL's SMOOTH filter (3x3, centre 5, divisor 13, border kept)."""
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x.clone()
    xf = x.to(torch.float32)
    # exact integer 3x3 sums (a pooling kernel: no cuDNN convolution, whose autotuner would re-run for every new
    # sub-batch size under cudnn.benchmark); (sum + 4 centre) / 13 is never a rounding tie
    window_sum = F.avg_pool2d(xf, 3, stride=1, divisor_override=1)  # (n, c, h - 2, w - 2)
    smooth = (window_sum + 4.0 * xf[:, :, 1:-1, 1:-1]) / 13.0
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = _to_uint8_round(smooth)
    return _blend(degenerate, x, factor)


_BLEND_FUNCTIONS = {"color": adjust_color, "contrast": adjust_contrast, "brightness": adjust_brightness,
                    "sharpness": adjust_sharpness}


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per image and channel lookup: lut (n, 3, 256) integer."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).to(torch.int64)  # (n*c, h*w)
    return lut.reshape(n * c, 256).to(torch.uint8).gather(1, flat).reshape(n, c, h, w)


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast`` (cutoff 0), per channel: ``lut[i] = int(i * scale + offset)``."""
    lo = x.amin(dim=(-2, -1)).to(torch.float64)  # (n, c)
    hi = x.amax(dim=(-2, -1)).to(torch.float64)
    stretch = hi > lo
    scale = torch.where(stretch, 255.0 / (hi - lo).clamp_min(1.0), torch.ones_like(lo))
    offset = torch.where(stretch, -lo * scale, torch.zeros_like(lo))
    levels = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = torch.trunc(levels * scale[..., None] + offset[..., None]).clamp(0, 255)  # (n, c, 256)
    return _apply_lut(x, lut)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``, per channel (PIL's lookup table from the histogram, batched)."""
    n, c, h, w = x.shape
    # (n*c, 256) histograms with scatter_add (torch.bincount would sync with the host to size its output)
    levels = x.reshape(n * c, h * w).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, levels,
                                                                                    torch.ones_like(levels))
    last_value = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(dim=1, keepdim=True)
    last_count = hist.gather(1, last_value.clamp_min(0))  # count of the largest value present
    step = torch.div(h * w - last_count, 255, rounding_mode="floor")  # (n*c, 1)
    exclusive = torch.cumsum(hist, dim=1) - hist  # pixels below each level
    safe_step = step.clamp_min(1)
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + exclusive, safe_step, rounding_mode="floor")
    identity = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(step > 0, lut.clamp_max(255), identity)  # step 0: PIL keeps the channel (one level only)
    return _apply_lut(x, lut.reshape(n, c, 256))


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` most significant bits (0 bits: black, as the CPU path's patched posterize)."""
    keep = bits.to(torch.int64).clamp(0, 8)
    mask = ((0xFF << (8 - keep)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize``: invert the levels ``>= threshold``."""
    thresh = threshold.to(torch.int16).view(-1, 1, 1, 1)
    return torch.where(x.to(torch.int16) >= thresh, 255 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """timm ``solarize_add``: add ``add`` (clipped at 255) to the levels below ``threshold``."""
    raised = (x.to(torch.int16) + add.to(torch.int16).view(-1, 1, 1, 1)).clamp_max(255).to(torch.uint8)
    return torch.where(x < threshold, raised, x)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image ``sigma`` (PIL ``GaussianBlur(radius=sigma)``), replicated edges.

    ``sigma`` (n,) lives on the CPU: the kernel size and weights are computed there (no device sync)."""
    n, c, h, w = x.shape
    sigma = sigma.detach().to("cpu", torch.float64)
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)  # (k,)
    weights = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)  # (n, k)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    weights = weights.to(device=x.device, dtype=torch.float32, non_blocking=True).view(1, n * c, 1, -1)
    planes = x.to(torch.float32).reshape(1, n * c, h, w)  # one plane per image channel
    # Separable, as weighted sums of shifted slices: per-plane kernels without a grouped cuDNN convolution (whose
    # autotuner would re-run for every new sub-batch size under cudnn.benchmark)
    padded = F.pad(planes, (radius, radius, 0, 0), mode="replicate")  # (1, n*c, h, w + 2r)
    planes = sum(weights[..., t:t + 1] * padded[..., t:t + w] for t in range(2 * radius + 1))
    padded = F.pad(planes, (0, 0, radius, radius), mode="replicate")  # (1, n*c, h + 2r, w)
    columns = weights.view(1, n * c, -1, 1)
    planes = sum(columns[:, :, t:t + 1] * padded[:, :, t:t + h] for t in range(2 * radius + 1))
    return _to_uint8_round(planes.reshape(n, c, h, w))


def _affine_matrices(name: str, arg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's inverse affine data ``(a, b, c, d, e, f)`` (output -> input, pixel-centre coordinates), (n, 2, 3)."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "Rotate":  # PIL Image.rotate: about the centre, counter-clockwise degrees
        angle = -torch.deg2rad(torch.remainder(arg, 360.0))
        cos, sin = torch.cos(angle), torch.sin(angle)
        cx, cy = width / 2.0, height / 2.0
        a, b, d, e = cos, sin, -sin, cos
        c = a * -cx + b * -cy + cx
        f = d * -cx + e * -cy + cy
        rows = (a, b, c, d, e, f)
    elif name == "ShearX":
        rows = (one, arg, zero, zero, one, zero)
    elif name == "ShearY":
        rows = (one, zero, zero, arg, one, zero)
    elif name in ("TranslateX", "TranslateXRel"):
        shift = arg * width if name == "TranslateXRel" else arg
        rows = (one, zero, shift, zero, one, zero)
    else:  # TranslateY, TranslateYRel
        shift = arg * height if name == "TranslateYRel" else arg
        rows = (one, zero, zero, zero, one, shift)
    return torch.stack(rows, dim=1).view(-1, 2, 3)


def affine(x: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """PIL ``Image.transform(AFFINE, matrix, resample, fillcolor)`` for a batch.

    Args:
        x: uint8 (n, 3, H, W).
        matrices: (n, 2, 3) float64 PIL inverse matrices (pixel-centre coordinates).
        fill: (3,) float fill colour on x's device.
        mode: ``grid_sample`` mode.
    """
    n, c, h, w = x.shape
    m = matrices.to(device=x.device, dtype=torch.float64, non_blocking=True)  # (no stream sync for the copy)
    # Source point of every output pixel centre, in float64 as PIL computes it (pixel centres at i + 0.5)
    out_y, out_x = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
                                  torch.arange(w, device=x.device, dtype=torch.float64) + 0.5, indexing="ij")
    src_x = m[:, 0, 0, None, None] * out_x + m[:, 0, 1, None, None] * out_y + m[:, 0, 2, None, None]  # (n, H, W)
    src_y = m[:, 1, 0, None, None] * out_x + m[:, 1, 1, None, None] * out_y + m[:, 1, 2, None, None]
    # PIL fills an output pixel whose source point lies outside [0, W) x [0, H), else samples with clamped taps
    inside = ((src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)).unsqueeze(1)  # (n, 1, H, W)
    if mode == "nearest":
        # PIL takes pixel floor(x); grid_sample rounds x - 1/2 half-to-even. A 1e-4-pixel nudge makes exact ties
        # (shears by multiples of 0.1) fall on PIL's side.
        src_x, src_y = src_x + 1e-4, src_y + 1e-4
    # align_corners=False: normalized u = 2 x / W - 1
    grid = torch.stack([2.0 * src_x / w - 1.0, 2.0 * src_y / h - 1.0], dim=-1).to(torch.float32)  # (n, H, W, 2)
    sampled = F.grid_sample(x.to(torch.float32), grid, mode=mode, padding_mode="border", align_corners=False)
    return _to_uint8_trunc(torch.where(inside, sampled, fill.view(1, c, 1, 1)))  # PIL truncates here


# ------------------------------------------------------------------------------------------------ transforms
def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")


def _resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """uint8/float (3, h, w) -> float32 (3, *size), PIL-like (antialiased for bilinear/bicubic)."""
    mode, antialias = _RESIZE_MODES[interpolation]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(image.unsqueeze(0).to(torch.float32), size=size, mode=mode, antialias=antialias,
                         **kwargs)[0]


class _Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        # (x / 255 - mean) / std == (x - 255 mean) * (1 / (255 std)): one subtraction, one multiplication
        self.shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._on:
            self._on[x.device] = (self.shift.to(x.device), self.scale.to(x.device))
        shift, scale = self._on[x.device]
        return x.to(torch.float32).sub_(shift).mul_(scale)


class DeviceEvalTransform:
    """``Resize(int(img_size / crop_pct))`` + ``CenterCrop(img_size)`` + normalize, on the images' device.

    Call with a list of uint8 ``(3, H_i, W_i)`` images; returns float32 ``(B, 3, img_size, img_size)``.
    """

    def __init__(self, img_size: int, *, interpolation: str = "bicubic", crop_pct: float = 0.875,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        _check_interpolation(interpolation)
        self.img_size = img_size
        self.resize_to = int(img_size / crop_pct)  # int() floors like the CPU path
        self.interpolation = interpolation
        self.normalize = _Normalize(mean, std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """torchvision ``Resize(int)``: the shorter side becomes ``resize_to``, the longer one is floored."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)  # (height, width)

    def __call__(self, images: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        size = self.img_size
        out = []
        for image in images:
            _, h, w = image.shape
            new_h, new_w = self.output_size(h, w)
            resized = _resize(image, (new_h, new_w), self.interpolation)  # (3, new_h, new_w)
            if new_h < size or new_w < size:  # CenterCrop pads with zeros first (crop_pct > 1)
                pad_h, pad_w = max(size - new_h, 0), max(size - new_w, 0)
                resized = F.pad(resized, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
                new_h, new_w = resized.shape[-2:]
            top = int(round((new_h - size) / 2.0))
            left = int(round((new_w - size) / 2.0))
            out.append(resized[:, top:top + size, left:left + size])
        batch = _to_uint8_round(torch.stack(out))  # (B, 3, size, size): PIL's uint8 image
        return self.normalize(batch)


class DeviceTrainTransform:
    """The train pipeline of :func:`build_transform` on a batch of decoded images (see the module docstring).

    RandAugment (``auto_augment``) pipeline: RandomResizedCrop + flip + RandAugment + normalize + RandomErasing.
    ``three_augment``: RandomResizedCrop + flip + one of {grayscale, solarize(128), Gaussian blur} + ColorJitter +
    normalize. No ``auto_augment`` and no ``three_augment``: RandomResizedCrop + flip + ColorJitter + normalize +
    RandomErasing. Arguments are those of :func:`build_transform`.
    """

    def __init__(
            self,
            img_size: int,
            *,
            interpolation: str = "bicubic",
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            std: Sequence[float] = IMAGENET_DEFAULT_STD,
            auto_augment: str | None = "rand-m9-mstd0.5-inc1",
            three_augment: bool = False,
            color_jitter: float | None = 0.3,
            reprob: float = 0.25,
            scale: tuple[float, float] = (0.08, 1.0),
            hflip: float = 0.5,
    ) -> None:
        _check_interpolation(interpolation)
        self.img_size = img_size
        self.interpolation = interpolation
        self.grid_mode = interpolation  # grid_sample has the same three names
        self.scale = tuple(float(s) for s in scale)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.hflip = float(hflip)
        self.three_augment = bool(three_augment)
        self.rand_augment = None
        if auto_augment and not three_augment:
            self.rand_augment = parse_rand_augment(auto_augment, img_size)
        # timm drops ColorJitter when auto_augment is set (except for its '3a' policies); ThreeAugment always
        # applies it when configured
        use_jitter = bool(color_jitter) and (three_augment or not auto_augment or "3a" in auto_augment)
        self.color_jitter = float(color_jitter) if use_jitter else 0.0
        self.reprob = 0.0 if three_augment else float(reprob)  # ThreeAugment never erases (official code)
        # RandAugment's fill colour for the geometric ops (timm: img_mean = round(255 * mean))
        self.fill = torch.tensor([min(255, round(255 * m)) for m in mean], dtype=torch.float32)
        self._fill_on: dict[torch.device, torch.Tensor] = {}
        self.normalize = _Normalize(mean, std)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _fill(self, device: torch.device) -> torch.Tensor:
        if device not in self._fill_on:
            self._fill_on[device] = self.fill.to(device)
        return self._fill_on[device]

    @staticmethod
    def _subset(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor | None:
        """Device index tensor of the True entries of a CPU bool mask (None if there are none)."""
        index = chosen.nonzero().flatten()
        if index.numel() == 0:
            return None
        return index.to(x.device, non_blocking=True)

    def _apply(self, x: torch.Tensor, name: str, index: torch.Tensor, arg: torch.Tensor) -> None:
        """Runs RandAugment op ``name`` on the images ``index`` of x in place; ``arg`` (n,) float64 on the CPU."""
        sub = x.index_select(0, index)
        dev_arg = arg.to(x.device, non_blocking=True)
        if name == "AutoContrast":
            out = auto_contrast(sub)
        elif name == "Equalize":
            out = equalize(sub)
        elif name == "Invert":
            out = invert(sub)
        elif name.startswith("Posterize"):
            out = posterize(sub, dev_arg)
        elif name in ("Solarize", "SolarizeIncreasing"):
            out = solarize(sub, dev_arg)
        elif name == "SolarizeAdd":
            out = solarize_add(sub, dev_arg)
        elif name in _BLEND_OPS:
            out = _BLEND_FUNCTIONS[_BLEND_OPS[name]](sub, dev_arg)
        elif name in ("GaussianBlur", "GaussianBlurRand"):
            out = gaussian_blur(sub, arg)
        elif name in _GEOMETRIC_OPS:
            matrices = _affine_matrices(name, arg, x.shape[-2], x.shape[-1])
            out = affine(sub, matrices, self._fill(x.device), self.grid_mode)
        else:  # parse_rand_augment refuses unknown names
            raise AssertionError(name)
        x.index_copy_(0, index, out)

    def _color_jitter(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """torchvision ``ColorJitter(j, j, j)`` on PIL: brightness/contrast/saturation in a random order."""
        batch, jitter = x.shape[0], self.color_jitter
        factors = _uniform(generator, (batch, 3), max(0.0, 1.0 - jitter), 1.0 + jitter)  # (B, 3)
        order = torch.argsort(_uniform(generator, (batch, 3)), dim=1)  # a uniform random permutation per image
        ops = (adjust_brightness, adjust_contrast, adjust_color)
        for slot in range(3):
            for op_id, op in enumerate(ops):
                chosen = order[:, slot] == op_id
                index = self._subset(x, chosen)
                if index is not None:
                    arg = factors[chosen, op_id].to(x.device, non_blocking=True)
                    x.index_copy_(0, index, op(x.index_select(0, index), arg))

    # -- the pipeline -------------------------------------------------------------------------------------------
    def __call__(self, images: Sequence[torch.Tensor], generator: torch.Generator,
                 noise_generator: torch.Generator | None = None) -> torch.Tensor:
        """Augments a batch.

        Args:
            images: uint8 ``(3, H_i, W_i)`` tensors on one device.
            generator: CPU generator of all parameters.
            noise_generator: Generator on the images' device for the random-erasing noise (None: the global RNG).

        Returns:
            float32 ``(B, 3, img_size, img_size)``, contiguous, on the images' device.
        """
        batch, size = len(images), self.img_size
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)  # (B, 2)
        crops = sample_resized_crops(sizes, generator, self.scale, self.ratio).tolist()
        flips = _uniform(generator, (batch,)) < self.hflip

        # RandomResizedCrop: crop then resize each image (sizes differ), then one uint8 batch as PIL would hold.
        resized = [_resize(image[:, top:top + h, left:left + w], (size, size), self.interpolation)
                   for image, (top, left, h, w) in zip(images, crops)]
        x = _to_uint8_round(torch.stack(resized))  # (B, 3, size, size)
        flip_index = self._subset(x, flips)
        if flip_index is not None:
            x.index_copy_(0, flip_index, x.index_select(0, flip_index).flip(-1))

        if self.three_augment:
            self._three_augment(x, generator)
        elif self.rand_augment is not None:
            spec = self.rand_augment
            draw = _sample_rand_augment(spec, batch, generator)
            for layer in range(spec.num_layers):
                for k, name in enumerate(spec.ops):
                    chosen = (draw.op[:, layer] == k) & draw.apply[:, layer]
                    index = self._subset(x, chosen)
                    if index is not None:
                        self._apply(x, name, index, draw.arg[chosen, layer])
        if self.color_jitter:
            self._color_jitter(x, generator)

        out = self.normalize(x)
        if self.reprob > 0:
            self._erase(out, generator, noise_generator)
        return out

    def _three_augment(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """DeiT-III: one of grayscale / solarize(128) / Gaussian blur (radius U(0.1, 2)) per image."""
        batch = x.shape[0]
        choice = torch.randint(3, (batch,), generator=generator)
        radius = _uniform(generator, (batch,), 0.1, 2.0)
        index = self._subset(x, choice == 0)
        if index is not None:
            x.index_copy_(0, index, pil_grayscale(x.index_select(0, index)).expand(-1, 3, -1, -1))
        index = self._subset(x, choice == 1)
        if index is not None:
            threshold = torch.full((index.numel(),), 128.0, device=x.device)
            x.index_copy_(0, index, solarize(x.index_select(0, index), threshold))
        index = self._subset(x, choice == 2)
        if index is not None:
            x.index_copy_(0, index, gaussian_blur(x.index_select(0, index), radius[choice == 2]))

    def _erase(self, out: torch.Tensor, generator: torch.Generator, noise_generator: torch.Generator | None) -> None:
        """timm RandomErasing(mode='pixel', one box) on the normalized batch, in place."""
        batch, channels, height, width = out.shape
        boxes = sample_erasing(batch, height, width, self.reprob, generator)  # (B, 4)
        erased = boxes[:, 2] > 0
        index = self._subset(out, erased)
        if index is None:
            return
        top, left, box_h, box_w = (v.to(out.device, non_blocking=True).view(-1, 1, 1) for v in boxes[erased].T)
        rows = torch.arange(height, device=out.device).view(1, -1, 1)
        cols = torch.arange(width, device=out.device).view(1, 1, -1)
        mask = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)  # (n, H, W)
        noise = torch.randn((index.numel(), channels, height, width), generator=noise_generator,
                            device=out.device, dtype=out.dtype)
        out.index_copy_(0, index, torch.where(mask.unsqueeze(1), noise, out.index_select(0, index)))


def build_device_transform(
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
) -> DeviceTrainTransform | DeviceEvalTransform:
    """The batched device counterpart of :func:`visionmamba.data.build_transform` (same arguments)."""
    if not is_training:
        return DeviceEvalTransform(img_size, interpolation=interpolation, crop_pct=crop_pct, mean=mean, std=std)
    return DeviceTrainTransform(img_size, interpolation=interpolation, mean=mean, std=std, auto_augment=auto_augment,
                                three_augment=three_augment, color_jitter=color_jitter, reprob=reprob,
                                scale=scale, hflip=hflip)
