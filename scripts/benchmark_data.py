"""Training-input throughput from a JPEG ImageFolder: the CPU path (PIL decode + augmentation in DataLoader
workers) against the GPU path (workers read bytes; nvJPEG batch decode + augmentation on the GPU).

    python scripts/make_synthetic_jpeg.py /tmp/synth_in --classes 100 --train-per-class 100
    python scripts/benchmark_data.py /tmp/synth_in --workers 16 --json data_bench.json
    python scripts/benchmark_data.py /tmp/synth_in --workers 4 8 16 --paths cpu      # a worker sweep

Both paths run the real training transform (``conf/regularizer/default.yaml``: RandomResizedCrop 0.08-1 bicubic,
flip, RandAugment rand-m9-mstd0.5-inc1, normalize, random erasing 0.25) at ``--img-size`` on ``root/train``, with
the loaders ``train.py`` builds (pinned memory, persistent workers, prefetch factor 2). Each measurement skips
``--warmup`` batches (worker start-up, cuDNN/nvJPEG initialisation), then times ``--batches`` batches until the
last one is on the device (CUDA synchronized): img/s per GPU, and the ratio to the first CPU row.

For the GPU path it also times one batch's decode and augmentation by themselves (``--time-batches`` batches,
inline on one stream): CUDA-event time of each stage (how long the stream is busy: nvJPEG runs on the JPEG
engines, not the SMs), the sum of the kernels' device time from the profiler (the SM time a training step would
lose to the loader), and the host time per batch (the loader's own speed limit).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visionmamba.data import (build_dataset, build_device_transform, build_gpu_decode_loader,  # noqa: E402
                              build_loader, build_transform)

DEFAULT_AUG = dict(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, scale=(0.08, 1.0), hflip=0.5,
                   color_jitter=0.3, interpolation="bicubic")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loader(loader, device: torch.device, warmup: int, batches: int) -> dict:
    """Iterates ``warmup`` then ``batches`` batches, moving each to ``device``; img/s over the timed part."""
    iterator = iter(loader)
    start_up = time.perf_counter()
    for _ in range(warmup):
        images, _ = next(iterator)
        images.to(device, non_blocking=True)
    _sync(device)
    warm_s = time.perf_counter() - start_up
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        images, targets = next(iterator)
        images = images.to(device, non_blocking=True)
        targets.to(device, non_blocking=True)
        seen += images.shape[0]
    _sync(device)
    elapsed = time.perf_counter() - start
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    del iterator
    return {"img_per_s": seen / elapsed, "ms_per_batch": 1000 * elapsed / batches, "images": seen,
            "seconds": elapsed, "warmup_s": warm_s, "shape": list(images.shape)}


def _kernel_ms(profile) -> float | None:
    """Sum of the device time of all GPU kernels / copies in a profile, in ms."""
    total = 0.0
    for event in profile.key_averages():
        value = getattr(event, "self_device_time_total", None)
        if value is None:
            value = getattr(event, "self_cuda_time_total", 0.0)
        total += value
    return total / 1000.0


def _time_gpu_stages(loader, device: torch.device, batches: int) -> dict:
    """Per-batch decode / augment times of the GPU path, inline on the current stream."""
    raw = iter(loader.loader)  # the workers' byte batches
    for _ in range(2):  # warm-up: nvJPEG handles, cuDNN, allocator
        loader.process(next(raw))
    _sync(device)
    decode_ms, augment_ms, host_ms = [], [], []
    inputs = [next(raw) for _ in range(batches)]
    use_events = device.type == "cuda"
    for k, batch in enumerate(inputs):
        start_host = time.perf_counter()
        if use_events:
            begin, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            begin.record()
        images, _ = loader.decode(batch)
        if use_events:
            middle.record()
        loader.augment(images, k)
        if use_events:
            end.record()
            end.synchronize()
            decode_ms.append(begin.elapsed_time(middle))
            augment_ms.append(middle.elapsed_time(end))
        host_ms.append(1000 * (time.perf_counter() - start_host))
    result = {"batches": batches, "host_ms_per_batch": statistics.median(host_ms)}
    if use_events:
        result.update(decode_stream_ms=statistics.median(decode_ms), augment_stream_ms=statistics.median(augment_ms))
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for k, batch in enumerate(inputs):
                    images, _ = loader.decode(batch)
                    loader.augment(images, k)
                _sync(device)
            result["kernel_ms_per_batch"] = _kernel_ms(prof) / batches
        except Exception as exc:  # noqa: BLE001 - CUPTI may be unavailable; the event times still stand
            result["kernel_ms_per_batch"] = None
            result["profiler_error"] = f"{type(exc).__name__}: {exc}"
    del raw
    return result


def _env(device: torch.device) -> dict:
    import PIL
    import timm
    import torchvision

    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "timm": timm.__version__, "pillow": PIL.__version__, "cpu_cores": os.cpu_count(),
           "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "device": str(device), "device_type": device.type, "platform": platform.platform()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _dataset_stats(root: Path, limit: int = 2000) -> dict:
    from PIL import Image

    files = sorted((root / "train").rglob("*"))
    files = [f for f in files if f.is_file()]
    sample = files[:: max(1, len(files) // limit)][:limit]
    sizes = [Image.open(f).size for f in sample]
    return {"train_images": len(files), "mean_kib": statistics.mean(f.stat().st_size for f in sample) / 1024,
            "mean_width": statistics.mean(w for w, _ in sizes), "mean_height": statistics.mean(h for _, h in sizes)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="ImageFolder root with a train/ split")
    parser.add_argument("--paths", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count() or 1],
                        help="DataLoader workers per measurement (a list sweeps them; default: all cores)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=5, help="batches before timing")
    parser.add_argument("--batches", type=int, default=30, help="timed batches")
    parser.add_argument("--time-batches", type=int, default=10, help="GPU path: batches for the per-stage times")
    parser.add_argument("--gpu-prefetch", type=int, default=2, help="GPU path: data.gpu_prefetch")
    parser.add_argument("--prefetch-factor", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    common = dict(batch_size=args.batch_size, is_training=True, seed=0, pin_memory=True, persistent_workers=True,
                  prefetch_factor=args.prefetch_factor)
    rows = []
    gpu_stages = None
    for path in args.paths:
        for workers in args.workers:
            if path == "cpu":
                dataset = build_dataset("imagefolder", "train", root=args.root, num_classes=None,
                                        transform=build_transform(True, args.img_size, **DEFAULT_AUG))
                loader = build_loader(dataset, num_workers=workers, **common)
            else:
                dataset = build_dataset("imagefolder", "train", root=args.root, num_classes=None, decode="gpu")
                transform = build_device_transform(True, args.img_size, **DEFAULT_AUG)
                loader = build_gpu_decode_loader(dataset, transform, device=device, prefetch=args.gpu_prefetch,
                                                 num_workers=workers, **common)
            batches_needed = args.warmup + args.batches
            if len(loader) < batches_needed:
                raise SystemExit(f"{args.root}/train has {len(loader)} batches of {args.batch_size}; "
                                 f"--warmup + --batches needs {batches_needed}")
            row = {"path": path, "workers": workers, **_time_loader(loader, device, args.warmup, args.batches)}
            if path == "gpu" and gpu_stages is None:
                gpu_stages = _time_gpu_stages(loader, device, args.time_batches)
            rows.append(row)
            print(f"  {path} workers={workers}: {row['img_per_s']:.0f} img/s", file=sys.stderr, flush=True)
            del loader, dataset
            gc.collect()
    reference = next((r["img_per_s"] for r in rows if r["path"] == "cpu"), None)
    for row in rows:
        row["ratio_vs_cpu"] = row["img_per_s"] / reference if reference else None

    result = {"env": _env(device), "dataset": _dataset_stats(args.root),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "augmentation": {k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT_AUG.items()},
              "rows": rows, "gpu_stages": gpu_stages}
    _print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _print_table(result: dict) -> None:
    env, data = result["env"], result["dataset"]
    print(f"device {env.get('gpu', env['device'])}, {env['cpu_cores']} CPU cores ({env['cpu_affinity']} usable), "
          f"torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}, Pillow {env['pillow']}")
    print(f"data: {data['train_images']} train JPEGs, mean {data['mean_width']:.0f}x{data['mean_height']:.0f} px, "
          f"{data['mean_kib']:.0f} KiB; batch {result['config']['batch_size']}, {result['config']['img_size']} px")
    print(f"{'path':6s} {'workers':>7s} {'img/s':>9s} {'x cpu':>6s} {'ms/batch':>9s}")
    for row in result["rows"]:
        ratio = f"{row['ratio_vs_cpu']:.2f}" if row["ratio_vs_cpu"] else "-"
        print(f"{row['path']:6s} {row['workers']:7d} {row['img_per_s']:9.0f} {ratio:>6s} {row['ms_per_batch']:9.1f}")
    stages = result["gpu_stages"]
    if stages:
        parts = [f"host {stages['host_ms_per_batch']:.1f} ms"]
        if "decode_stream_ms" in stages:
            parts += [f"decode {stages['decode_stream_ms']:.1f} ms", f"augment {stages['augment_stream_ms']:.1f} ms"]
        if stages.get("kernel_ms_per_batch") is not None:
            parts.append(f"GPU kernels {stages['kernel_ms_per_batch']:.1f} ms")
        print("GPU path per batch (inline, one stream): " + ", ".join(parts))


if __name__ == "__main__":
    main()
