"""CUDA backend vs the exact reference: selective scan, causal conv1d and the fused mamba-inner direction.

Outputs and the gradient of every input, fp32 and bf16, odd and vision-sized lengths L in {65, 197, 730}
(Vim-T at 128 px + cls ~ 65, 224 px = 197, stride-8 = 730). Skipped without CUDA and the kernels (conftest).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from visionmamba import ops

SEQLENS = (65, 197, 730)
DTYPES = (torch.float32, torch.bfloat16)
DEV = "cuda"


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _grads(out: torch.Tensor, inputs: dict, gout: torch.Tensor) -> dict:
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, [inputs[k] for k in names], gout)
    return dict(zip(names, grads))


# ----------------------------------------------------------------------------------------------- selective scan
def _scan_inputs(seqlen: int, dtype: torch.dtype, full: bool, batch: int = 2, dim: int = 64, dstate: int = 16):
    # Same distributions as mamba-ssm's test_selective_scan.
    u = torch.randn(batch, dim, seqlen, device=DEV, dtype=dtype)
    delta = 0.5 * torch.rand(batch, dim, seqlen, device=DEV, dtype=dtype)
    A = -0.5 * torch.rand(dim, dstate, device=DEV)
    B = torch.randn(batch, dstate, seqlen, device=DEV, dtype=dtype)
    C = torch.randn(batch, dstate, seqlen, device=DEV, dtype=dtype)
    D = torch.randn(dim, device=DEV) if full else None
    z = torch.randn(batch, dim, seqlen, device=DEV, dtype=dtype) if full else None
    delta_bias = 0.5 * torch.rand(dim, device=DEV) if full else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


@pytest.mark.parametrize("full", [True, False], ids=["D_z_bias_softplus", "bare"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_selective_scan(dtype, seqlen, full, check):
    torch.manual_seed(seqlen + 7 * full)
    base = _scan_inputs(seqlen, dtype, full)
    runs = {}
    for backend in ("cuda", "ref"):
        inputs = {k: (_leaf(v) if v is not None else None) for k, v in base.items()}
        out = ops.selective_scan(**inputs, delta_softplus=full, backend=backend)
        gout = torch.randn_like(out) if backend == "cuda" else runs["cuda"][2]
        runs[backend] = (out, _grads(out, inputs, gout), gout)
    (out_c, g_c, _), (out_r, g_r, _) = runs["cuda"], runs["ref"]
    assert out_c.dtype == out_r.dtype == dtype
    check(out_c, out_r, "out", dtype, seqlen)
    assert set(g_c) == set(g_r) == {k for k, v in base.items() if v is not None}
    # mamba's multipliers: du x2, ddelta x5 (it goes through softplus' derivative and a length-long sum).
    scale = {"u": 2.0, "delta": 5.0}
    for name in g_c:
        assert g_c[name].dtype == g_r[name].dtype, name
        check(g_c[name], g_r[name], f"d{name}", dtype, seqlen, scale=scale.get(name, 2.0))


# Axis along which each scan argument is indexed by channel (B and C are indexed by group instead).
_CHANNEL_AXIS = {"u": 1, "delta": 1, "z": 1, "A": 0, "D": 0, "delta_bias": 0}


@pytest.mark.parametrize("seqlen", (65, 197))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_selective_scan_grouped(dtype, seqlen, check):
    """Grouped B/C (b, g, n, l): channel c reads group c // (e / g). Must equal g independent ungrouped scans (each
    of which is checked against the reference above), outputs and every gradient."""
    torch.manual_seed(3 * seqlen)
    groups, dim = 4, 64
    per = dim // groups
    base = _scan_inputs(seqlen, dtype, full=True, dim=dim)
    base["B"] = torch.randn(2, groups, 16, seqlen, device=DEV, dtype=dtype)
    base["C"] = torch.randn(2, groups, 16, seqlen, device=DEV, dtype=dtype)
    gout = torch.randn(2, dim, seqlen, device=DEV, dtype=dtype)

    inputs = {k: _leaf(v) for k, v in base.items()}
    out_g = ops.selective_scan(**inputs, delta_softplus=True, backend="cuda")
    g_g = _grads(out_g, inputs, gout)

    outs, grads = [], []
    for g in range(groups):
        ch = slice(g * per, (g + 1) * per)
        part = {k: _leaf(v[:, g] if k in ("B", "C") else v[(slice(None),) * _CHANNEL_AXIS[k] + (ch,)])
                for k, v in base.items()}
        out = ops.selective_scan(**part, delta_softplus=True, backend="cuda")
        outs.append(out)
        grads.append(_grads(out, part, gout[:, ch]))
    # Same kernel, same per-channel arithmetic; only the order of the atomic adds into dA/dB/dC/dD may differ, which
    # can flip the last bit of a bf16 dB/dC element (rtol 1e-2 > one bf16 ulp).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    check(out_g, torch.cat(outs, 1), "out_vs_per_group", dtype, seqlen, **tol)
    for name in g_g:
        if name in ("B", "C"):
            expected = torch.stack([gr[name] for gr in grads], 1)  # (b, g, n, l)
        else:
            expected = torch.cat([gr[name] for gr in grads], _CHANNEL_AXIS[name])
        assert g_g[name].shape == base[name].shape, name
        check(g_g[name], expected, f"d{name}_vs_per_group", dtype, seqlen, **tol)


# ------------------------------------------------------------------------------------------------ causal conv1d
@pytest.mark.parametrize("variant", ["bias_silu", "nobias_linear"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_causal_conv1d(dtype, seqlen, variant, check):
    torch.manual_seed(seqlen + (variant == "bias_silu"))
    batch, dim, width = 2, 64, 4
    with_bias = variant == "bias_silu"
    activation = "silu" if with_bias else None
    # x as a channel slice of a (b, 2e, l) buffer, exactly how the mixer hands it to the kernel.
    xz = torch.randn(batch, 2 * dim, seqlen, device=DEV, dtype=dtype)
    weight = torch.randn(dim, width, device=DEV, dtype=dtype) / math.sqrt(width)
    bias = torch.randn(dim, device=DEV, dtype=dtype) if with_bias else None
    outs = {}
    for backend in ("cuda", "ref"):
        xz_l = _leaf(xz)
        inputs = dict(x=xz_l[:, :dim], weight=_leaf(weight), bias=_leaf(bias) if with_bias else None)
        out = ops.causal_conv1d(**inputs, activation=activation, backend=backend)
        gout = outs["cuda"][2] if backend == "ref" else torch.randn_like(out)
        leaves = dict(xz=xz_l, weight=inputs["weight"], bias=inputs["bias"])
        outs[backend] = (out, _grads(out, leaves, gout), gout)
    (out_c, g_c, _), (out_r, g_r, _) = outs["cuda"], outs["ref"]
    check(out_c, out_r, "out", dtype, seqlen)
    # Independent oracle for the reference itself: F.conv1d with left padding (fp32).
    oracle = F.conv1d(xz[:, :dim].float(), weight.float().unsqueeze(1), None if bias is None else bias.float(),
                      padding=width - 1, groups=dim)[..., :seqlen]
    oracle = F.silu(oracle) if activation else oracle
    check(out_c, oracle, "out_vs_F.conv1d", dtype, seqlen)
    for name in g_r:
        check(g_c[name], g_r[name], f"d{name}", dtype, seqlen, scale=2.0)
    assert g_c["xz"][:, dim:].abs().max().item() == 0.0  # the gate half gets no gradient from the conv


# ------------------------------------------------------------------------------------------------- mamba inner
def _inner_inputs(seqlen: int, batch: int = 2, d_inner: int = 128, d_state: int = 16, dt_rank: int = 8,
                  width: int = 4, act_dtype: torch.dtype = torch.float32) -> dict:
    """Parameters drawn like the mixer's init (A = -[1..N], dt bias = softplus^-1 of a log-uniform step)."""
    dt = torch.exp(torch.rand(d_inner, device=DEV) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        xz=torch.randn(batch, 2 * d_inner, seqlen, device=DEV).to(act_dtype),
        conv1d_weight=torch.randn(d_inner, 1, width, device=DEV) / math.sqrt(width),  # (E, 1, W) as nn.Conv1d
        conv1d_bias=0.1 * torch.randn(d_inner, device=DEV),
        x_proj_weight=torch.randn(dt_rank + 2 * d_state, d_inner, device=DEV) / math.sqrt(d_inner),
        delta_proj_weight=torch.randn(d_inner, dt_rank, device=DEV) / math.sqrt(dt_rank),
        A=-torch.arange(1, d_state + 1, device=DEV, dtype=torch.float32).repeat(d_inner, 1),
        D=torch.randn(d_inner, device=DEV),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )


def _run_inner(fn, base: dict, gout: torch.Tensor, autocast_dtype=None):
    inputs = {k: _leaf(v) for k, v in base.items()}
    amp = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with amp:
        out = fn(**inputs)
    # Backward outside the autocast region, as in a training loop (custom_bwd restores the forward's state).
    return out, _grads(out, inputs, gout.to(out.dtype))


def _inner_impl(name: str, cuda_kernels):
    from visionmamba.ops import cuda

    if name == "fused":
        if cuda_kernels.conv_fwd is None:
            pytest.skip("causal-conv1d without cpp_functions: no fused path here")
        fn = cuda.mamba_inner_no_out_proj_fused
    else:
        fn = cuda.mamba_inner_no_out_proj_composed

    def run(conv1d_weight, **kw):
        return fn(conv1d_weight=conv1d_weight.squeeze(1), **kw)  # what `ops` passes after its rearrange

    return run


def _ref(**kw):
    return ops.mamba_inner_no_out_proj(**kw, backend="ref")


@pytest.mark.parametrize("impl", ["fused", "composed"])
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_mamba_inner_fp32(seqlen, impl, check, cuda_kernels):
    torch.manual_seed(seqlen)
    base = _inner_inputs(seqlen)
    gout = torch.randn(2, 128, seqlen, device=DEV)
    out_c, g_c = _run_inner(_inner_impl(impl, cuda_kernels), base, gout)
    out_r, g_r = _run_inner(_ref, base, gout)
    check(out_c, out_r, "out", torch.float32, seqlen)
    assert set(g_c) == set(g_r) == set(base)
    for name in base:
        assert g_c[name].shape == base[name].shape and g_c[name].dtype == base[name].dtype, name
        check(g_c[name], g_r[name], f"d{name}", torch.float32, seqlen, scale=2.0)


@pytest.mark.parametrize("impl", ["fused", "composed"])
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_mamba_inner_bf16_autocast(seqlen, impl, check, cuda_kernels):
    """Under bf16 autocast (activations bf16, parameters fp32) as in training.

    CUDA and reference are compared with each other at mamba's bf16 tolerance, and both against an fp32 oracle (the
    reference on the same bf16-rounded inputs without autocast): the CUDA path must be about as accurate as the
    reference at the same precision.
    """
    torch.manual_seed(1000 + seqlen)
    base = _inner_inputs(seqlen, act_dtype=torch.bfloat16)
    gout = torch.randn(2, 128, seqlen, device=DEV)
    out_c, g_c = _run_inner(_inner_impl(impl, cuda_kernels), base, gout, torch.bfloat16)
    out_r, g_r = _run_inner(_ref, base, gout, torch.bfloat16)
    oracle_base = {**base, "xz": base["xz"].float()}
    out_o, g_o = _run_inner(_ref, oracle_base, gout)
    assert out_c.dtype == out_r.dtype == torch.bfloat16
    check(out_c, out_r, "out", torch.bfloat16, seqlen)
    check.no_worse_than_reference(out_c, out_r, out_o, "out", torch.bfloat16, seqlen)
    for name in base:
        # autograd hands every gradient back in its input's dtype (fp32 parameters, bf16 xz)
        assert g_c[name].dtype == base[name].dtype, name
        check(g_c[name], g_r[name], f"d{name}", torch.bfloat16, seqlen, scale=2.0)
        check.no_worse_than_reference(g_c[name], g_r[name], g_o[name], f"d{name}", torch.bfloat16, seqlen)


def test_dispatch_uses_fused_path(cuda_kernels):
    """`ops` routes backend=cuda to the fused Function when causal-conv1d has the cpp_functions API."""
    from visionmamba.ops import cuda

    assert ops.resolve_backend("cuda", "cuda") == "cuda"
    expected = "fused" if cuda_kernels.conv_fwd is not None else "composed"
    assert cuda.inner_impl() == expected
    base = _inner_inputs(65)
    out = ops.mamba_inner_no_out_proj(**{k: _leaf(v) for k, v in base.items()}, backend="cuda")
    if expected == "fused":
        assert out.grad_fn.name().startswith("MambaInnerNoOutProjFn")
    print(f"mamba_inner_no_out_proj implementation: {expected}; kernels {cuda_kernels.versions}")


def test_float64_is_refused_with_a_clear_error(cuda_kernels):
    base = _scan_inputs(65, torch.float64, full=False)
    with pytest.raises(TypeError, match="kernel_backend=ref"):
        ops.selective_scan(**base, backend="cuda")
