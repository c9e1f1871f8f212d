"""Reference ops against independent formulations, gradcheck, and the dispatch rules."""
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from visionmamba import ops
from visionmamba.ops.ref import _scan_chunked, _scan_steps, causal_conv1d_ref, selective_scan_naive


def _scan_inputs(batch=2, dim=6, dstate=4, length=37, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=rnd(batch, dim, length), delta=rnd(batch, dim, length) * 0.5,
                A=-torch.rand(dim, dstate, generator=g, dtype=dtype) * 2 - 0.1, B=rnd(batch, dstate, length),
                C=rnd(batch, dstate, length), D=rnd(dim), z=rnd(batch, dim, length), delta_bias=rnd(dim) * 0.1)


def _closed_form(u, delta, A, B, C, D, z, delta_bias):
    """y_t = sum_{s<=t} C_t·(prod_{s<r<=t} exp(Δ_r A)) Δ_s B_s u_s + D u_t, gated: an independent O(L²) form."""
    dt = F.softplus(delta + delta_bias[None, :, None])
    logdec = torch.cumsum(dt.unsqueeze(-1) * A[None, :, None, :], dim=2)  # (b, e, L, n)
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        decay = torch.exp(logdec[:, :, t : t + 1] - logdec[:, :, : t + 1])  # (b, e, t+1, n)
        contrib = decay * (dt[:, :, : t + 1] * u[:, :, : t + 1]).unsqueeze(-1) * B[:, None, :, : t + 1].transpose(-1, -2)
        y[:, :, t] = (contrib.sum(2) * C[:, None, :, t]).sum(-1)
    return (y + D[None, :, None] * u) * F.silu(z)


@pytest.mark.parametrize("length", [1, 5, 33, 70])
def test_scan_formulations_agree_with_closed_form(length):
    x = _scan_inputs(length=length)
    expected = _closed_form(**x)
    for fn in (selective_scan_naive, _scan_steps, _scan_chunked, ops.selective_scan_ref):
        out = fn(**x, delta_softplus=True)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_scan_without_optional_inputs_and_dtypes():
    x = _scan_inputs(length=20, dtype=torch.float32)
    base = selective_scan_naive(x["u"], x["delta"], x["A"], x["B"], x["C"])
    torch.testing.assert_close(ops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="ref"), base)
    # bf16 inputs: state in fp32, output in bf16 and close to the fp32 result of the same (rounded) inputs
    xb = {k: v.bfloat16() for k, v in x.items()}
    out = ops.selective_scan(**xb, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_naive(**{k: v.float() for k, v in xb.items()}, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_scan_gradcheck():
    x = _scan_inputs(batch=1, dim=3, dstate=3, length=9)
    inputs = [v.clone().requires_grad_() for v in x.values()]
    assert torch.autograd.gradcheck(lambda *a: ops.selective_scan_ref(*a, delta_softplus=True), inputs)


def test_scan_backward_matches_naive_autograd():
    x = _scan_inputs(length=40)
    a = {k: v.clone().requires_grad_() for k, v in x.items()}
    b = {k: v.clone().requires_grad_() for k, v in x.items()}
    g = torch.randn(2, 6, 40, dtype=torch.float64)
    (ops.selective_scan_ref(**a, delta_softplus=True) * g).sum().backward()
    (selective_scan_naive(**b, delta_softplus=True) * g).sum().backward()
    for k in x:
        torch.testing.assert_close(a[k].grad, b[k].grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_left_padded_conv(activation):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 17, generator=g)
    w = torch.randn(5, 4, generator=g)
    b = torch.randn(5, generator=g)
    expected = F.conv1d(F.pad(x, (3, 0)), w.unsqueeze(1), b, groups=5)
    if activation:
        expected = F.silu(expected)
    torch.testing.assert_close(causal_conv1d_ref(x, w, b, activation), expected)
    torch.testing.assert_close(ops.causal_conv1d(x, w, b, activation, backend="auto"), expected)
    # causality: changing the future never changes the past
    x2 = x.clone()
    x2[..., 10:] += 1.0
    torch.testing.assert_close(causal_conv1d_ref(x2, w, b)[..., :10], causal_conv1d_ref(x, w, b)[..., :10])


def test_resolve_backend_rules(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_announced", set())  # the path is logged once per process; reset for the test
    with caplog.at_level(logging.INFO, logger="visionmamba.ops"):
        assert ops.resolve_backend("auto", "cpu") == "ref"
        assert ops.resolve_backend("ref", "cpu") == "ref"
    assert any("ref path" in r.getMessage() for r in caplog.records), "the active path must be logged"
    with pytest.raises(ops.KernelUnavailableError, match="CUDA device"):
        ops.resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.resolve_backend("triton-magic", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-kernels error on a CPU-only machine")
def test_cuda_request_without_kernels_names_install_command(monkeypatch):
    monkeypatch.setattr(ops, "_cuda_status", (False, "ImportError: No module named 'mamba_ssm'"))
    with pytest.raises(ops.KernelUnavailableError, match="requirements-cuda.txt"):
        ops.resolve_backend("cuda", torch.device("cuda"))


def test_import_does_not_load_cuda_packages():
    code = ("import sys, visionmamba, visionmamba.models, visionmamba.ops; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('mamba_ssm','causal_conv1d')]; "
            "assert not bad, bad; vm_triton=[m for m in sys.modules if m.startswith('visionmamba') and 'triton' in m]; "
            "assert not vm_triton, vm_triton")
    subprocess.run([sys.executable, "-c", code], check=True)
