"""The official recipes (conf/experiment/) resolve value for value to their sources (spec §4), the multi-stage lists
(conf/multistage/) chain them in order, and a 4-GPU user keeps a recipe with accum_steps.

The expected values below are transcribed from the official scripts as the spec quotes them (run.sh, run_reg.sh, the
Mamba-Reg README, vim/scripts/*.sh), not from the YAML files, and the learning rate goes through the same
``train.build_optimization`` that train.py uses (DeiT scaling by the global batch).
"""
from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path

import pytest
import yaml

import train

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "conf" / "experiment"
SOURCE_GPUS = 8  # every official script runs on one 8-GPU node

# Defaults of the shared DeiT pipeline (spec §4.1) that every ImageNet recipe keeps unless it says otherwise.
PIPELINE = {
    "data.name": "imagefolder", "data.interpolation": "bicubic", "optimizer.eps": 1e-8,
    "optimizer.decay_mode": "official", "optimizer.schedule.interval": "epoch",
    "optimizer.schedule.official_epoch_shift": True, "regularizer.mixup.mixup_alpha": 0.8,
    "regularizer.mixup.cutmix_alpha": 1.0, "regularizer.mixup.prob": 1.0, "regularizer.mixup.switch_prob": 0.5,
    "regularizer.mixup.mode": "batch", "regularizer.scale": [0.08, 1.0], "regularizer.hflip": 0.5,
    "regularizer.ema.enabled": True, "accum_steps": 1,
}

# ShuffleMamba-B, run.sh / main_shuffle.py (spec §4.2).
SHUFFLEMAMBA_B = {
    **PIPELINE, "model.name": "shufflemamba_base", "epochs": 300, "batch_size": 256, "global_batch": 2048,
    "lr": 2e-3, "optimizer.base_lr": 5e-4, "optimizer.weight_decay": 0.1, "optimizer.betas": [0.9, 0.95],
    "clip_grad": 3.0, "optimizer.schedule.warmup_epochs": 30, "optimizer.schedule.warmup_lr": 5e-7,
    "optimizer.schedule.min_lr": 5e-6, "regularizer.drop_path": 0.5, "regularizer.shuffle.rate": 0.5,
    "regularizer.shuffle.schedule": "linear", "regularizer.ema.decay": 0.9999, "regularizer.ema.eval": True,
    "precision": "bf16", "use_grad_scaler": True, "data.img_size": 224, "data.crop_pct": 0.875,
    "regularizer.auto_augment": "rand-m9-mstd0.5-inc1", "regularizer.three_augment": False,
    "regularizer.reprob": 0.25, "regularizer.label_smoothing": 0.1, "regularizer.repeated_aug": 3,
    "save_every": 50, "workers": 12, "init_from": None,
}

# Reg-B stage 1 "128pt" (run_reg.sh / main_reg.py, spec §4.3 table); stages 2 and 3 are diffs of it.
REG_B_128 = {
    **PIPELINE, "model.name": "shufflemamba_reg_base", "epochs": 300, "batch_size": 128, "global_batch": 1024,
    "lr": 1e-3, "optimizer.base_lr": 5e-4, "optimizer.scale_lr": True, "optimizer.weight_decay": 0.05,
    "optimizer.betas": [0.9, 0.999], "clip_grad": None, "optimizer.schedule.warmup_epochs": 5,
    "optimizer.schedule.warmup_lr": 1e-6, "optimizer.schedule.min_lr": 1e-5, "regularizer.drop_path": 0.1,
    "regularizer.shuffle.rate": 0.1, "regularizer.shuffle.schedule": "linear", "regularizer.ema.decay": 0.99996,
    "precision": "bf16", "use_grad_scaler": True, "data.img_size": 128, "data.crop_pct": 0.875,
    "regularizer.three_augment": True, "regularizer.reprob": 0.0, "regularizer.label_smoothing": 0.0,
    "regularizer.repeated_aug": 3, "workers": 16, "init_from": None,
}
REG_B_224MID = {
    **REG_B_128, "data.img_size": 224, "epochs": 100, "optimizer.base_lr": 2e-4, "lr": 4e-4,
    "regularizer.drop_path": 0.4, "init_from": "previous", "init_from_ema": False,
}
REG_B_224FT = {
    **REG_B_224MID, "epochs": 20, "batch_size": 64, "global_batch": 512, "optimizer.base_lr": 1e-5, "lr": 1e-5,
    "optimizer.weight_decay": 0.1, "data.crop_pct": 1.0, "regularizer.label_smoothing": 0.1,
    "regularizer.three_augment": False, "regularizer.auto_augment": "rand-m9-mstd0.5-inc1",
    "regularizer.reprob": 0.0, "regularizer.repeated_aug": 0,
}


def _mamba_reg(stage: dict) -> dict:
    """Mamba-Reg README (spec §4.4): the same stages for mambar_base without shuffle, and a plain backward (its
    engine never uses the GradScaler); stage 3 passes --unscale-lr."""
    out = {**stage, "model.name": "mambareg_base", "regularizer.shuffle.rate": 0.0, "use_grad_scaler": False}
    if stage is REG_B_224FT:
        out["optimizer.scale_lr"] = False
    return out


# Vim scripts (spec §4.5): fp32, EMA 0.99996, RandAugment, default betas, warmup 5, no clipping.
VIM_T = {
    **PIPELINE, "model.name": "vim_tiny", "epochs": 300, "batch_size": 128, "global_batch": 1024, "lr": 1e-3,
    "optimizer.base_lr": 5e-4, "optimizer.weight_decay": 0.1, "optimizer.betas": [0.9, 0.999], "clip_grad": None,
    "optimizer.schedule.warmup_epochs": 5, "optimizer.schedule.warmup_lr": 1e-6, "optimizer.schedule.min_lr": 1e-5,
    "regularizer.drop_path": 0.0, "regularizer.shuffle.rate": 0.0, "regularizer.ema.decay": 0.99996,
    "precision": "fp32", "use_grad_scaler": False, "data.img_size": 224, "data.crop_pct": 0.875,
    "regularizer.auto_augment": "rand-m9-mstd0.5-inc1", "regularizer.three_augment": False,
    "regularizer.reprob": 0.25, "regularizer.label_smoothing": 0.1, "regularizer.repeated_aug": 3,
    "workers": 25, "init_from": None,
}
VIM_S = {**VIM_T, "model.name": "vim_small", "batch_size": 64, "global_batch": 512, "optimizer.base_lr": 1e-3,
         "lr": 1e-3, "optimizer.weight_decay": 0.05, "regularizer.drop_path": 0.05}
STRIDE8_FT = {  # ft-vim-{t,s}.sh: --lr 5e-6 --min-lr 1e-5 --warmup-lr 1e-5 (a constant 1e-5), 30 epochs
    "epochs": 30, "batch_size": 128, "global_batch": 1024, "optimizer.base_lr": 5e-6, "lr": 1e-5,
    "optimizer.schedule.warmup_lr": 1e-5, "optimizer.schedule.min_lr": 1e-5, "regularizer.drop_path": 0.0,
    "optimizer.weight_decay": 1e-8, "init_from": "previous", "init_from_ema": False,
}

RECIPES = {
    "shufflemamba_base_in1k": SHUFFLEMAMBA_B,
    "shufflemamba_reg_base_stage1_128": REG_B_128,
    "shufflemamba_reg_base_stage2_224": REG_B_224MID,
    "shufflemamba_reg_base_stage3_224ft": REG_B_224FT,
    "mambareg_base_stage1_128": _mamba_reg(REG_B_128),
    "mambareg_base_stage2_224": _mamba_reg(REG_B_224MID),
    "mambareg_base_stage3_224ft": _mamba_reg(REG_B_224FT),
    "vim_tiny_in1k": VIM_T,
    "vim_small_in1k": VIM_S,
    "vim_tiny_stride8_ft": {**VIM_T, **STRIDE8_FT, "model.name": "vim_tiny_stride8"},
    "vim_small_stride8_ft": {**VIM_S, **STRIDE8_FT, "model.name": "vim_small_stride8"},
}
# ShuffleMamba T/S/M/L: run.sh is published for B only; everything but the marked best guesses is run.sh's.
BEST_GUESS_SIZES = {"tiny": "shufflemamba_tiny", "small": "shufflemamba_small", "middle": "shufflemamba_middle",
                    "large": "shufflemamba_large"}
for _size, _model in BEST_GUESS_SIZES.items():
    RECIPES[f"shufflemamba_{_size}_in1k"] = {k: v for k, v in SHUFFLEMAMBA_B.items()
                                             if k not in ("regularizer.drop_path", "regularizer.shuffle.rate")}
    RECIPES[f"shufflemamba_{_size}_in1k"]["model.name"] = _model

MULTISTAGE = {  # recipe -> its stage experiments, in order
    "shufflemamba_reg_base": ["shufflemamba_reg_base_stage1_128", "shufflemamba_reg_base_stage2_224",
                              "shufflemamba_reg_base_stage3_224ft"],
    "mambareg_base": ["mambareg_base_stage1_128", "mambareg_base_stage2_224", "mambareg_base_stage3_224ft"],
    "vim_tiny": ["vim_tiny_in1k", "vim_tiny_stride8_ft"],
    "vim_small": ["vim_small_in1k", "vim_small_stride8_ft"],
}


@functools.lru_cache(maxsize=None)
def _composed(name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", "data.root=/data/imagenet"])


def recipe(name: str, **changes):
    """The experiment composed as train.py composes it (cached: composing costs ~0.3 s), with top-level changes."""
    cfg = copy.deepcopy(_composed(name))
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def _get(cfg, dotted: str):
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, dotted, throw_on_missing=False)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.fixture(scope="module")
def vim_test_model():
    """Only the optimizer's param groups need a model; the lr does not depend on which."""
    from visionmamba import create_model

    return create_model("vim_test")


def _derived(cfg, model, world_size: int) -> dict:
    _, scheduler, derived = train.build_optimization(cfg, model, world_size=world_size, steps_per_epoch=10)
    return {**derived, "scheduler": scheduler}


def test_every_imagenet_experiment_is_covered():
    files = {p.stem for p in EXPERIMENTS.glob("*.yaml")} - {"digits_quickstart"}
    assert files == set(RECIPES), "a recipe file without expected values here (or the other way round)"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_resolves_to_its_source(name, vim_test_model):
    expected = RECIPES[name]
    cfg = recipe(name)
    derived = _derived(cfg, vim_test_model, SOURCE_GPUS)
    wrong = {}
    for key, want in expected.items():
        if key in ("global_batch", "lr"):
            got = derived[key]
        elif key == "init_from":
            got = _get(cfg, key)
            # a later stage names its previous stage's run directory (run_stages.py passes the real one)
            got = "previous" if got and Path(str(got)).parent.name == "outputs" else got
        else:
            got = _get(cfg, key)
        if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
            ok = got == pytest.approx(want, rel=1e-9)
        else:
            ok = got == want
        if not ok:
            wrong[key] = (got, want)
    assert not wrong, f"{name}: (resolved, source) {wrong}"
    assert cfg.model.img_size == cfg.data.img_size and cfg.model.num_classes == cfg.data.num_classes == 1000


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_file_cites_its_source_and_marks_guesses(name):
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"spec §4\.\d", header), f"{name}.yaml does not cite the spec section of its source"
    assert re.search(r"run\.sh|run_reg\.sh|README|vim/scripts|pt-vim|ft-vim", header), f"{name}: no source script"
    if name.startswith("shufflemamba_") and name.split("_")[1] in BEST_GUESS_SIZES:
        # the values run.sh does not give for this size are marked on their own lines
        for key in ("drop_path:", "rate:"):
            line = next(line for line in text.splitlines() if line.strip().startswith(key))
            assert "BEST GUESS" in line, f"{name}: {key} is not marked as a best guess"


def test_schedules_of_the_fine_tunes(vim_test_model):
    # stride-8 fine-tune: warmup_lr == lr == min_lr, so every epoch runs at 1e-5
    for name in ("vim_tiny_stride8_ft", "vim_small_stride8_ft"):
        sched = _derived(recipe(name), vim_test_model, 8)["scheduler"]
        assert [sched.lr_at(t) for t in range(30)] == pytest.approx([1e-5] * 30, rel=1e-9), name
    # Reg stage 3: lr == min_lr, so a 5-epoch warmup 1e-6 -> 1e-5 and then constant (spec §4.3)
    for name in ("shufflemamba_reg_base_stage3_224ft", "mambareg_base_stage3_224ft"):
        sched = _derived(recipe(name), vim_test_model, 8)["scheduler"]
        warm = [sched.lr_at(t) for t in range(5)]
        assert warm[0] == pytest.approx(1e-6) and all(a < b for a, b in zip(warm, warm[1:])), name
        assert [sched.lr_at(t) for t in range(5, 20)] == pytest.approx([1e-5] * 15, rel=1e-9), name
    # ShuffleMamba-B: 30 warmup epochs from 5e-7; the cosine restarts its clock at 0 (peak ~0.976 x 2e-3)
    sched = _derived(recipe("shufflemamba_base_in1k"), vim_test_model,
                     8)["scheduler"]
    assert sched.lr_at(0) == pytest.approx(5e-7)
    assert sched.lr_at(30) == pytest.approx(5e-6 + 0.5 * (2e-3 - 5e-6) * (1 + math.cos(math.pi * 30 / 300)))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_four_gpus_keep_the_recipe_with_accumulation(name, vim_test_model):
    """batch_size is per GPU and the lr follows the global batch: on 4 GPUs, accum_steps=2 gives the same global
    batch and lr as the source's 8 GPUs (and 1 GPU with accum_steps=8)."""
    cfg8 = recipe(name)
    want = {k: v for k, v in _derived(cfg8, vim_test_model, 8).items() if k != "scheduler"}
    for gpus, accum in ((4, 2), (2, 4), (1, 8)):
        cfg = recipe(name, accum_steps=accum)
        got = {k: v for k, v in _derived(cfg, vim_test_model, gpus).items() if k != "scheduler"}
        assert got == pytest.approx(want), f"{name} on {gpus} GPUs x accum_steps={accum}"
    # without accumulation the recipe changes (lr scaled down with the global batch), which train.py logs
    if cfg8.optimizer.scale_lr:
        assert _derived(cfg8, vim_test_model, 4)["lr"] == pytest.approx(want["lr"] / 2)


@pytest.mark.parametrize("multistage", sorted(MULTISTAGE))
def test_multistage_lists_chain_the_stage_experiments(multistage):
    stages = yaml.safe_load((REPO / "conf" / "multistage" / f"{multistage}.yaml").read_text())["stages"]
    assert [s["experiment"] for s in stages] == MULTISTAGE[multistage]
    assert "init_from" not in stages[0] and all(s.get("init_from") == "previous" for s in stages[1:])
    # the stage experiments' own default init_from points at the previous stage's default run directory
    names = [recipe(e).run_name for e in MULTISTAGE[multistage]]
    for experiment, previous in zip(MULTISTAGE[multistage][1:], names):
        assert recipe(experiment).init_from == f"outputs/{previous}"


def test_readme_batch_table_matches_the_recipes(vim_test_model):
    """The README's per-GPU / global batch table lists every recipe with the values the configs resolve to."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Recipes and multi-stage training", 1)[1].split("\n## ", 1)[0]
    for name in sorted(RECIPES):
        row = next((line for line in section.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"README recipe table has no row for {name}"
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        cfg = recipe(name)
        derived = _derived(cfg, vim_test_model, 8)
        assert int(cells[2]) == cfg.batch_size, f"{name}: per-GPU batch in README"
        assert int(cells[3]) == derived["global_batch"], f"{name}: global batch in README"
        assert float(cells[4]) == pytest.approx(derived["lr"]), f"{name}: effective lr in README"
        assert cells[5] == f"accum_steps={derived['global_batch'] // (4 * cfg.batch_size)}", name
