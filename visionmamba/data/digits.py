"""A small real dataset for quick starts and tests: scikit-learn's 8x8 digits as an ImageNet-layout ImageFolder.

``sklearn.datasets.load_digits`` ships inside the scikit-learn wheel (1797 grey 8x8 images, 10 classes), so
preparing it needs no download. The images are upscaled and written as RGB JPEGs under ``root/{train,val}/<digit>/``,
which exercises the exact decode/augment path that ImageNet uses.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DatasetError

MARKER_NAME = ".visionmamba_digits.json"
_FORMAT_VERSION = 1
_JPEG_QUALITY = 95


def prepare_digits(root: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> Path:
    """Write the scikit-learn digits once as a JPEG ImageFolder and return ``root``.

    Layout: ``root/train/<class>/<index>.jpg`` and ``root/val/<class>/<index>.jpg`` with classes ``"0"`` .. ``"9"``.
    The split is stratified and deterministic in ``seed``.

    The call is idempotent and safe under concurrent callers (several ranks or test workers): every caller writes a
    private temporary directory next to ``root`` (the completion marker included) and then renames it onto ``root``.
    ``rename(2)`` is atomic and only succeeds onto a missing or empty directory, so exactly one caller wins and the
    others find the marker, discard their copy and return. A later call with the same arguments is a no-op.

    Args:
        root: Dataset directory. It may be missing or an empty directory; any other non-empty directory is refused.
        val_fraction: Fraction of each class written to ``val``.
        seed: Seed of the stratified split.
        size: Side of the written square images in pixels (the 8x8 originals are upscaled bicubically).

    Returns:
        ``root`` as an absolute :class:`pathlib.Path`.

    Raises:
        DatasetError: ``root`` is a non-empty directory that was not prepared by this function, or was prepared
            with different arguments.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if size < 8:
        raise DatasetError(f"size must be at least 8 pixels (the native digit size), got {size}.")
    root = Path(root).expanduser().absolute()
    params = {"version": _FORMAT_VERSION, "val_fraction": float(val_fraction), "seed": int(seed), "size": int(size)}

    if _is_prepared(root, params):
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetError(
            f"Cannot prepare the digits dataset in '{root}': the directory is not empty and has no '{MARKER_NAME}' "
            "marker; pass an empty or missing directory."
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        counts = _write_split_folders(tmp_dir, val_fraction=val_fraction, seed=seed, size=size)
        # The marker goes in before the rename, so a visible root is always complete.
        (tmp_dir / MARKER_NAME).write_text(json.dumps({**params, **counts}, indent=2))
        try:
            os.rename(tmp_dir, root)
        except OSError:
            # Another caller renamed first (root is no longer empty): fine if it wrote the same dataset.
            if not _is_prepared(root, params):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return root


def _is_prepared(root: Path, params: dict) -> bool:
    """Returns True if ``root`` holds a finished dataset with ``params``; raises if it was made with others."""
    marker = root / MARKER_NAME
    if not marker.is_file():
        return False
    written = json.loads(marker.read_text())
    different = {k: (written.get(k), v) for k, v in params.items() if written.get(k) != v}
    if different:
        raise DatasetError(
            f"'{root}' already holds the digits dataset prepared with different arguments "
            f"(key: (existing, requested) = {different}); use another root."
        )
    return True


def _write_split_folders(out_dir: Path, *, val_fraction: float, seed: int, size: int) -> dict[str, int]:
    """Writes ``out_dir/{train,val}/<class>/<index>.jpg`` and returns the per-split file counts."""
    # Imported here: scikit-learn is only needed by this helper, not by ``import visionmamba.data``.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images  # (N, 8, 8) float in [0, 16]
    targets = digits.target  # (N,) int in [0, 9]
    indices = np.arange(len(targets))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=targets, random_state=seed)

    pixels = np.round(images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8) uint8
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for cls in range(10):
            (out_dir / split / str(cls)).mkdir(parents=True, exist_ok=True)
        for i in sorted(split_idx.tolist()):
            image = Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BICUBIC)
            image.convert("RGB").save(out_dir / split / str(targets[i]) / f"{i:04d}.jpg", quality=_JPEG_QUALITY)
    return {"num_train": len(train_idx), "num_val": len(val_idx)}
