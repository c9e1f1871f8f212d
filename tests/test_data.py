"""Tests of visionmamba.data: digits preparation, transforms, dataset checks, corrupt images, samplers, loaders."""

from __future__ import annotations

import functools
import multiprocessing
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler
from torchvision import transforms

from visionmamba.data import (
    CorruptImageError,
    CorruptImageWarning,
    DatasetError,
    DistributedEvalSampler,
    RASampler,
    SafeImageFolder,
    SyntheticDataset,
    build_dataset,
    build_loader,
    build_mixup,
    build_transform,
    prepare_digits,
    set_sampler_epoch,
)
from visionmamba.data.digits import MARKER_NAME

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return prepare_digits(tmp_path_factory.mktemp("data") / "digits")


def _write_images(directory: Path, names: list[str], size: int = 12) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size), color=(10 * i, 100, 200)).save(directory / name)


def _make_imagefolder(root: Path, classes_by_split: dict[str, list[str]], per_class: int = 2) -> Path:
    for split, classes in classes_by_split.items():
        for cls in classes:
            _write_images(root / split / cls, [f"{k}.jpg" for k in range(per_class)])
    return root


def _count_files(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


# ----------------------------------------------------------------------------------------------------- digits


def test_prepare_digits_layout(digits_root):
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == [str(c) for c in range(10)]
    num_train, num_val = _count_files(digits_root / "train"), _count_files(digits_root / "val")
    assert num_train + num_val == NUM_DIGITS
    assert num_val == pytest.approx(0.2 * NUM_DIGITS, abs=1)
    # Stratified: every class keeps about 20 % of its images in val.
    for cls in range(10):
        n_val = _count_files(digits_root / "val" / str(cls))
        n_all = n_val + _count_files(digits_root / "train" / str(cls))
        assert abs(n_val - 0.2 * n_all) <= 1
    image = Image.open(next((digits_root / "val" / "3").glob("*.jpg")))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    assert np.asarray(image).std() > 10  # a real digit, not a blank image


def test_prepare_digits_is_idempotent(digits_root):
    some_file = next((digits_root / "train" / "0").glob("*.jpg"))
    mtime = some_file.stat().st_mtime_ns
    assert prepare_digits(digits_root) == digits_root
    assert some_file.stat().st_mtime_ns == mtime
    assert _count_files(digits_root / "train") + _count_files(digits_root / "val") == NUM_DIGITS
    with pytest.raises(DatasetError, match="different arguments"):
        prepare_digits(digits_root, size=16)


def test_prepare_digits_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(DatasetError, match="not empty"):
        prepare_digits(tmp_path)


def test_prepare_digits_into_existing_empty_dir(tmp_path):
    root = prepare_digits(tmp_path, size=8, val_fraction=0.5, seed=3)
    assert root == tmp_path.absolute() and (root / MARKER_NAME).is_file()
    assert _count_files(root / "val") == pytest.approx(NUM_DIGITS / 2, abs=5)


def test_prepare_digits_concurrent_callers(tmp_path):
    # Imported before forking, so the callers race on the writes rather than on the imports.
    import sklearn.datasets  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    root = tmp_path / "digits"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(functools.partial(prepare_digits, size=8), [root, root])
    assert {Path(r) for r in results} == {root.absolute()}
    assert _count_files(root / "train") + _count_files(root / "val") == NUM_DIGITS
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary directory left behind


# -------------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("three_augment", [False, True])
def test_train_transform_output_shape(three_augment):
    image = Image.new("RGB", (50, 37), color=(120, 30, 200))
    tf = build_transform(True, 24, three_augment=three_augment)
    for _ in range(5):
        assert tf(image).shape == (3, 24, 24)
    has_erasing = any(isinstance(t, RandomErasing) for t in tf.transforms)
    assert has_erasing != three_augment  # ThreeAugment has no random erasing


def test_train_transform_options():
    names = [type(t).__name__ for t in build_transform(True, 24).transforms]
    assert "RandAugment" in names and "ColorJitter" not in names  # timm drops jitter when RandAugment is on
    names = [type(t).__name__ for t in build_transform(True, 24, auto_augment=None, reprob=0.0).transforms]
    assert "RandAugment" not in names and "ColorJitter" in names and "RandomErasing" not in names
    names = [type(t).__name__ for t in build_transform(True, 24, three_augment=True, color_jitter=None).transforms]
    assert "RandomChoice" in names and "ColorJitter" not in names


def test_randaugment_posterize_to_zero_bits_does_not_raise():
    # timm's PosterizeIncreasing reaches 0 bits at magnitude 10; current Pillow raises on that, old Pillow (and
    # the official runs) produced a black image.
    tf = build_transform(True, 24)
    randaugment = next(t for t in tf.transforms if type(t).__name__ == "RandAugment")
    posterize = next(op for op in randaugment.ops if op.name == "PosterizeIncreasing")
    image = Image.new("RGB", (24, 24), color=(120, 30, 200))
    assert np.asarray(posterize.aug_fn(image, 0)).max() == 0
    assert np.asarray(posterize.aug_fn(image, 2))[0, 0].tolist() == [64, 0, 192]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    assert np.asarray(posterize(image)).max() == 0


@pytest.mark.parametrize(("img_size", "crop_pct", "resize"), [(224, 0.875, 256), (128, 0.875, 146), (32, 1.0, 32)])
def test_eval_transform_resize_and_crop(img_size, crop_pct, resize):
    tf = build_transform(False, img_size, crop_pct=crop_pct)
    assert isinstance(tf.transforms[0], transforms.Resize) and tf.transforms[0].size == resize
    assert tf.transforms[0].interpolation == transforms.InterpolationMode.BICUBIC
    image = Image.new("RGB", (300, 200), color=(0, 128, 255))
    out = tf(image)
    assert out.shape == (3, img_size, img_size)
    # Normalized with the ImageNet statistics: channel 0 of black is -mean/std.
    assert out[0, 0, 0].item() == pytest.approx((0 - 0.485) / 0.229, abs=1e-3)
    assert torch.equal(out, tf(image))  # deterministic


# ------------------------------------------------------------------------------------------------ dataset checks


def test_build_digits_dataset(digits_root):
    train = build_dataset("digits", "train", root=digits_root, img_size=32, num_classes=10)
    val = build_dataset("digits", "val", root=digits_root, img_size=32, num_classes=10)
    assert isinstance(train, SafeImageFolder) and train.classes == [str(c) for c in range(10)]
    assert len(train) + len(val) == NUM_DIGITS
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


def _layout_missing_root(root: Path) -> Path:
    return root / "nowhere"


def _layout_missing_split(root: Path) -> Path:
    return _make_imagefolder(root, {"train": ["a", "b"]})


def _layout_no_classes(root: Path) -> Path:
    (root / "val").mkdir(parents=True)
    return root


def _layout_empty_class(root: Path) -> Path:
    _make_imagefolder(root, {"val": ["a"]})
    (root / "val" / "b").mkdir()
    (root / "val" / "b" / "readme.txt").write_text("no images here")
    return root


def _layout_class_mismatch(root: Path) -> Path:
    return _make_imagefolder(root, {"train": ["a", "b", "c"], "val": ["a", "b", "d"]})


def _layout_wrong_num_classes(root: Path) -> Path:
    return _make_imagefolder(root, {"train": ["a", "b"], "val": ["a", "b"]})


@pytest.mark.parametrize(
    ("make_layout", "match"),
    [
        (_layout_missing_root, "does not exist"),
        (_layout_missing_split, "Split folder .*val.* is missing"),
        (_layout_no_classes, "has no class folders"),
        (_layout_empty_class, "Class folder .*b.* has no images"),
        (_layout_class_mismatch, r"differ: only in val: \['d'\], only in train: \['c'\]"),
        (_layout_wrong_num_classes, "num_classes=3 but .* has 2 class folders"),
    ],
)
def test_imagefolder_layout_errors(tmp_path, make_layout, match):
    root = make_layout(tmp_path)
    with pytest.raises(DatasetError, match=match) as excinfo:
        build_dataset("imagefolder", "val", root=root, img_size=8, num_classes=3)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in str(excinfo.value)


def test_class_mismatch_is_caught_when_building_train(tmp_path):
    root = _layout_class_mismatch(tmp_path)
    with pytest.raises(DatasetError, match="differ"):
        build_dataset("imagefolder", "train", root=root, num_classes=3)


def test_unknown_name_split_and_hidden_folders(tmp_path):
    with pytest.raises(DatasetError, match="Unknown dataset 'imagenet21k'"):
        build_dataset("imagenet21k", "train")
    with pytest.raises(DatasetError, match="Unknown split 'test'"):
        build_dataset("synthetic", "test")
    root = _make_imagefolder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]})
    (root / "val" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    ds = build_dataset("imagefolder", "val", root=root, num_classes=2, img_size=8)
    assert ds.classes == ["a", "b"] and len(ds) == 4


# ------------------------------------------------------------------------------------------------ corrupt images


@pytest.fixture
def folder_with_corrupt_images(tmp_path) -> Path:
    _make_imagefolder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]}, per_class=3)
    good = (tmp_path / "val" / "a" / "0.jpg").read_bytes()
    (tmp_path / "val" / "a" / "1.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "val" / "b" / "2.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    return tmp_path


def test_corrupt_images_are_skipped_and_counted_in_workers(folder_with_corrupt_images):
    ds = build_dataset("imagefolder", "val", root=folder_with_corrupt_images, img_size=8, num_classes=2)
    loader = build_loader(ds, batch_size=2, is_training=False, num_workers=2, persistent_workers=False)
    labels = []
    for _ in range(2):  # the second epoch skips the known-bad files without decoding them again
        for images, targets in loader:
            assert images.shape[1:] == (3, 8, 8) and torch.isfinite(images).all()
            labels += targets.tolist()
    assert len(labels) == 2 * len(ds) == 12
    assert ds.num_bad_files == 2  # counted once per file, across both workers and epochs
    assert sorted(Path(p).relative_to(folder_with_corrupt_images).as_posix() for p in ds.bad_files()) == [
        "val/a/1.jpg", "val/b/2.jpg"]
    # a/1.jpg is replaced by a/2.jpg and b/2.jpg by the wrap-around a/0.jpg: label counts shift to class a.
    assert Counter(labels) == {0: 8, 1: 4}


def test_corrupt_image_warns_once_per_file(folder_with_corrupt_images):
    ds = build_dataset("imagefolder", "val", root=folder_with_corrupt_images, img_size=8, num_classes=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _, label = ds[1]
            assert label == 0
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert len(messages) == 1 and "1.jpg" in messages[0]


def test_corrupt_image_raises_when_strict(folder_with_corrupt_images):
    ds = build_dataset("imagefolder", "val", root=folder_with_corrupt_images, img_size=8, num_classes=2, strict=True)
    assert ds[0][1] == 0
    # num_workers=0: the error type survives a worker too (DataLoader re-raises it), but PyTorch then needs
    # 5 s per worker to shut the pool down, too slow for this file.
    loader = build_loader(ds, batch_size=2, is_training=False, num_workers=0)
    with pytest.raises(CorruptImageError, match="1.jpg"):
        for _ in loader:
            pass
    assert ds.num_bad_files == 0  # strict mode flags nothing


# ----------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_is_deterministic():
    a = build_dataset("synthetic", "train", img_size=16, num_classes=7, synthetic_length=50, in_chans=2)
    b = build_dataset("synthetic", "train", img_size=16, num_classes=7, synthetic_length=50, in_chans=2)
    val = build_dataset("synthetic", "val", img_size=16, num_classes=7, synthetic_length=50, in_chans=2)
    assert isinstance(a, SyntheticDataset) and len(a) == 50
    image, label = a[3]
    assert image.shape == (2, 16, 16) and image.dtype == torch.float32
    assert abs(image.mean().item()) < 0.3 and 0.7 < image.std().item() < 1.3  # already normalized
    assert torch.equal(image, b[3][0]) and label == b[3][1]
    assert not torch.equal(image, a[4][0]) and not torch.equal(image, val[3][0])
    labels = {a[i][1] for i in range(50)}
    assert labels <= set(range(7)) and len(labels) > 3
    with pytest.raises(IndexError):
        a[50]


# ------------------------------------------------------------------------------------------------------ samplers


def test_rasampler_repeats_consecutively_on_one_rank():
    sampler = RASampler(range(512), num_replicas=1, rank=0, shuffle=False, num_repeats=3)
    indices = list(sampler)
    assert len(sampler) == len(indices) == 512
    assert indices[:9] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_rasampler_spreads_copies_over_ranks():
    dataset = range(768)
    ranks = [RASampler(dataset, num_replicas=3, rank=r, num_repeats=3, seed=0) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(4)
    per_rank = [list(s) for s in ranks]
    assert [len(p) for p in per_rank] == [256] * 3  # 768 // 256 * 256 / 3
    # Each rank holds distinct images, and the three copies of every image go to the three ranks.
    assert all(len(set(p)) == len(p) for p in per_rank)
    assert per_rank[0] == per_rank[1] == per_rank[2]
    assert sorted(per_rank[0]) != list(range(256))  # shuffled


def test_rasampler_epoch_determinism_and_length():
    sampler = RASampler(range(1000), num_replicas=2, rank=1, num_repeats=3, seed=5)
    assert len(sampler) == 384  # 1000 // 256 * 256 / 2
    sampler.set_epoch(1)
    first = list(sampler)
    again = RASampler(range(1000), num_replicas=2, rank=1, num_repeats=3, seed=5)
    again.set_epoch(1)
    assert list(again) == first
    sampler.set_epoch(2)
    assert list(sampler) != first
    other_rank = RASampler(range(1000), num_replicas=2, rank=0, num_repeats=3, seed=5)
    other_rank.set_epoch(1)
    # Two ranks and three copies: every image of a rank appears at most twice there.
    both = Counter(first + list(other_rank))
    assert max(both.values()) <= 3 and max(Counter(first).values()) <= 2


def test_rasampler_small_dataset_fallback():
    samplers = [RASampler(range(101), num_replicas=2, rank=r) for r in range(2)]
    assert [len(s) for s in samplers] == [51, 51]  # ceil(101 / 2), not 0
    assert all(0 <= i < 101 for s in samplers for i in s)


@pytest.mark.parametrize(("length", "world"), [(10, 2), (11, 3), (2, 4)])
def test_distributed_eval_sampler_covers_every_index_once(length, world):
    per_rank = [list(DistributedEvalSampler(range(length), num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for p in per_rank for i in p) == list(range(length))
    assert [len(DistributedEvalSampler(range(length), num_replicas=world, rank=r)) for r in range(world)] == [
        len(p) for p in per_rank]
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


# ------------------------------------------------------------------------------------------------------- loaders


def test_loader_defaults_single_process():
    ds = build_dataset("synthetic", "train", img_size=4, num_classes=3, synthetic_length=10)
    train = build_loader(ds, batch_size=4, is_training=True, num_workers=0)
    assert isinstance(train.sampler, RandomSampler) and train.drop_last and len(train) == 2
    evaluation = build_loader(ds, batch_size=4, is_training=False, num_workers=0)
    assert isinstance(evaluation.sampler, SequentialSampler) and not evaluation.drop_last and len(evaluation) == 3
    order = [torch.cat([x.flatten() for x, _ in build_loader(ds, batch_size=4, is_training=True, num_workers=0,
                                                            seed=s)]) for s in (0, 0, 1)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])


def test_loader_worker_augmentation_seeding(digits_root):
    ds = build_dataset("digits", "train", root=digits_root, img_size=32, num_classes=10)
    subset = torch.utils.data.Subset(ds, range(16))

    def first_batches(seed):
        loader = build_loader(subset, batch_size=4, is_training=False, num_workers=2, seed=seed,
                              persistent_workers=False)
        return torch.cat([images for images, _ in loader])  # (16, 3, 32, 32)

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert torch.equal(a, b)  # same seed: identical random augmentations
    assert not torch.equal(a, c)


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_loader_distributed_sampler_choice(process_group):
    ds = build_dataset("synthetic", "train", img_size=4, num_classes=3, synthetic_length=300)
    ra = build_loader(ds, batch_size=8, is_training=True, num_workers=0, distributed=True, repeated_aug=3)
    assert isinstance(ra.sampler, RASampler) and ra.sampler.num_repeats == 3 and len(ra.sampler) == 256
    plain = build_loader(ds, batch_size=8, is_training=True, num_workers=0, distributed=True, repeated_aug=0)
    assert isinstance(plain.sampler, DistributedSampler) and plain.drop_last
    evaluation = build_loader(ds, batch_size=8, is_training=False, num_workers=0, distributed=True)
    assert isinstance(evaluation.sampler, DistributedEvalSampler) and not evaluation.drop_last
    assert sum(len(y) for _, y in evaluation) == 300
    set_sampler_epoch(ra, 1)
    assert ra.sampler.epoch == 1


def test_loader_distributed_needs_process_group():
    ds = build_dataset("synthetic", "train", img_size=4, num_classes=3, synthetic_length=8)
    with pytest.raises(RuntimeError, match="process group"):
        build_loader(ds, batch_size=2, is_training=True, distributed=True)


# --------------------------------------------------------------------------------------------------------- mixup


def test_build_mixup_soft_targets():
    assert build_mixup(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=10) is None
    mixup = build_mixup(num_classes=10, label_smoothing=0.1)
    assert isinstance(mixup, Mixup)
    np.random.seed(0)  # timm draws lambda and the mix mode with numpy
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)
    mixed, targets = mixup(images.clone(), labels)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing floor
    # Batch mode mixes sample i with sample B - 1 - i: both labels carry mass.
    assert (targets[0, 0] > 0.01) and (targets[0, 7] > 0.01)
