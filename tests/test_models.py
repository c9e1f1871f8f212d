"""Model zoo: official parameter counts, state_dict keys, init quirks, register layout, forward/backward."""
import math

import pytest
import torch
import torch.nn.functional as F

from visionmamba import create_model, list_models
from visionmamba.layers import register_layout
from visionmamba.models import UnknownModelError

OFFICIAL_PARAMS = {
    "vim_tiny": 7_148_008, "vim_small": 25_796_584, "vim_base": 97_598_440,
    "vim_tiny_stride8": 7_250_344, "vim_small_stride8": 26_001_256,
    "shufflemamba_tiny": 7_148_008, "shufflemamba_small": 25_796_584, "shufflemamba_middle": 74_236_456,
    "shufflemamba_base": 97_598_440, "shufflemamba_large": 340_034_536, "shufflemamba_large_40": 283_698_152,
    "shufflemamba_reg_tiny": 9_264_232, "shufflemamba_reg_small": 27_801_064,
    "shufflemamba_reg_base": 99_301_096, "shufflemamba_reg_large": 341_222_376,
    "mambareg_tiny": 9_264_232, "mambareg_small": 27_801_064, "mambareg_base": 99_301_096,
    "mambareg_large": 341_222_376,
}
TEST_MODELS = ["vim_test", "shufflemamba_test", "shufflemamba_reg_test"]


def _official_vim_tiny_keys():
    """Spec §3.3: the 415 tensors of the official Vim-T state_dict, in order."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"]
    per_layer = ["mixer.A_log", "mixer.D", "mixer.A_b_log", "mixer.D_b", "mixer.in_proj.weight",
                 "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.x_proj.weight", "mixer.dt_proj.weight",
                 "mixer.dt_proj.bias", "mixer.conv1d_b.weight", "mixer.conv1d_b.bias", "mixer.x_proj_b.weight",
                 "mixer.dt_proj_b.weight", "mixer.dt_proj_b.bias", "mixer.out_proj.weight", "norm.weight"]
    for i in range(24):
        keys += [f"layers.{i}.{k}" for k in per_layer]
    return keys + ["norm_f.weight"]


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_vim_tiny_state_dict_is_official():
    with torch.device("meta"):
        sd = create_model("vim_tiny").state_dict()
    assert list(sd) == _official_vim_tiny_keys()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["pos_embed"] == (1, 197, 192)
    assert shapes["layers.0.mixer.x_proj.weight"] == (44, 384)
    assert shapes["layers.5.mixer.dt_proj_b.weight"] == (384, 12)
    assert shapes["layers.23.mixer.conv1d_b.weight"] == (384, 1, 4)
    assert shapes["layers.0.mixer.A_b_log"] == (384, 16)


def test_shufflemamba_shares_vim_keys_and_reg_keys():
    with torch.device("meta"):
        vim = create_model("vim_small").state_dict()
        shuffle = create_model("shufflemamba_small").state_dict()
        reg = create_model("shufflemamba_reg_small").state_dict()
    assert {k: v.shape for k, v in vim.items()} == {k: v.shape for k, v in shuffle.items()}
    assert reg["cls_token"].shape == (1, 12, 384) and reg["pos_embed_cls"].shape == (1, 12, 384)
    assert reg["pos_embed"].shape == (1, 196, 384)
    assert reg["neck.weight"].shape == (192, 384) and reg["norm_neck.weight"].shape == (2304,)
    assert reg["head.weight"].shape == (1000, 2304)
    with torch.device("meta"):
        middle = create_model("shufflemamba_middle").state_dict()
    assert "layers.0.norm.bias" in middle and "norm_f.bias" in middle  # LayerNorm model


def test_init_quirks():
    torch.manual_seed(0)
    vim = create_model("vim_tiny", depth=2)
    mixer = vim.layers[0].mixer
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6, "forward dt bias: softplus^-1 of U_log[1e-3, 0.1]"
    assert torch.all(mixer.dt_proj_b.bias == 0), "backward dt bias zeroed by the model init (official quirk)"
    assert mixer.dt_proj.weight.abs().max() <= 12 ** -0.5 + 1e-6
    bound = 1 / math.sqrt(384) / math.sqrt(2)  # kaiming_uniform(a=√5) bound / √depth
    assert mixer.out_proj.weight.abs().max() <= bound + 1e-6
    assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand(384, 16))
    assert torch.all(mixer.D == 1) and vim.cls_token.abs().sum() > 0
    shuffle = create_model("shufflemamba_tiny", depth=2)
    m = shuffle.layers[0].mixer
    assert torch.all(shuffle.cls_token == 0), "models_shuffle keeps the cls token at zero"
    assert torch.all(m.dt_proj.bias == 0) and torch.all(m.dt_proj_b.bias == 0)
    assert m.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)  # trunc_normal(0.02) everywhere
    assert m.dt_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("grid,n_reg,positions,seqlen", [
    (14, 12, list(range(15, 192, 16)), 208), (8, 12, list(range(4, 60, 5)), 76),
    (14, 16, list(range(11, 192, 12)), 212), (8, 16, list(range(3, 64, 4)), 80)])
def test_register_layout_matches_official(grid, n_reg, positions, seqlen):
    token_idx, pos = register_layout(grid * grid, n_reg)
    assert pos.tolist() == positions and len(token_idx) == seqlen
    # the sequence holds every patch once and register r exactly at its position
    assert sorted(token_idx.tolist()) == list(range(seqlen))
    assert [token_idx[p].item() for p in positions] == [grid * grid + r for r in range(n_reg)]


def test_middle_cls_token_position():
    model = create_model("vim_test").eval()
    assert model.readout_positions(model.grid) == 8  # 16 patches -> cls inserted at 8
    with torch.device("meta"):
        assert create_model("vim_tiny").readout_positions((14, 14)) == 98


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, drop_path_rate=0.1)
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name", TEST_MODELS)
def test_other_input_sizes(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 5)  # pos-embed resize + register re-layout
        # built size: the resize is the identity
        x = torch.randn(1, 3, 32, 32)
        tokens, grid = model.assemble_tokens(x)
        assert grid == model.grid


def test_vim_tiny_forward_224():
    model = create_model("vim_tiny", depth=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_registry_errors_and_overrides():
    assert set(OFFICIAL_PARAMS) | set(TEST_MODELS) <= set(list_models())
    with pytest.raises(UnknownModelError, match="vim_tiny"):
        create_model("vim_tinyy")
    model = create_model("vim_test", num_classes=3, drop_path_rate=None, shuffle_rate=None)
    assert model.head.out_features == 3 and model.shuffle.rate == 0.0
    assert create_model("shufflemamba_test").shuffle.rate == 0.5
    assert create_model("mambareg_tiny", depth=2).shuffle.rate == 0.0


@pytest.mark.parametrize("hw", [(224, 224), (230, 237), (32, 48)])
def test_patch_embed_matrix_product_equals_the_conv(hw):
    """Non-overlapping patches go through one matrix product instead of the Conv2d: same tokens and grid (trailing
    pixels that fill no patch dropped, as the conv does), same parameters; overlapping patches keep the conv; an image
    smaller than a patch is a clear error."""
    from visionmamba.layers import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(224, 16, 16, 3, 192).double()
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    tokens, grid = embed(x)
    ref = embed.proj(x)  # (B, D, h, w)
    assert grid == (ref.shape[2], ref.shape[3])
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    overlapping = PatchEmbed(224, 16, 8, 3, 192)
    tokens8, grid8 = overlapping(x.float())
    assert grid8 == ((hw[0] - 16) // 8 + 1, (hw[1] - 16) // 8 + 1) and tokens8.shape[1] == grid8[0] * grid8[1]
    with pytest.raises(ValueError, match="smaller than one patch"):
        embed(torch.randn(1, 3, 8, 64, dtype=torch.float64))
