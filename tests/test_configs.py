"""Every file of every config group composes and builds (with the tiny test model on CPU), the run directory is
derived from run_name (never a timestamp), and bad input fails with one clear line and a non-zero exit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import train
from visionmamba.distributed import DistInfo
from visionmamba.engine import train_one_epoch
from visionmamba.models import UnknownModelError, list_models

pytestmark = pytest.mark.usefixtures("one_thread")

CONF = Path(__file__).resolve().parents[1] / "conf"
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def imagefolder_root(tmp_path_factory):
    """A 2-class ImageNet-layout folder with a few real JPEGs."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                color = (60 * i, 100 if cls == "cat" else 200, 30)
                Image.new("RGB", (40, 36), color).save(root / split / cls / f"{i}.jpg")
    return root


def tiny_job_overrides(data_name: str, digits_root, imagefolder_root) -> list[str]:
    roots = {"digits": [f"data.root={digits_root}"], "synthetic": ["data.train_length=16", "data.val_length=8"],
             "imagefolder": [f"data.root={imagefolder_root}", "data.num_classes=2"],
             "imagefolder_gpu": [f"data.root={imagefolder_root}", "data.num_classes=2"]}
    return [f"data={data_name}", *roots[data_name], "data.img_size=32", "batch_size=4", "workers=0",
            "model=vim_test", "epochs=2", "optimizer.schedule.warmup_epochs=1"]


# ---- every group option ----------------------------------------------------------------------------------------
def test_one_model_file_per_registered_model():
    assert options("model") == list_models()


@pytest.mark.parametrize("name", options("model"))
def test_model_file_builds(name, fw):
    cfg = fw.compose_train(f"model={name}", "data=synthetic")
    assert cfg.model.name == name and cfg.model.num_classes == 1000 and cfg.model.img_size == 224
    with torch.device("meta"):  # full-size architectures without allocating or initialising weights
        model = train.build_model(cfg.model)
    assert model.num_features > 0 and model.model_name == name


@pytest.mark.parametrize("name", options("data"))
def test_data_file_builds_loaders_that_feed_the_model(name, digits_root, imagefolder_root, fw):
    cfg = fw.compose_train(*tiny_job_overrides(name, digits_root, imagefolder_root))
    model = train.build_model(cfg.model).eval()
    for split in ("train", "val"):
        _, loader = train.build_data(cfg.data, cfg.regularizer, split, batch_size=4, workers=0, distributed=False)
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 32, 32) and labels.max() < cfg.data.num_classes
        with torch.no_grad():
            assert model(images).shape == (4, cfg.data.num_classes)


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_file_builds_optimizer_and_schedule(name, fw):
    cfg = fw.compose_train(f"optimizer={name}", "model=vim_test", "data=synthetic", "batch_size=64", "accum_steps=2")
    model = train.build_model(cfg.model)
    optimizer, scheduler, derived = train.build_optimization(cfg, model, world_size=8, steps_per_epoch=10)
    assert derived["global_batch"] == 64 * 2 * 8
    assert derived["lr"] == pytest.approx(cfg.optimizer.base_lr * 1024 / cfg.optimizer.base_batch)
    assert {len(g["params"]) > 0 for g in optimizer.param_groups} == {True}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, cfg.optimizer.weight_decay}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.schedule.warmup_lr)  # warmup starts low
    scheduler.after_epoch(cfg.optimizer.schedule.warmup_epochs)
    assert max(g["lr"] for g in optimizer.param_groups) > cfg.optimizer.schedule.warmup_lr


@pytest.mark.parametrize("name", options("regularizer"))
def test_regularizer_file_builds_and_trains_a_step(name, digits_root, imagefolder_root, fw):
    """Augmentations on real JPEGs, mixup/cutmix, criterion, EMA and drop path in two real training steps."""
    cfg = fw.compose_train(f"regularizer={name}", *tiny_job_overrides("imagefolder", digits_root, imagefolder_root))
    job = train.build_job(cfg, CPU)
    assert (job.mixup_fn is not None) == (cfg.regularizer.mixup.mixup_alpha > 0)
    assert (job.ema is not None) == cfg.regularizer.ema.enabled
    stats = train_one_epoch(job.train_model, job.train_loader, job.optimizer, job.criterion, CPU.device, 0,
                            scheduler=job.scheduler, ema=job.ema, mixup_fn=job.mixup_fn, progress="none")
    assert stats["num_updates"] == 2 and stats["skipped_steps"] == 0 and stats["loss"] > 0


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_file_composes_and_builds_with_the_test_model(name, digits_root, imagefolder_root, fw):
    recipe = fw.compose_train(f"experiment={name}", "data.root=/unused")
    OmegaConf.to_container(recipe, resolve=True, throw_on_missing=True)
    assert recipe.run_name and recipe.model.name in list_models()
    # The same recipe, shrunk to the test model and synthetic data, builds every object (a later stage's
    # hand-over from its previous stage is left out: that run does not exist here).
    cfg = fw.compose_train(f"experiment={name}", *tiny_job_overrides("synthetic", digits_root, imagefolder_root),
                           "init_from=null")
    job = train.build_job(cfg, CPU)
    assert job.model.model_name == "vim_test"


def test_shufflemamba_base_recipe_values(fw):
    cfg = fw.compose_train("experiment=shufflemamba_base_in1k", "data.root=/data/imagenet")
    model = train.build_model(fw.compose_train("model=vim_test", "data=synthetic").model)
    _, _, derived = train.build_optimization(cfg, model, world_size=8, steps_per_epoch=625)
    assert derived == {"global_batch": 2048, "lr": pytest.approx(2e-3)}  # 5e-4 x 2048 / 512
    assert (cfg.model.name, cfg.regularizer.shuffle.rate, cfg.regularizer.drop_path) == ("shufflemamba_base", 0.5, 0.5)
    assert (cfg.precision, cfg.use_grad_scaler, cfg.clip_grad) == ("bf16", True, 3.0)
    assert list(cfg.optimizer.betas) == [0.9, 0.95] and cfg.regularizer.ema.decay == 0.9999


def test_validate_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("validate", overrides=["checkpoint=x.pth", "data.root=/elsewhere"])
        assert cfg.model.name is None and cfg.data.name is None  # completed from the checkpoint at run time
        assert cfg.data.root == "/elsewhere" and cfg.model.kernel_backend == "auto"
        cfg = compose("validate", overrides=["checkpoint=x.pth", "model=vim_tiny", "data=imagefolder",
                                             "data.root=/d", "data.img_size=128", "data.num_classes=100"])
        assert (cfg.model.img_size, cfg.model.num_classes, cfg.model.drop_path_rate) == (128, 100, 0.0)
        assert cfg.data.crop_pct == 0.875  # the group's values replace the null placeholders


# ---- run directory -----------------------------------------------------------------------------------------------
def test_run_dir_is_derived_from_run_name_not_time(fw):
    text = (CONF / "train.yaml").read_text()
    assert "${now:" not in text
    cfg = fw.compose_train("model=vim_test", "data=digits", hydra=True)
    assert cfg.hydra.run.dir == "outputs/vim_test-digits"
    cfg = fw.compose_train("run_name=exp1", "output_dir=/runs", hydra=True)
    assert cfg.hydra.run.dir == "/runs/exp1" and cfg.hydra.sweep.dir == "/runs/exp1"


def test_required_overrides_are_plain_keys(fw):
    """The overrides the README promises, exactly as written."""
    cfg = fw.compose_train("model=shufflemamba_tiny", "data=imagefolder", "data.root=/d", "data.img_size=128",
                        "data.num_classes=100", "epochs=7", "batch_size=48", "run_name=r",
                        "mlflow.tracking_uri=file:/x",
                        "regularizer.shuffle.rate=0.3", "mlflow.enabled=false", "mlflow.experiment_name=e",
                        "kernel_backend=ref", "precision=fp16", "accum_steps=2", "clip_grad=1.0", "compile=true",
                        "eval_every=5", "save_every=10", "workers=3", "seed=7", "output_dir=o")
    assert (cfg.model.img_size, cfg.model.num_classes, cfg.model.shuffle_rate, cfg.model.kernel_backend) == (
        128, 100, 0.3, "ref")
    assert (cfg.epochs, cfg.batch_size, cfg.run_name, cfg.mlflow.tracking_uri) == (7, 48, "r", "file:/x")


# ---- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, error", [
    (["data=synthetic", "model.name=vim_tinny"], UnknownModelError),
    (["data=synthetic", "precision=fp8"], train.ConfigError),
    (["data=imagefolder"], train.ConfigError),  # data.root not set
    (["data=imagefolder", "data.root=/nonexistent"], train.DatasetError),
])
def test_bad_values_raise_user_errors(overrides, error, fw):
    cfg = fw.compose_train("model=vim_test", "workers=0", *overrides)
    with pytest.raises(error) as info:
        train.build_job(cfg, CPU)
    assert isinstance(info.value, train.USER_ERRORS)
    if error is UnknownModelError:
        assert "vim_tiny" in str(info.value)  # suggests / lists the valid names


def test_cli_unknown_group_option_lists_the_valid_ones(tmp_path, fw):
    proc = fw.run_script(["train.py", "model=vim_tinny"], tmp_path, check=False)
    assert proc.returncode == 2  # one line (train.run_cli), instead of Hydra's multi-line report
    assert "error: unknown model=vim_tinny (did you mean vim_tiny" in proc.stdout and "vim_test" in proc.stdout
    assert not (tmp_path / "outputs").exists()


# ---- numerics options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, use_grad_scaler, expect_scaler", [
    ("fp16", None, True),   # fp16 always gets a GradScaler
    ("bf16", None, False),  # bf16 needs none ...
    ("bf16", True, True),   # ... but can have one, as ShuffleMamba does
])
def test_precision_options_train_a_step(precision, use_grad_scaler, expect_scaler, digits_root, imagefolder_root, fw):
    cfg = fw.compose_train(*tiny_job_overrides("synthetic", digits_root, imagefolder_root), f"precision={precision}",
                        f"use_grad_scaler={'null' if use_grad_scaler is None else str(use_grad_scaler).lower()}",
                        "clip_grad=1.0")
    job = train.build_job(cfg, CPU)
    assert (job.scaler is not None) == expect_scaler
    stats = train_one_epoch(job.train_model, job.train_loader, job.optimizer, job.criterion, CPU.device, 0,
                            amp_dtype=job.amp_dtype, scaler=job.scaler, clip_grad=cfg.clip_grad,
                            mixup_fn=job.mixup_fn, ema=job.ema, progress="none")
    assert stats["num_updates"] == 4 and stats["loss"] > 0
    assert all(p.dtype == torch.float32 for p in job.model.parameters())  # autocast only; weights stay fp32


def test_fp16_without_a_scaler_is_refused(digits_root, imagefolder_root, fw):
    cfg = fw.compose_train(*tiny_job_overrides("synthetic", digits_root, imagefolder_root), "precision=fp16",
                        "use_grad_scaler=false")
    with pytest.raises(train.ConfigError, match="GradScaler"):
        train.build_job(cfg, CPU)
