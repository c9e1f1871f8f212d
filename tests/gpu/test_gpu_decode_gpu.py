"""data.decode=gpu on CUDA: nvJPEG decodes the same pixels as the CPU decoder (within JPEG-decoder tolerance), the
loader yields CUDA batches reproducibly, and the GPU augmentation agrees with the same code on the CPU.

Needs a CUDA device only (not the mamba kernels): the suite's ``cuda_kernels`` fixture is overridden here. The
decoder differences are recorded in the terminal summary (``check.record``) with the other GPU numbers.
"""
from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionmamba.data import build_dataset
from visionmamba.data import gpu_augment as G
from visionmamba.data import gpu_decode as D

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cuda_kernels():
    """Overrides tests/gpu/conftest.py's fixture: these tests need CUDA and nvJPEG, not the mamba kernels."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return None


def _synthetic():
    spec = importlib.util.spec_from_file_location("vm_make_synthetic_jpeg_gpu", REPO / "scripts" /
                                                  "make_synthetic_jpeg.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_jpeg_gpu")
    _synthetic().write_imagefolder(root, classes=2, train_per_class=16, val_per_class=6, workers=0, progress=False)
    return root


def _variants() -> dict[str, bytes]:
    """One photo-like image in the JPEG flavours ImageNet has (and a size that is no multiple of the MCU)."""
    image = _synthetic().synth_image(np.random.default_rng(5), 333, 251, class_id=3)
    out = {}
    for name, kwargs, mode in (("baseline_420_q90", dict(quality=90), "RGB"),
                               ("baseline_444_q95", dict(quality=95, subsampling=0), "RGB"),
                               ("baseline_422_q75", dict(quality=75, subsampling=1), "RGB"),
                               ("progressive_420", dict(quality=90, progressive=True), "RGB"),
                               ("grayscale", dict(quality=90), "L")):
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, format="JPEG", **kwargs)
        out[name] = buffer.getvalue()
    return out


@pytest.mark.parametrize("name", list(_variants()))
def test_nvjpeg_matches_cpu_decode(name, check):
    data = _variants()[name]
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert D.device_decodable(data) is not None
    cuda = D._decode_jpegs([payload, payload], torch.device("cuda"))  # the batched call
    cpu = D._decode_jpegs([payload], torch.device("cpu"))[0]  # libjpeg-turbo == PIL
    pil = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(cpu, pil)
    for image in cuda:
        assert image.is_cuda and image.dtype == torch.uint8 and image.shape == cpu.shape
        diff = (image.cpu().int() - cpu.int()).abs().float()
        check.record(image.cpu().double(), cpu.double(), f"decode:{name}", "uint8", mean_abs=diff.mean().item(),
                     p99=torch.quantile(diff.flatten(), 0.99).item())
        # IDCT and chroma upsampling differ between nvJPEG and libjpeg-turbo (whose "fancy" triangle-filter
        # upsampling nvJPEG does not do). Measured on an H200 (torchvision 0.26, this colour-textured image): 4:4:4 and
        # grayscale within ~1 level; 4:2:0 / 4:2:2 6.3 / 4.2 levels mean, up to 58 at sharp colour edges.
        subsampled = name in ("baseline_420_q90", "baseline_422_q75", "progressive_420")
        mean_tol, p99_tol = (10.0, 48.0) if subsampled else (3.0, 24.0)
        assert diff.mean() < mean_tol and torch.quantile(diff.flatten(), 0.99) < p99_tol, (diff.mean(), diff.max())


def _loader(root: Path, split: str, *, prefetch: int, seed: int = 0, img_size: int = 64, batch_size: int = 8):
    dataset = build_dataset("imagefolder", split, root=root, num_classes=2, decode="gpu")
    transform = G.build_device_transform(split == "train", img_size)
    return D.build_gpu_decode_loader(dataset, transform, device="cuda", prefetch=prefetch, batch_size=batch_size,
                                     is_training=split == "train", num_workers=2, seed=seed,
                                     persistent_workers=True)


def test_cuda_loader_output_and_reproducibility(jpeg_root):
    first = [(x.clone(), y.clone()) for x, y in _loader(jpeg_root, "train", prefetch=2)]
    assert len(first) == 4
    for images, labels in first:
        assert images.is_cuda and labels.is_cuda and images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape == (8, 3, 64, 64) and images.is_contiguous() and torch.isfinite(images).all()
        assert -3.0 < images.mean().item() < 3.0
    again = [(x, y) for x, y in _loader(jpeg_root, "train", prefetch=0)]  # inline: the same batches
    for (a, b), (c, d) in zip(first, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    val = [(x, y) for x, y in _loader(jpeg_root, "val", prefetch=2, batch_size=5)]
    assert [x.shape[0] for x, _ in val] == [5, 5, 2] and all(x.is_cuda for x, _ in val)


def test_cuda_transforms_match_cpu_transforms(jpeg_root):
    """Same decoded pixels, same parameter seed: the CUDA kernels give what the CPU kernels give (up to float
    rounding, which can flip a uint8 level and, rarely, a threshold of a later op)."""
    files = sorted((jpeg_root / "train").rglob("*.JPEG"))
    decoded = [D._pil_read(str(f)).permute(2, 0, 1) for f in files]
    train = G.DeviceTrainTransform(96, reprob=0.0)
    cpu = train(decoded, torch.Generator().manual_seed(7))
    cuda = train([d.cuda() for d in decoded], torch.Generator().manual_seed(7)).cpu()
    levels = (cpu - cuda).abs() * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    assert levels.mean() < 0.5 and (levels > 2.5).float().mean() < 0.02, (levels.mean(), levels.max())
    evaluate = G.DeviceEvalTransform(96)
    eval_levels = (evaluate(decoded) - evaluate([d.cuda() for d in decoded]).cpu()).abs() * 255 * 0.229
    assert eval_levels.mean() < 0.05 and eval_levels.max() < 2.5


def test_cuda_fallbacks_and_unreadable_files(jpeg_root, tmp_path):
    """A CMYK JPEG (PIL in the worker), a grayscale JPEG (nvJPEG) and a JPEG every decoder rejects (main process:
    flagged and replaced by the next sample) in one CUDA batch."""
    folder = tmp_path / "mixed" / "val" / "a"
    folder.mkdir(parents=True)
    good = next((jpeg_root / "val").rglob("*.JPEG")).read_bytes()
    image = Image.open(io.BytesIO(good)).convert("RGB")
    image.convert("CMYK").save(folder / "0_cmyk.JPEG", format="JPEG")
    image.convert("L").save(folder / "1_gray.JPEG", format="JPEG")
    broken = bytearray(good)
    dht = broken.find(b"\xff\xc4")
    broken[dht + 5:dht + 21] = b"\xff" * 16
    (folder / "2_bad_huffman.JPEG").write_bytes(bytes(broken))
    (folder / "3_good.JPEG").write_bytes(good)
    dataset = build_dataset("imagefolder", "val", root=tmp_path / "mixed", num_classes=1, decode="gpu")
    loader = D.build_gpu_decode_loader(dataset, G.build_device_transform(False, 32), device="cuda", batch_size=4,
                                       is_training=False, num_workers=0)
    with pytest.warns(UserWarning, match="2_bad_huffman"):
        batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (4, 3, 32, 32) and batches[0][0].is_cuda
    assert dataset.num_bad_files == 1, "nvJPEG accepted a JPEG with a bogus Huffman table (not counted as unreadable)"
    # the unreadable file was replaced by the next one; that copy was decoded by the fallback route (libjpeg), the
    # original by nvJPEG, so they agree to decoder tolerance (normalised units: one level ~ 0.017), not bit for bit
    images = batches[0][0]
    assert (images[2] - images[3]).abs().mean() < 0.15
