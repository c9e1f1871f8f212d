"""The GPU-decode data path (data.decode=gpu) on CPU tensors: the same code as on a GPU, decoding with libjpeg-turbo
instead of nvJPEG. Checks the augmentation family against the CPU (PIL/timm) pipeline -- parameter distributions,
bit-exact pointwise ops, batch statistics --, shapes and normalization, reproducibility and mid-epoch resume,
corrupt-file handling, the config switch, and a tiny train.py run."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import random
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

import train
from visionmamba.data import CorruptImageError, CorruptImageWarning, build_dataset, build_loader, build_transform
from visionmamba.data import gpu_augment as G
from visionmamba.data import gpu_decode as D
from visionmamba.utils import get_loader_rng_state, set_loader_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"vm_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


synthetic = _load_script("make_synthetic_jpeg")


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """3 classes x 10 train / 4 val synthetic photo-like JPEGs (128x96: small, so the CPU comparisons are cheap)."""
    root = tmp_path_factory.mktemp("synthetic_jpeg")
    synthetic.write_imagefolder(root, classes=3, train_per_class=10, val_per_class=4, size=(128, 96), workers=0,
                                progress=False)
    return root


def _decoded(paths) -> list[torch.Tensor]:
    return [D._pil_read(str(p)).permute(2, 0, 1) for p in paths]


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalized batches, in 8-bit levels of each channel."""
    return (a - b).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255


# ---------------------------------------------------------------------------------------- parameter distributions
@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (90, 400), (64, 64)])
def test_crop_parameters_match_timm(height, width):
    num = 4000
    ours = G.sample_resized_crops(torch.tensor([[height, width]] * num), torch.Generator().manual_seed(0))
    random.seed(0)
    image = Image.new("RGB", (width, height))
    ref = torch.tensor([RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                        for _ in range(num)], dtype=torch.float64)  # (num, 4) top, left, h, w
    ours = ours.to(torch.float64)
    assert bool((ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all())
    for stats in (lambda c: c[:, 2] * c[:, 3] / (height * width),  # area fraction
                  lambda c: torch.log(c[:, 3] / c[:, 2]),  # log aspect ratio
                  lambda c: (c[:, 0] + c[:, 2] / 2) / height,  # crop centre
                  lambda c: (c[:, 1] + c[:, 3] / 2) / width):
        a, b = stats(ours), stats(ref)
        assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.02)
        assert a.std().item() == pytest.approx(b.std().item(), abs=0.02)
    whole = lambda c: ((c[:, 2] == height) & (c[:, 3] == width)).double().mean().item()  # noqa: E731
    assert whole(ours) == pytest.approx(whole(ref), abs=0.02)


def test_erasing_parameters_match_timm():
    num, size = 4000, 32
    boxes = G.sample_erasing(num, size, size, 0.25, torch.Generator().manual_seed(1))
    erased_ours = boxes[:, 2] > 0
    area_ours = (boxes[erased_ours, 2] * boxes[erased_ours, 3]).double() / size ** 2
    random.seed(1)
    eraser = RandomErasing(0.25, mode="const", max_count=1, device="cpu")
    areas = []
    for _ in range(num):
        image = torch.ones(3, size, size)
        eraser(image)
        areas.append(float((image[0] == 0).double().mean()))
    areas = torch.tensor(areas)
    assert erased_ours.double().mean().item() == pytest.approx((areas > 0).double().mean().item(), abs=0.03)
    assert area_ours.mean().item() == pytest.approx(areas[areas > 0].mean().item(), abs=0.01)


def _timm_args(policy: str, num: int) -> dict[str, list[float]]:
    """The argument each timm AugmentOp would pass to its PIL function, drawn as timm draws it."""
    random.seed(2)
    transform = timm_aa.rand_augment_transform(policy, {"translate_const": 100})
    out = {}
    for op in transform.ops:
        values = []
        for _ in range(num):
            magnitude = max(0.0, min(random.gauss(op.magnitude, op.magnitude_std), op.magnitude_max or 10.0))
            args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else (0.0,)
            values.append(float(args[0]))
        out[op.name] = values
    return out


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd1.0", "rand-m9-mstd0.5-inc1-tweights"])
def test_rand_augment_draws_match_timm(policy):
    spec = G.parse_rand_augment(policy, img_size=224)
    ref_policy = timm_aa.rand_augment_transform(policy, {"translate_const": 100})
    assert spec.ops == tuple(op.name for op in ref_policy.ops) and spec.num_layers == ref_policy.num_layers
    num = 20000
    draw = G._sample_rand_augment(spec, num, torch.Generator().manual_seed(3))
    assert draw.apply.double().mean().item() == pytest.approx(spec.prob, abs=0.01)
    counts = torch.bincount(draw.op.flatten(), minlength=len(spec.ops)).double() / draw.op.numel()
    expected = torch.tensor(spec.choice_weights or [1.0] * len(spec.ops), dtype=torch.float64)
    if spec.choice_weights is None:
        assert torch.allclose(counts, expected / expected.sum(), atol=0.01)
    else:  # weighted choice without replacement: the heaviest ops are the most frequent ones
        assert counts.argmax() == expected.argmax()
    reference = _timm_args(policy, 3000)
    spec = G.RandAugmentSpec(**{**spec.__dict__, "translate_const": 100.0})
    draw = G._sample_rand_augment(spec, num, torch.Generator().manual_seed(4))
    for k, name in enumerate(spec.ops):
        ours = draw.arg[draw.op == k]
        ref = torch.tensor(reference[name], dtype=torch.float64)
        scale = max(ref.abs().mean().item(), 1.0)
        assert ours.mean().item() == pytest.approx(ref.mean().item(), abs=0.06 * scale), name
        assert ours.abs().mean().item() == pytest.approx(ref.abs().mean().item(), abs=0.06 * scale), name


def test_unsupported_policies_are_refused():
    with pytest.raises(ValueError, match="RandAugment"):
        G.parse_rand_augment("v0", 224)
    with pytest.raises(ValueError, match="augmix"):
        G.parse_rand_augment("augmix-m5", 224)


# ----------------------------------------------------------------------------------------------- ops against PIL
@pytest.fixture(scope="module")
def photo() -> tuple[Image.Image, torch.Tensor]:
    rng = np.random.default_rng(0)
    image = synthetic.synth_image(rng, 72, 56, class_id=1)
    return image, torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()


def _arg(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


POINTWISE = [
    ("AutoContrast", lambda x: G.auto_contrast(x), lambda im: ImageOps.autocontrast(im)),
    ("Equalize", lambda x: G.equalize(x), lambda im: ImageOps.equalize(im)),
    ("Invert", lambda x: G.invert(x), lambda im: ImageOps.invert(im)),
    ("Posterize0", lambda x: G.posterize(x, _arg(0)), lambda im: im.point([0] * 768)),
    ("Posterize1", lambda x: G.posterize(x, _arg(1)), lambda im: ImageOps.posterize(im, 1)),
    ("Posterize4", lambda x: G.posterize(x, _arg(4)), lambda im: ImageOps.posterize(im, 4)),
    ("Solarize26", lambda x: G.solarize(x, _arg(26)), lambda im: ImageOps.solarize(im, 26)),
    ("Solarize256", lambda x: G.solarize(x, _arg(256)), lambda im: ImageOps.solarize(im, 256)),
    ("SolarizeAdd", lambda x: G.solarize_add(x, _arg(99)), lambda im: timm_aa.solarize_add(im, 99)),
    ("Grayscale", lambda x: G.pil_grayscale(x).expand(-1, 3, -1, -1), lambda im: im.convert("L").convert("RGB")),
] + [
    (f"{name}{factor}", (lambda fn: lambda x, f=factor: fn(x, _arg(f)))(fn),
     (lambda cls: lambda im, f=factor: cls(im).enhance(f))(cls))
    for name, fn, cls in (("Color", G.adjust_color, ImageEnhance.Color),
                          ("Contrast", G.adjust_contrast, ImageEnhance.Contrast),
                          ("Brightness", G.adjust_brightness, ImageEnhance.Brightness),
                          ("Sharpness", G.adjust_sharpness, ImageEnhance.Sharpness))
    for factor in (0.1, 0.63, 1.0, 1.9)
]


@pytest.mark.parametrize("name,ours,pil", POINTWISE, ids=[p[0] for p in POINTWISE])
def test_pointwise_ops_are_bit_exact_with_pil(photo, name, ours, pil):
    image, x = photo
    assert torch.equal(ours(x)[0].permute(1, 2, 0), torch.from_numpy(np.array(pil(image))))


@pytest.mark.parametrize("name,value", [("Rotate", 27.0), ("Rotate", -8.5), ("ShearX", 0.27), ("ShearY", -0.2),
                                        ("TranslateXRel", 0.4), ("TranslateYRel", -0.33), ("TranslateX", 10.3)])
def test_geometric_ops_match_pil(photo, name, value):
    """Same inverse map and fill region as PIL; bilinear/nearest agree to rounding, bicubic within its kernel."""
    image, x = photo
    fill = (124, 116, 104)
    matrices = G._affine_matrices(name, _arg(value), x.shape[-2], x.shape[-1])
    # nearest: PIL's fixed-point affine stepping puts a few points within 1e-4 px of a pixel edge on the other side
    for mode, resample, mean_tol, max_tol in (("nearest", Image.NEAREST, 0.05, 255),
                                              ("bilinear", Image.BILINEAR, 0.1, 1),
                                              ("bicubic", Image.BICUBIC, 1.5, 12)):
        ours = G.affine(x, matrices, torch.tensor(fill, dtype=torch.float32), mode)[0].permute(1, 2, 0).numpy()
        ref = np.asarray(timm_aa.NAME_TO_OP[name](image, value, fillcolor=fill, resample=resample))
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.mean() <= mean_tol and diff.max() <= max_tol, (mode, diff.mean(), diff.max())
        assert ((ours == fill).all(-1) == (ref == fill).all(-1)).mean() > 0.99  # the fill region


def test_gaussian_blur_close_to_pil(photo):
    image, x = photo
    for sigma in (0.1, 0.8, 2.0):
        ours = G.gaussian_blur(x, torch.tensor([sigma]))[0].permute(1, 2, 0).numpy().astype(int)
        ref = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma))).astype(int)
        assert np.abs(ours - ref).mean() < 1.0


# ------------------------------------------------------------------------------------- transforms vs CPU pipeline
@pytest.mark.parametrize("options", [dict(), dict(auto_augment="rand-m9-mstd0.5-inc1-t3a"), dict(auto_augment=None),
                                     dict(auto_augment=None, color_jitter=0.0), dict(three_augment=True),
                                     dict(three_augment=True, color_jitter=None), dict(reprob=0.0)])
def test_pipeline_structure_matches_cpu(options):
    """The same stages are on or off in both paths for every switch of the regularizer group."""
    cpu = [type(t).__name__ for t in build_transform(True, 32, **options).transforms]
    gpu = G.DeviceTrainTransform(32, **options)
    assert ("RandAugment" in cpu) == (gpu.rand_augment is not None)
    assert ("ColorJitter" in cpu) == (gpu.color_jitter > 0)
    assert ("RandomErasing" in cpu and build_transform(True, 32, **options).transforms[-1].probability > 0) == (
        gpu.reprob > 0)
    assert ("RandomChoice" in cpu) == gpu.three_augment


def test_train_output_shape_dtype_and_normalization():
    """No randomness left (whole-image crop, no flip/RA/jitter/erasing): output = (colour / 255 - mean) / std."""
    colour = (200, 30, 90)
    images = [torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).contiguous()
              for h, w in ((60, 80), (90, 40), (33, 33))]
    transform = G.DeviceTrainTransform(24, auto_augment=None, color_jitter=None, reprob=0.0, scale=(1.0, 1.0),
                                       hflip=0.0)
    out = transform(images, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_eval_transform_matches_cpu_pipeline(jpeg_root):
    files = sorted((jpeg_root / "val").rglob("*.JPEG"))
    for img_size, crop_pct in ((64, 0.875), (48, 1.0), (56, 0.9)):
        cpu = build_transform(False, img_size, crop_pct=crop_pct)
        expected = torch.stack([cpu(Image.open(f).convert("RGB")) for f in files])
        ours = G.DeviceEvalTransform(img_size, crop_pct=crop_pct)(_decoded(files))
        assert ours.shape == expected.shape
        levels = _levels(ours, expected)
        assert levels.mean() < 0.5 and levels.max() < 10


def _augmented_stats(batch: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std, and the mean |horizontal gradient| (sharpness/resampling), of a normalized batch."""
    grad = (batch[..., 1:] - batch[..., :-1]).abs().mean(dim=(0, 2, 3))
    return torch.cat([batch.mean(dim=(0, 2, 3)), batch.std(dim=(0, 2, 3)), grad])


@pytest.mark.parametrize("pipeline", [
    dict(),  # the recipes' default: RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25
    dict(auto_augment=None, color_jitter=0.4, reprob=0.0),  # ColorJitter instead of RandAugment
    dict(three_augment=True, reprob=0.0),  # DeiT-III ThreeAugment
], ids=["randaugment", "color_jitter", "three_augment"])
def test_augmented_batches_match_cpu_pipeline_statistically(jpeg_root, pipeline):
    """Many augmented samples of the same images through both paths: the same per-channel statistics."""
    img_size, repeats = 32, 20
    files = sorted((jpeg_root / "train").rglob("*.JPEG"))  # 30 images
    pil_images = [Image.open(f).convert("RGB") for f in files]
    cpu = build_transform(True, img_size, **pipeline)
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    cpu_batch = torch.stack([cpu(im) for _ in range(repeats) for im in pil_images])  # (600, 3, 32, 32)
    transform = G.DeviceTrainTransform(img_size, **pipeline)
    decoded = _decoded(files)
    gpu_batch = torch.cat([transform(decoded, torch.Generator().manual_seed(100 + r),
                                     torch.Generator().manual_seed(200 + r)) for r in range(repeats)])
    ours, ref = _augmented_stats(gpu_batch), _augmented_stats(cpu_batch)
    assert torch.allclose(ours[:6], ref[:6], atol=0.1), (ours, ref)
    assert torch.allclose(ours[6:], ref[6:], rtol=0.1), (ours, ref)


# ---------------------------------------------------------------------------------------------------- the loader
def _gpu_loader(root: Path, split: str = "train", *, img_size: int = 32, batch_size: int = 8, workers: int = 0,
                prefetch: int = 0, seed: int = 0, strict: bool = False, **transform_kwargs):
    dataset = build_dataset("imagefolder", split, root=root, num_classes=None, decode="gpu", strict=strict)
    transform = G.build_device_transform(split == "train", img_size, **transform_kwargs)
    return D.build_gpu_decode_loader(dataset, transform, device="cpu", prefetch=prefetch, batch_size=batch_size,
                                     is_training=split == "train", num_workers=workers, seed=seed,
                                     persistent_workers=False)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_loader_output_and_api(jpeg_root):
    loader = _gpu_loader(jpeg_root, batch_size=8)
    assert len(loader) == 30 // 8 and loader.sampler is loader.loader.sampler and loader.generator is not None
    batches = _epoch(loader)
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and torch.isfinite(images).all()
        assert labels.dtype == torch.int64 and labels.shape == (8,) and labels.max() < 3
    val = _epoch(_gpu_loader(jpeg_root, "val", batch_size=5))
    assert [x.shape[0] for x, _ in val] == [5, 5, 2]  # eval keeps the last partial batch
    assert torch.cat([y for _, y in val]).tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_loader_is_reproducible_and_resumable(jpeg_root):
    first = _epoch(_gpu_loader(jpeg_root, seed=3))
    assert _same(first, _epoch(_gpu_loader(jpeg_root, seed=3)))
    assert not _same(first, _epoch(_gpu_loader(jpeg_root, seed=4)))
    # Augmentation runs in the main process from per-batch seeds: workers and the prefetch thread change nothing.
    assert _same(first, _epoch(_gpu_loader(jpeg_root, seed=3, workers=2, prefetch=2)))

    loader = _gpu_loader(jpeg_root, seed=3)
    state = get_loader_rng_state(loader)  # what a checkpoint records at the epoch's start
    epoch0 = _epoch(loader)
    epoch1 = _epoch(loader)
    assert _same(epoch0, first) and not _same(epoch0, epoch1)  # every pass draws new augmentations
    set_loader_rng_state(loader, state)
    loader.skip_next_batches(2)  # a mid-epoch resume: the remaining batches, identical to the full pass
    assert _same(_epoch(loader), first[2:])


def test_abandoned_prefetching_pass_is_stopped(jpeg_root):
    loader = _gpu_loader(jpeg_root, prefetch=2)
    iterator = iter(loader)
    next(iterator)
    thread = iterator.thread
    assert thread is not None and thread.is_alive()
    second = _epoch(loader)  # a new pass stops the abandoned one first
    assert not thread.is_alive() and len(second) == 3


@pytest.fixture
def folder_with_bad_files(jpeg_root, tmp_path) -> Path:
    """val/c0000: 4 good JPEGs, then 4 problem files; val/c0001: 4 good JPEGs."""
    root = tmp_path / "bad"
    for cls in ("c0000", "c0001"):
        (root / "val" / cls).mkdir(parents=True)
        for k in range(4):
            (root / "val" / cls / f"0{k}.JPEG").write_bytes((jpeg_root / "val" / cls / f"{k:06d}.JPEG").read_bytes())
    good = (jpeg_root / "val" / "c0000" / "000000.JPEG").read_bytes()
    folder = root / "val" / "c0000"
    image = Image.open(io.BytesIO(good)).convert("RGB")
    image.save(folder / "10_png_named_jpeg.JPEG", format="PNG")  # readable: PIL in the worker
    image.convert("CMYK").save(folder / "11_cmyk.JPEG", format="JPEG")  # readable: PIL in the worker
    (folder / "12_not_an_image.JPEG").write_bytes(b"this is not a jpeg")  # unreadable
    bogus_huffman = bytearray(good)
    dht = bogus_huffman.find(b"\xff\xc4")
    bogus_huffman[dht + 5:dht + 21] = b"\xff" * 16  # passes the header check, fails every decoder: main process
    (folder / "13_bad_huffman.JPEG").write_bytes(bytes(bogus_huffman))
    (folder / "14_truncated.JPEG").write_bytes(good[: len(good) // 2])  # no EOI: PIL in the worker, unreadable
    return root


def test_corrupt_and_non_jpeg_files(folder_with_bad_files):
    root = folder_with_bad_files
    # the CPU path's labels for comparison: each unreadable file is replaced by the next readable sample
    cpu = build_dataset("imagefolder", "val", root=root, num_classes=2, img_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        cpu_labels = [y for _, y in build_loader(cpu, batch_size=5, is_training=False, num_workers=0)
                      for y in y.tolist()]
    loader = _gpu_loader(root, "val", img_size=16, batch_size=5)
    # samples 0-3 good, 4 PNG, 5 CMYK, 6 not an image, 7 bad Huffman table, 8 truncated, 9-12 good (class 1)
    kinds = Counter(loader.dataset[i][1] for i in (0, 1, 2, 3, 4, 5, 7, 9, 10, 11, 12))
    assert kinds == {D.KIND_JPEG: 9, D.KIND_RAW: 2}  # the PNG and the CMYK file go through PIL in the worker
    with pytest.warns(CorruptImageWarning) as caught:
        labels = []
        for images, targets in loader:
            assert torch.isfinite(images).all() and images.shape[1:] == (3, 16, 16)
            labels += targets.tolist()
    assert labels == cpu_labels and len(labels) == 13
    assert loader.dataset.num_bad_files == 3
    assert sorted(Path(p).name for p in loader.dataset.bad_files()) == [
        "12_not_an_image.JPEG", "13_bad_huffman.JPEG", "14_truncated.JPEG"]
    assert len({str(w.message) for w in caught if w.category is CorruptImageWarning}) == 3  # one per file

    strict = _gpu_loader(root, "val", img_size=16, batch_size=5, strict=True)
    with pytest.raises(CorruptImageError, match="12_not_an_image"):  # found by the worker
        _epoch(strict)
    with pytest.raises(CorruptImageError, match="13_bad_huffman"):  # found when the main process decodes
        strict.process(D.collate_encoded([strict.dataset[7]]))
    assert strict.dataset.num_bad_files == 0  # strict mode flags nothing


def test_decoder_rejects_fall_back_to_pil_once(jpeg_root, monkeypatch):
    """A JPEG the batched decoder refuses but PIL reads is decoded by PIL, not counted, and not retried."""
    expected = _epoch(_gpu_loader(jpeg_root, "val", img_size=16, batch_size=4))
    loader = _gpu_loader(jpeg_root, "val", img_size=16, batch_size=4)
    refused = loader.dataset[1][0]  # the encoded bytes of sample 1
    calls = []
    real = D._decode_jpegs

    def flaky(payloads, device):
        calls.append(len(payloads))
        if any(p.numel() == refused.numel() and torch.equal(p, refused) for p in payloads):
            raise RuntimeError("nvjpeg says no")
        return real(payloads, device)

    monkeypatch.setattr(D, "_decode_jpegs", flaky)
    got = _epoch(loader)
    assert _same(got, expected)  # PIL and libjpeg-turbo decode identically
    assert calls[:5] == [4, 1, 1, 1, 1] and loader.dataset.host_decoded == {1}
    assert loader.dataset.num_bad_files == 0
    calls.clear()
    _epoch(loader)
    assert calls[0] == 3  # the memoized sample skips the batched decoder


# ------------------------------------------------------------------------------------------------ config + train.py
def test_config_switch_and_errors(jpeg_root, fw):
    common = [f"data.root={jpeg_root}", "data.num_classes=3", "data.img_size=32", "model=vim_test"]
    cfg = fw.compose_train("data=imagefolder_gpu", *common)
    assert cfg.data.decode == "gpu" and cfg.data.name == "imagefolder"
    dataset, loader = train.build_data(cfg.data, cfg.regularizer, "train", batch_size=4, workers=0,
                                       distributed=False, device=torch.device("cpu"))
    assert isinstance(dataset, D.EncodedImageFolder) and isinstance(loader, D.GpuDecodeLoader)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    cfg = fw.compose_train("data=imagefolder", *common)
    assert cfg.data.decode == "cpu"
    _, loader = train.build_data(cfg.data, cfg.regularizer, "val", batch_size=4, workers=0, distributed=False)
    assert not isinstance(loader, D.GpuDecodeLoader)

    for overrides, match in ((["data=imagefolder", "data.decode=bogus"], "data.decode='bogus' is not one of cpu, gpu"),
                             (["data=synthetic", "data.decode=gpu"], "needs data.decode=cpu"),
                             (["data=imagefolder_gpu", "regularizer.auto_augment=v0"], "data.decode=gpu: .*'v0'")):
        cfg = fw.compose_train(*common, *overrides)
        with pytest.raises(train.ConfigError, match=match):
            train.build_data(cfg.data, cfg.regularizer, "train", batch_size=4, workers=0, distributed=False)


def test_train_py_runs_with_gpu_decode(jpeg_root, tmp_path, fw):
    """A tiny end-to-end run (vim_test, 32 px) with data.decode=gpu on CPU; validate.py with it too."""
    args = ["train.py", "model=vim_test", "data=imagefolder_gpu", f"data.root={jpeg_root}", "data.num_classes=3",
            "data.img_size=32", "batch_size=8", "epochs=1", "workers=1", "precision=fp32", "progress=line",
            "mlflow.enabled=false", "run_name=gpu_decode"]
    fw.run_script(args, tmp_path)
    run_dir = tmp_path / "outputs" / "gpu_decode"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["global_step"] == 3 and math.isfinite(final["val/loss"])
    checkpoint = run_dir / "checkpoints" / "epoch_0001.pth"
    fw.run_script(["validate.py", f"checkpoint={checkpoint}", "workers=0"], tmp_path)
    summary = json.loads(checkpoint.with_name("epoch_0001.val.json").read_text())
    assert summary["top1"] == pytest.approx(final["val/top1"]) and summary["num_samples"] == 12


def test_interpreter_exit_with_live_workers_and_prefetch(jpeg_root, tmp_path):
    """Persistent workers ignore SIGTERM (preemption): a loader still alive at exit must not hang the exit, nor
    may an abandoned prefetch thread abort it."""
    script = textwrap.dedent(f"""
        from visionmamba.data import build_dataset, build_loader, build_device_transform, build_gpu_decode_loader
        root = {str(jpeg_root)!r}
        cpu = build_loader(build_dataset("imagefolder", "train", root=root, num_classes=3, img_size=16),
                           batch_size=4, is_training=True, num_workers=1)
        next(iter(cpu))
        gpu = build_gpu_decode_loader(build_dataset("imagefolder", "train", root=root, num_classes=3, decode="gpu"),
                                      build_device_transform(True, 16), device="cpu", prefetch=2, batch_size=4,
                                      is_training=True, num_workers=1)
        iterator = iter(gpu)
        next(iterator)
        print("exiting", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=120, capture_output=True, text=True,
                          env={**train.os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-3000:]


def test_make_synthetic_jpeg_script(tmp_path, capsys):
    stats = synthetic.main([str(tmp_path / "synth"), "--classes", "2", "--train-per-class", "3", "--val-per-class",
                            "1", "--workers", "2"])
    assert stats["images"] == 8 and "KiB per image" in capsys.readouterr().out
    files = sorted((tmp_path / "synth").rglob("*.JPEG"))
    assert len(files) == 8
    for path in files:
        data = path.read_bytes()
        assert D.device_decodable(data) is not None  # baseline, 3 components, complete
        width, height = Image.open(path).size
        assert 64 <= min(width, height) and max(width, height) <= 640


def test_benchmark_data_script_cpu_smoke(jpeg_root, tmp_path, capsys):
    """scripts/benchmark_data.py end to end with tiny settings (structure of the table and JSON, not speed)."""
    bench = _load_script("benchmark_data")
    out = tmp_path / "bench.json"
    result = bench.main([str(jpeg_root), "--device", "cpu", "--workers", "0", "--batch-size", "4", "--img-size", "32",
                         "--warmup", "1", "--batches", "2", "--time-batches", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(row["path"], row["workers"]) for row in result["rows"]] == [("cpu", 0), ("gpu", 0)]
    assert result["rows"][0]["ratio_vs_cpu"] == 1.0 and result["rows"][1]["img_per_s"] > 0
    assert result["rows"][1]["shape"] == [4, 3, 32, 32] and result["gpu_stages"]["host_ms_per_batch"] > 0
    assert "img/s" in printed and "GPU path per batch" in printed
