"""Datasets: ImageNet-layout folders (with layout checks and corrupt-image skipping), synthetic tensors, digits."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from .digits import prepare_digits
from .errors import CorruptImageError, CorruptImageWarning, DatasetError
from .transforms import build_transform

DATASET_NAMES = ("imagefolder", "synthetic", "digits")
SPLITS = ("train", "val")
DEFAULT_DIGITS_ROOT = Path("~/.cache/visionmamba/digits")

# What PIL raises for unreadable files: UnidentifiedImageError and truncation are OSErrors, some plugins raise
# SyntaxError ("broken PNG file") or ValueError, and DecompressionBombError is its own class.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` that skips unreadable images instead of crashing a DataLoader worker.

    A sample whose file cannot be decoded is replaced by the next readable sample (``index + 1``, wrapping around),
    a :class:`CorruptImageWarning` is emitted for the file, and the file is flagged so that later fetches skip it
    without decoding it again. ``strict=True`` raises :class:`CorruptImageError` instead.

    The flags are a shared-memory tensor created before the workers start, so the main process and all DataLoader
    workers of one rank see the same flags (fork, spawn and forkserver alike). Read them from the main process with
    :attr:`num_bad_files` and :meth:`bad_files`; under DDP each rank has its own flags, so all-reduce (sum)
    ``num_bad_files`` for a job total (a file seen by several ranks then counts once per rank).

    Args:
        root: A split directory, ``<root>/<class>/<image>``.
        transform: Transform applied to the decoded PIL image.
        strict: Raise on the first unreadable image instead of skipping it.
        loader: Path -> PIL image function.
    """

    def __init__(
            self,
            root: str | os.PathLike,
            transform: Callable | None = None,
            *,
            strict: bool = False,
            loader: Callable[[str], Any] = default_loader,
    ) -> None:
        super().__init__(str(root), transform=transform, loader=loader)
        self.strict = strict
        # One byte per sample. Writes are idempotent (0 -> 1), so no lock is needed; two workers decoding the same
        # bad file at the same instant may both warn, which is harmless.
        self._bad_flags = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()  # (N,)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """Sorted class folders; hidden ones (``.ipynb_checkpoints``) are not classes, as in the layout check."""
        classes = _class_dirs(Path(directory))
        return classes, {cls: i for i, cls in enumerate(classes)}

    @property
    def num_bad_files(self) -> int:
        """Number of distinct unreadable files found so far by this process and its DataLoader workers."""
        return int(self._bad_flags.sum())

    def bad_files(self) -> list[str]:
        """Paths of the unreadable files found so far."""
        return [self.samples[i][0] for i in self._bad_flags.nonzero().flatten().tolist()]

    def bad_file_flags(self) -> torch.Tensor:
        """A copy of the per-sample flags (N,) uint8, 1 = unreadable: all-reduce them with ``max`` for the job's
        distinct count under DDP (a file that several ranks hit then counts once)."""
        return self._bad_flags.clone()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        _, sample, target = self.first_readable(index, self.loader)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def first_readable(self, index: int, read: Callable[[str], Any]) -> tuple[int, Any, int]:
        """``(i, read(path_i), target_i)`` of the first sample from ``index`` on (wrapping around) that ``read``
        can decode; the unreadable ones on the way are flagged, warned about and skipped (or raise when strict)."""
        num_samples = len(self.samples)
        for offset in range(num_samples):
            i = (index + offset) % num_samples
            if self._bad_flags[i]:
                continue
            path, target = self.samples[i]
            try:
                return i, read(path), target
            except _DECODE_ERRORS as exc:
                self.flag_unreadable(i, exc)
        raise DatasetError(f"Every image under '{self.root}' is unreadable; check the dataset files.")

    def flag_unreadable(self, index: int, exc: BaseException) -> None:
        """Records sample ``index`` as unreadable and warns once; raises :class:`CorruptImageError` when strict."""
        path = self.samples[index][0]
        if self.strict:
            raise CorruptImageError(f"Cannot decode image '{path}' ({type(exc).__name__}: {exc}).") from exc
        self._bad_flags[index] = 1
        warnings.warn(f"Skipping unreadable image '{path}' ({type(exc).__name__}: {exc}).", CorruptImageWarning,
                      stacklevel=4)  # the caller of __getitem__ (or load_decoded), as before


class SyntheticDataset(Dataset):
    """Deterministic random samples for speed runs: no decode, no augmentation.

    Sample ``i`` is ``(randn(in_chans, img_size, img_size), randint(num_classes))`` from a generator seeded with
    ``(seed, i)``, so it is identical in every worker, epoch and process. The images are standard-normal, i.e.
    already "normalized".

    Args:
        length: Number of samples.
        img_size: Image side.
        num_classes: Number of label values.
        in_chans: Number of image channels.
        seed: Seed of the whole dataset (train and val use different seeds).
    """

    def __init__(self, length: int, img_size: int, num_classes: int, *, in_chans: int = 3, seed: int = 0) -> None:
        if length <= 0:
            raise DatasetError(f"synthetic_length must be positive, got {length}.")
        self.length = length
        self.img_size = img_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.seed = seed
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a synthetic dataset of length {self.length}")
        # torch's CPU generator keeps only 32 bits of the seed: mix (seed, index) into 32 bits without collisions
        # for indices below ~2.6e9 (golden-ratio stride between dataset seeds).
        generator = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + index) & 0xFFFFFFFF)
        image = torch.randn(self.in_chans, self.img_size, self.img_size, generator=generator)  # (C, H, W)
        target = int(torch.randint(self.num_classes, (1,), generator=generator))
        return image, target


def build_dataset(
        name: str,
        split: str,
        *,
        root: str | os.PathLike | None = None,
        img_size: int = 224,
        num_classes: int | None = 1000,
        transform: Callable | None = None,
        synthetic_length: int = 10_000,
        in_chans: int = 3,
        strict: bool = False,
        decode: str = "cpu",
) -> Dataset:
    """Builds one split of a dataset.

    Args:
        name: ``"imagefolder"`` (``root/{train,val}/<class>/*``), ``"synthetic"`` or ``"digits"``
            (:func:`prepare_digits` into ``root``, default ``~/.cache/visionmamba/digits``, then imagefolder).
        split: ``"train"`` or ``"val"``.
        root: Dataset root holding the ``train`` and ``val`` folders (unused by ``"synthetic"``).
        img_size: Image side; used by the default transform and by ``"synthetic"``.
        num_classes: Expected number of classes; a folder dataset with another count is refused. None skips
            the check. ``"synthetic"`` draws labels in ``range(num_classes)`` (None means 1000).
        transform: Image transform of folder datasets; None means :func:`build_transform` for the split with
            its defaults. ``"synthetic"`` ignores it (its samples are already tensors).
        synthetic_length: Number of samples of ``"synthetic"``.
        in_chans: Channels of ``"synthetic"`` images.
        strict: Folder datasets raise :class:`CorruptImageError` on an unreadable image instead of skipping it.
        decode: ``"cpu"``: folder samples are decoded by PIL and transformed by ``transform``. ``"gpu"``: an
            :class:`~visionmamba.data.gpu_decode.EncodedImageFolder` of encoded file bytes, for
            :class:`~visionmamba.data.gpu_decode.GpuDecodeLoader` (``transform`` is not used).

    Returns:
        A map-style dataset of ``(image, label)`` pairs. Folder datasets are :class:`SafeImageFolder`
        (``.classes``, ``.num_bad_files``, ``.bad_files()``).

    Raises:
        DatasetError: Unknown name or split, or a folder layout problem (missing root or split folder, no class
            folders, an empty class folder, train/val class names that differ, a class count other than
            ``num_classes``).
    """
    name = name.lower()
    if name not in DATASET_NAMES:
        raise DatasetError(f"Unknown dataset '{name}'; valid names are {', '.join(DATASET_NAMES)}.")
    if split not in SPLITS:
        raise DatasetError(f"Unknown split '{split}'; valid splits are {', '.join(SPLITS)}.")
    if decode not in ("cpu", "gpu"):
        raise DatasetError(f"Unknown decode mode '{decode}'; valid modes are cpu, gpu.")
    if decode == "gpu" and name == "synthetic":
        raise DatasetError("decode='gpu' decodes image files; the synthetic dataset has none (use decode='cpu').")

    if name == "synthetic":
        return SyntheticDataset(
            synthetic_length,
            img_size,
            1000 if num_classes is None else num_classes,
            in_chans=in_chans,
            seed=SPLITS.index(split),
        )

    if name == "digits":
        root = prepare_digits(DEFAULT_DIGITS_ROOT if root is None else root)
    if root is None:
        raise DatasetError("The imagefolder dataset needs a root directory (root=None was given).")
    split_dir = check_imagefolder(root, split, num_classes=num_classes)
    if decode == "gpu":
        from .gpu_decode import EncodedImageFolder  # gpu_decode imports this module

        return EncodedImageFolder(split_dir, strict=strict)
    if transform is None:
        transform = build_transform(split == "train", img_size)
    return SafeImageFolder(split_dir, transform=transform, strict=strict)


def check_imagefolder(root: str | os.PathLike, split: str, *, num_classes: int | None = None) -> Path:
    """Checks an ImageNet-layout dataset and returns its ``split`` directory.

    The other split is checked for matching class names when it exists, so a train/val mismatch is caught
    whichever split is built first; an evaluation-only copy (``val`` alone) is accepted.

    Args:
        root: Directory holding ``train`` and ``val``.
        split: The split to return.
        num_classes: Expected number of class folders, or None.

    Returns:
        ``root / split``.

    Raises:
        DatasetError: With one sentence naming the problem.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Dataset root '{root}' does not exist or is not a directory.")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"Split folder '{split_dir}' is missing; expected the ImageNet layout {root}/train/<class>/*.jpg and "
            f"{root}/val/<class>/*.jpg."
        )
    classes = _checked_classes(split_dir)

    other = SPLITS[1 - SPLITS.index(split)]
    other_dir = root / other
    if other_dir.is_dir():
        other_classes = _class_dirs(other_dir)
        if other_classes != classes:
            only_here = sorted(set(classes) - set(other_classes))[:5]
            only_there = sorted(set(other_classes) - set(classes))[:5]
            raise DatasetError(
                f"Class folders of '{split_dir}' ({len(classes)}) and '{other_dir}' ({len(other_classes)}) differ: "
                f"only in {split}: {only_here}, only in {other}: {only_there} (first 5 shown)."
            )
    if num_classes is not None and len(classes) != num_classes:
        raise DatasetError(
            f"num_classes={num_classes} but '{split_dir}' has {len(classes)} class folders; set num_classes to "
            f"{len(classes)} or point root at the right dataset."
        )
    return split_dir


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-directories (torchvision's class order)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _checked_classes(split_dir: Path) -> list[str]:
    classes = _class_dirs(split_dir)
    if not classes:
        raise DatasetError(f"'{split_dir}' has no class folders; expected {split_dir}/<class>/<image>.")
    for cls in classes:
        if not _has_image(split_dir / cls):
            raise DatasetError(
                f"Class folder '{split_dir / cls}' has no images (extensions {', '.join(IMG_EXTENSIONS)})."
            )
    return classes


def _has_image(directory: Path) -> bool:
    """True as soon as one file with an image extension is found (walks like ImageFolder, stops early)."""
    for dirpath, _, filenames in os.walk(directory, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in filenames):
            return True
    return False
