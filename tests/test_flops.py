"""FLOPs (GMACs) with fvcore: analytic scan handle, no unsupported ops, spec §1.6 figures."""
import pytest
import torch

from visionmamba import create_model
from visionmamba.flops import model_complexity, selective_scan_macs

# Spec §1.6 analytic estimates (linear + conv + scan, MACs) at 224 px.
SPEC_GMACS = {"vim_tiny": 1.55, "shufflemamba_reg_tiny": 1.64}


@pytest.mark.parametrize("name", sorted(SPEC_GMACS))
def test_gmacs_match_spec(name):
    result = model_complexity(create_model(name), 224)
    assert result["unsupported"] == {}
    assert result["gmacs"] == pytest.approx(SPEC_GMACS[name], rel=0.03)
    assert result["by_operator"]["selective_scan"] > 0


def test_scan_counted_analytically():
    model = create_model("vim_test")
    result = model_complexity(model, 32)
    # 4 layers x 2 directions, L = 17 tokens, E = 128 channels, N = 16
    expected = 8 * selective_scan_macs(1, 17, 128, 16) / 1e9
    assert result["by_operator"]["selective_scan"] == pytest.approx(expected)
    assert selective_scan_macs(1, 197, 384, 16, with_d=False, with_z=False) == 9 * 197 * 384 * 16 // 2
    assert result["unsupported"] == {}


def test_complexity_leaves_model_untouched():
    model = create_model("vim_test").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_complexity(model, 32)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
