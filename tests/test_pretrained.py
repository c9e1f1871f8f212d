"""Official-format checkpoint files: safe loading, EMA choice, prefixes, adaptation and clear failures."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionmamba import create_model
from visionmamba.models._pretrained import CheckpointError, load_pretrained

ROOT = Path(__file__).resolve().parents[1]


def _official_file(tmp_path, model, name="official.pth", ema_shift=0.5):
    """The layout main*.py of Vim / ShuffleMamba / Mamba-Reg saves, with a pickled argparse.Namespace."""
    raw = model.state_dict()
    ema = {k: v + ema_shift if v.is_floating_point() else v for k, v in raw.items()}
    path = tmp_path / name
    torch.save({"model": raw, "model_ema": ema, "optimizer": {}, "lr_scheduler": {}, "epoch": 299,
                "scaler": "none", "args": argparse.Namespace(model="vim_tiny", lr=5e-4)}, path)
    return path


@pytest.mark.parametrize("name", ["vim_test", "shufflemamba_test", "shufflemamba_reg_test"])
def test_official_file_loads_only_when_trusted_and_logits_match(tmp_path, name):
    torch.manual_seed(0)
    source = create_model(name, num_classes=10).eval()
    path = _official_file(tmp_path, source)
    target = create_model(name, num_classes=10).eval()
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        load_pretrained(target, path)
    report = load_pretrained(target, path, trust_pickle=True)
    assert report.weights == "model" and not (report.dropped or report.missing or report.unexpected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    ema_model = create_model(name, num_classes=10)
    assert load_pretrained(ema_model, path, use_ema=True, trust_pickle=True).weights == "model_ema"
    torch.testing.assert_close(ema_model.pos_embed, source.pos_embed + 0.5)


def test_prefixes_bare_state_dict_and_head_drop(tmp_path):
    source = create_model("vim_test", num_classes=10)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    target = create_model("vim_test", num_classes=3)  # new label set: the head is dropped and reported
    report = load_pretrained(target, path)
    assert any(d.startswith("head.weight") for d in report.dropped)
    torch.testing.assert_close(target.layers[0].mixer.A_log, source.layers[0].mixer.A_log)


def test_pos_embed_resized_for_other_resolution(tmp_path):
    torch.manual_seed(0)
    source = create_model("vim_test")  # 32 px -> 4x4 grid, cls in the middle
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    bigger = create_model("vim_test", img_size=64)  # 8x8 grid
    report = load_pretrained(bigger, path)
    assert report.resized == ["pos_embed 4x4->8x8"]
    assert bigger.pos_embed.shape == (1, 65, 64)
    # the cls row moves to the new middle unchanged
    torch.testing.assert_close(bigger.pos_embed[:, 32], source.pos_embed[:, 8])
    with torch.no_grad():
        assert torch.isfinite(bigger.eval()(torch.randn(1, 3, 64, 64))).all()


def test_wrong_architecture_lists_differences(tmp_path):
    path = tmp_path / "reg.pth"
    torch.save({"model": create_model("shufflemamba_reg_test").state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_model("vim_test", depth=2), path)
    text = str(err.value)
    assert "does not fit model vim_test" in text and "unexpected keys" in text and "pos_embed_cls" in text
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_pretrained(create_model("vim_test"), corrupt)


def test_convert_script_writes_weights_only_file(tmp_path):
    torch.manual_seed(0)
    source = create_model("vim_test", num_classes=10).eval()
    path = _official_file(tmp_path, source)
    out = tmp_path / "clean.safetensors"
    cmd = [sys.executable, str(ROOT / "scripts/convert_checkpoint.py"), str(path), "--model", "vim_test",
           "--num-classes", "10", "--out", str(out)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and not out.exists()
    subprocess.run(cmd + ["--trust-pickle", "--use-ema"], check=True, capture_output=True)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["model_name"] == "vim_test"
    loaded = create_model("vim_test", num_classes=10)
    load_pretrained(loaded, out)  # safe path, no pickle
    torch.testing.assert_close(loaded.pos_embed, source.pos_embed + 0.5)
