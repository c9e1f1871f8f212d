"""validate.py on checkpoint files in the official formats (spec §5), built here with random weights under the
official key names (spec §3.3, written out independently of our model code):

* Vim / ShuffleMamba / Mamba-Reg ``{'model', 'model_ema', 'optimizer', 'lr_scheduler', 'epoch', 'scaler',
  'args'}`` with a pickled ``argparse.Namespace``: refused by default with the way to opt in, evaluated with
  ``trust_checkpoint=true``, EMA weights with ``use_ema=true``;
* a bare state_dict and ``module.``-prefixed keys (a DDP-wrapped save);
* a file that does not fit the model: the missing / unexpected / mismatched keys are listed;

and what validate.py reports equals an evaluation of the model loaded directly (``load_state_dict(strict=True)``),
whose logits equal those of the model validate.py's loader builds.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train
import validate
from visionmamba import create_model
from visionmamba.checkpoint import CheckpointError, load_weights, read_checkpoint_info
from visionmamba.engine import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

CONF = Path(__file__).resolve().parents[1] / "conf"
# The registered test models: 32 px, patch 8 (4x4 grid), 4 layers of width 64, d_state 16, expand 2, conv 4.
DIM, DEPTH, PATCH, IMG, CLASSES = 64, 4, 8, 32, 10


def official_state_dict(*, num_registers: int = 0, register_reduce: int = 1, seed: int = 0) -> dict:
    """Random weights under the official names and shapes, in the official order (spec §3.3; Reg: §1.3)."""
    g = torch.Generator().manual_seed(seed)
    n = (IMG // PATCH) ** 2
    inner, state, dt_rank = 2 * DIM, 16, math.ceil(DIM / 16)
    shapes = {"cls_token": (1, num_registers or 1, DIM)}
    if num_registers:
        shapes.update({"pos_embed": (1, n, DIM), "pos_embed_cls": (1, num_registers, DIM)})
    else:
        shapes["pos_embed"] = (1, n + 1, DIM)
    shapes.update({"patch_embed.proj.weight": (DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": (DIM,)})
    head_in = num_registers * DIM // register_reduce if num_registers else DIM
    if register_reduce > 1:
        shapes["neck.weight"] = (DIM // register_reduce, DIM)
    shapes.update({"head.weight": (CLASSES, head_in), "head.bias": (CLASSES,)})
    for i in range(DEPTH):
        p = f"layers.{i}."
        for suffix in ("", "_b"):
            shapes[f"{p}mixer.A{suffix}_log"] = (inner, state)
            shapes[f"{p}mixer.D{suffix}"] = (inner,)
        shapes[f"{p}mixer.in_proj.weight"] = (2 * inner, DIM)
        for suffix in ("", "_b"):
            shapes[f"{p}mixer.conv1d{suffix}.weight"] = (inner, 1, 4)
            shapes[f"{p}mixer.conv1d{suffix}.bias"] = (inner,)
            shapes[f"{p}mixer.x_proj{suffix}.weight"] = (dt_rank + 2 * state, inner)
            shapes[f"{p}mixer.dt_proj{suffix}.weight"] = (inner, dt_rank)
            shapes[f"{p}mixer.dt_proj{suffix}.bias"] = (inner,)
        shapes[f"{p}mixer.out_proj.weight"] = (DIM, inner)
        shapes[f"{p}norm.weight"] = (DIM,)
    shapes["norm_f.weight"] = (DIM,)
    if register_reduce > 1:
        shapes["norm_neck.weight"] = (num_registers * DIM // register_reduce,)
    out = {}
    for key, shape in shapes.items():
        value = 0.1 * torch.randn(shape, generator=g)
        if key.endswith(("A_log", "A_b_log")):  # a stable SSM: A = -exp(A_log) with A_log ~ log(1..16)
            value = torch.log(torch.arange(1, state + 1, dtype=torch.float32)).expand(shape) + value
        elif key.endswith(("norm.weight", "norm_f.weight", "norm_neck.weight", ".D", ".D_b")):
            value = 1.0 + value
        out[key] = value
    return out


def official_file(path: Path, raw: dict, *, ema_shift: float = 0.05, model_key: str = "model") -> Path:
    """The dict main.py / main_shuffle.py / main_reg.py save: raw and EMA weights plus the pickled args."""
    ema = {k: v + ema_shift for k, v in raw.items()}
    torch.save({model_key: raw, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {}, "epoch": 299, "scaler": "none",
                "args": argparse.Namespace(model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_"
                                                 "with_midclstok_div2", lr=5e-4, input_size=224)}, path)
    return path


@pytest.fixture(scope="module")
def vim_file(tmp_path_factory) -> tuple[Path, dict]:
    raw = official_state_dict(seed=1)
    assert len(raw) == DEPTH * 17 + 7  # the spec's count: 24 x 17 + 7 = 415 for Vim-T
    return official_file(tmp_path_factory.mktemp("official") / "vim_t_midclstok.pth", raw), raw


def direct_metrics(name: str, state_dict: dict, digits_root: Path, batch_size: int = 120, **model_kwargs) -> dict:
    """Evaluate the model loaded directly from the state_dict (no conversion of ours), through engine.evaluate."""
    model = create_model(name, num_classes=CLASSES, **model_kwargs)
    model.load_state_dict(state_dict, strict=True)
    cfg = _compose_validate("checkpoint=unused", f"model={name}", "data=digits", f"data.root={digits_root}")
    _, loader = train.build_data(cfg.data, None, "val", batch_size=batch_size, workers=0, distributed=False)
    return evaluate(model, loader, torch.device("cpu"), amp_dtype=None, progress="none")


def _compose_validate(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("validate", overrides=list(overrides))


def run_validate(tmp_path: Path, *overrides: str) -> dict:
    """validate.validate() in process, as validate.py runs it (the CLI adds only the error formatting)."""
    out = tmp_path / f"summary{len(list(tmp_path.glob('summary*.json')))}.json"
    cfg = _compose_validate(*overrides, "precision=fp32", "batch_size=120", "workers=0", "progress=none",
                            "device=cpu", f"output={out}")
    validate.validate(cfg)
    return json.loads(out.read_text())


def test_cli_refuses_pickled_args_by_default_and_evaluates_when_trusted(vim_file, digits_root, tmp_path, fw):
    path, raw = vim_file
    base = ["validate.py", f"checkpoint={path}", "model=vim_test", "data=digits", f"data.root={digits_root}",
            "precision=fp32", "batch_size=120", "workers=0", f"output={tmp_path / 'val.json'}"]
    refused = fw.run_script(base, tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stdout, refused.stdout[-3000:]
    assert "pickled Python objects" in refused.stdout and "trust_checkpoint=true" in refused.stdout
    assert "scripts/convert_checkpoint.py" in refused.stdout and not (tmp_path / "val.json").exists()

    proc = fw.run_script([*base, "trust_checkpoint=true"], tmp_path)
    summary = json.loads((tmp_path / "val.json").read_text())
    assert summary["format"] == "foreign" and summary["weights"] == "model" and summary["epoch"] == 299
    assert summary["num_samples"] == 360 and "vim_test (model, epoch 299)" in proc.stdout
    direct = direct_metrics("vim_test", raw, digits_root)
    assert summary["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert (summary["top1"], summary["top5"]) == (direct["top1"], direct["top5"])


def test_logits_equal_those_of_the_directly_loaded_model(vim_file):
    path, raw = vim_file
    direct = create_model("vim_test", num_classes=CLASSES).eval()
    direct.load_state_dict(raw, strict=True)
    checkpoint, info = read_checkpoint_info(path, trust_pickle=True)
    ours = create_model("vim_test", num_classes=CLASSES).eval()  # validate.py's loading path
    report = load_weights(ours, path, checkpoint=checkpoint)
    assert info["format"] == "foreign" and not (report.resized or report.dropped)
    images = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), direct(images), rtol=0, atol=0)


def test_use_ema_evaluates_the_ema_weights(vim_file, digits_root, tmp_path):
    path, raw = vim_file
    common = [f"checkpoint={path}", "model=vim_test", "data=digits", f"data.root={digits_root}",
              "trust_checkpoint=true"]
    raw_summary = run_validate(tmp_path, *common)
    ema_summary = run_validate(tmp_path, *common, "use_ema=true")
    assert ema_summary["weights"] == "model_ema" and raw_summary["weights"] == "model"
    direct_ema = direct_metrics("vim_test", {k: v + 0.05 for k, v in raw.items()}, digits_root)
    assert ema_summary["loss"] == pytest.approx(direct_ema["loss"], rel=1e-6)
    assert ema_summary["loss"] != pytest.approx(raw_summary["loss"], rel=1e-6)


def test_module_prefixes_and_bare_state_dicts(vim_file, digits_root, tmp_path):
    """A bare state_dict needs no pickle (loads safely without trust_checkpoint); ``module.`` prefixes of a
    DDP-wrapped save are stripped, in a bare file as inside an official dict."""
    _, raw = vim_file
    direct = direct_metrics("vim_test", raw, digits_root)
    bare = tmp_path / "bare_ddp.pth"
    torch.save({f"module.{k}": v for k, v in raw.items()}, bare)
    wrapped = official_file(tmp_path / "official_ddp.pth", {f"module.{k}": v for k, v in raw.items()})
    for path, extra in ((bare, []), (wrapped, ["trust_checkpoint=true"])):
        summary = run_validate(tmp_path, f"checkpoint={path}", "model=vim_test", "data=digits",
                               f"data.root={digits_root}", *extra)
        assert summary["loss"] == pytest.approx(direct["loss"], rel=1e-6), path.name
        assert summary["epoch"] == (None if path == bare else 299)
    with pytest.raises(CheckpointError, match="bare state_dict without EMA"):
        run_validate(tmp_path, f"checkpoint={bare}", "model=vim_test", "data=digits", f"data.root={digits_root}",
                     "use_ema=true")


def test_reg_file_evaluates_with_the_reg_model(digits_root, tmp_path):
    """Mamba-Reg / ShuffleMamba-Reg layout: registers under the official name ``cls_token``, ``pos_embed_cls``,
    neck; Mamba-Reg releases hold only 'model' (spec §5)."""
    raw = official_state_dict(num_registers=4, register_reduce=2, seed=2)
    path = tmp_path / "mambar_test.pth"
    torch.save({"model": raw}, path)  # no pickled args: safe by default
    summary = run_validate(tmp_path, f"checkpoint={path}", "model=shufflemamba_reg_test", "data=digits",
                           f"data.root={digits_root}")
    direct = direct_metrics("shufflemamba_reg_test", raw, digits_root)
    assert summary["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_a_file_for_another_model_fails_with_the_full_list(vim_file, digits_root, tmp_path, fw):
    path, _ = vim_file
    common = [f"checkpoint={path}", "data=digits", f"data.root={digits_root}", "trust_checkpoint=true"]
    with pytest.raises(CheckpointError) as err:  # Vim weights into the register model
        run_validate(tmp_path, *common, "model=shufflemamba_reg_test")
    text = str(err.value)
    assert "does not fit model shufflemamba_reg_test" in text
    assert "missing keys (3): pos_embed_cls, neck.weight, norm_neck.weight" in text
    assert "shape mismatches" in text and "cls_token: checkpoint (1, 1, 64) vs model (1, 4, 64)" in text
    assert "head.weight: checkpoint (10, 64) vs model (10, 128)" in text  # validate never drops a head
    with pytest.raises(CheckpointError) as err:  # a shallower model: the extra layers are unexpected
        run_validate(tmp_path, *common, "model=vim_test", "+model.depth=2")
    assert "unexpected keys (34): layers.2.mixer.A_log" in str(err.value)
    with pytest.raises(CheckpointError) as err:  # another label set is an error in evaluation
        run_validate(tmp_path, *common, "model=vim_test", "data.num_classes=7")
    assert "head.weight: checkpoint (10, 64) vs model (7, 64)" in str(err.value)
