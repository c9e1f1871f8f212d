"""Data pipeline: datasets, transforms, samplers, loaders and Mixup/CutMix (plain functions, no Hydra)."""

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .datasets import DATASET_NAMES, SafeImageFolder, SyntheticDataset, build_dataset, check_imagefolder
from .digits import prepare_digits
from .errors import CorruptImageError, CorruptImageWarning, DatasetError
from .gpu_augment import build_device_transform
from .gpu_decode import DECODE_MODES, EncodedImageFolder, GpuDecodeLoader, build_gpu_decode_loader
from .loader import ResumableDataLoader, build_loader, set_sampler_epoch
from .mixup import build_mixup
from .samplers import DistributedEvalSampler, RASampler
from .transforms import build_transform

__all__ = [
    "DATASET_NAMES",
    "DECODE_MODES",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "CorruptImageError",
    "CorruptImageWarning",
    "DatasetError",
    "DistributedEvalSampler",
    "EncodedImageFolder",
    "GpuDecodeLoader",
    "RASampler",
    "ResumableDataLoader",
    "SafeImageFolder",
    "SyntheticDataset",
    "build_dataset",
    "build_device_transform",
    "build_gpu_decode_loader",
    "build_loader",
    "build_mixup",
    "build_transform",
    "check_imagefolder",
    "prepare_digits",
    "set_sampler_epoch",
]
