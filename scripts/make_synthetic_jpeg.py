"""Write a synthetic ImageNet-like JPEG ImageFolder (for data-pipeline benchmarks and tests; no download).

    python scripts/make_synthetic_jpeg.py /tmp/synth_in --classes 100 --train-per-class 100 --val-per-class 10

Layout ``OUT/{train,val}/cNNNN/NNNNNN.JPEG``. Each image is a smooth random colour field with random shapes in a
per-class palette, mid-frequency texture and fine grain, so it compresses like a photo: about 500x375 (ImageNet's
most common sizes and aspect ratios, plus a random spread), baseline JPEG, 4:2:0, quality 90, ~110 KB on average.
Images are generated in parallel (``--workers``, default all cores), deterministically from ``--seed``.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ImageNet train sizes: most images are 500 px on the long side, 4:3 or 3:2, landscape more often than portrait.
_COMMON_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500), (500, 500))
_COMMON_WEIGHTS = (0.46, 0.14, 0.12, 0.04, 0.04, 0.02, 0.03)  # the rest (0.15): random sizes
# texture and uniform grain amplitudes (levels), set for ~110 KB per 500x375 image at quality 90
TEXTURE, GRAIN_LUMA, GRAIN_RGB = 72.0, 12, 6


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """``(width, height)`` drawn from an ImageNet-like mix of sizes."""
    u = rng.random()
    edges = np.cumsum(_COMMON_WEIGHTS)
    pick = int(np.searchsorted(edges, u, side="right"))
    if pick < len(_COMMON_SIZES):
        return _COMMON_SIZES[pick]
    long_side = int(rng.integers(300, 641))
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.67))))  # width / height
    short_side = max(64, round(long_side / max(aspect, 1 / aspect)))
    return (long_side, short_side) if aspect >= 1 else (short_side, long_side)


def _smooth_field(rng: np.random.Generator, width: int, height: int, cells: tuple[int, int], scale: float,
                  resample=Image.BICUBIC) -> np.ndarray:
    """Random noise on a coarse grid, upsampled: a smooth float (H, W, 3) field in [-scale, scale]."""
    coarse = rng.uniform(0, 255, size=(cells[1], cells[0], 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), resample), dtype=np.float32)
    return (field - 127.5) * (scale / 127.5)


def synth_image(rng: np.random.Generator, width: int, height: int, class_id: int = 0) -> Image.Image:
    """One natural-looking-ish RGB image: colour field + shapes in the class palette + texture + grain."""
    palette_rng = np.random.default_rng(10_007 * (class_id + 1))  # a fixed palette per class
    palette = palette_rng.uniform(20, 235, size=(6, 3))
    base = palette[0] + _smooth_field(rng, width, height, (int(rng.integers(3, 8)), int(rng.integers(3, 8))), 90.0)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        color = tuple(int(c) for c in np.clip(palette[int(rng.integers(1, 6))] + rng.normal(0, 25, 3), 0, 255))
        x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, size=2).tolist())
        y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, size=2).tolist())
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            corners = int(rng.integers(3, 7))
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(corners)]
            draw.polygon(points, fill=color)
    # texture at a mid scale plus grain (uniform integer noise: cheaper than Gaussian, same effect on the
    # encoder): what makes a photo cost ~2 bits/pixel at quality 90
    pixels = np.asarray(image, dtype=np.int16)
    texture = _smooth_field(rng, width, height, (max(2, width // 3), max(2, height // 3)), TEXTURE, Image.BILINEAR)
    pixels += texture.astype(np.int16)
    pixels += rng.integers(-GRAIN_LUMA, GRAIN_LUMA + 1, size=(height, width, 1), dtype=np.int16)
    pixels += rng.integers(-GRAIN_RGB, GRAIN_RGB + 1, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)  # baseline, 4:2:0 (Pillow's default for quality < 95)
    return buffer.getvalue()


def _write_one(task: tuple) -> int:
    path, seed, class_id, size, quality = task
    rng = np.random.default_rng(seed)
    width, height = size if size is not None else imagenet_like_size(rng)
    data = encode_jpeg(synth_image(rng, width, height, class_id), quality)
    with open(path, "wb") as fh:
        fh.write(data)
    return len(data)


def write_imagefolder(
        root: str | os.PathLike,
        classes: int,
        train_per_class: int,
        val_per_class: int = 0,
        *,
        seed: int = 0,
        quality: int = 90,
        size: tuple[int, int] | None = None,
        workers: int | None = None,
        progress: bool = True,
) -> dict:
    """Writes ``root/{train,val}/cNNNN/NNNNNN.JPEG`` and returns ``{"images", "bytes", "seconds"}``.

    Args:
        root: Output directory (created; existing files of the same names are overwritten).
        classes: Number of class folders (the same in both splits).
        train_per_class: Images per class in ``train``.
        val_per_class: Images per class in ``val`` (0: no val split).
        seed: Base seed; image ``k`` of class ``c`` of a split is a fixed function of it.
        quality: JPEG quality.
        size: Fixed ``(width, height)`` for every image (small images for tests); None: ImageNet-like sizes.
        workers: Processes (default: all cores); 0 or 1 writes in this process.
        progress: Show a tqdm bar.
    """
    root = Path(root)
    tasks = []
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for class_id in range(classes if count else 0):
            folder = root / split / f"c{class_id:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                image_seed = [seed, split_id, class_id, k]
                tasks.append((str(folder / f"{k:06d}.JPEG"), image_seed, class_id, size, quality))
    if workers is None:
        workers = os.cpu_count() or 1
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="writing JPEGs", unit="img", file=sys.stderr)
    total = 0
    if workers <= 1:
        for task in tasks:
            total += _write_one(task)
            if bar is not None:
                bar.update()
    else:
        # fork: no re-import of the caller; chunks amortise the task hand-off
        with mp.get_context("fork").Pool(workers) as pool:
            for nbytes in pool.imap_unordered(_write_one, tasks, chunksize=16):
                total += nbytes
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    return {"images": len(tasks), "bytes": total, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output directory")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                        help="fixed image size instead of ImageNet-like sizes")
    args = parser.parse_args(argv)
    stats = write_imagefolder(args.root, args.classes, args.train_per_class, args.val_per_class, seed=args.seed,
                              quality=args.quality, size=tuple(args.size) if args.size else None,
                              workers=args.workers)
    mean_kb = stats["bytes"] / max(stats["images"], 1) / 1024
    print(f"wrote {stats['images']} images to {args.root}: {stats['bytes'] / 2**20:.1f} MiB in total, "
          f"{mean_kb:.1f} KiB per image, {stats['seconds']:.1f} s", flush=True)
    return stats


if __name__ == "__main__":
    main()
