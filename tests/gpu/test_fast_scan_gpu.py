"""`fast` bidirectional scan (Triton) on the GPU vs the exact reference: output and all 15 gradients, fp32 and bf16,
L in {65, 197, 730}, contiguous and strided (B, L, 2E)-split inputs; and the custom op under torch.compile.

Needs CUDA and triton only (not mamba-ssm): this module overrides the suite's autouse `_require_cuda` fixture.

``python tests/gpu/test_fast_scan_gpu.py --bench [--out DIR]`` times the kernels against mamba-ssm's
`selective_scan_fn` called twice (forward and flipped backward direction), at B 128, L 197, E 384 / 768, bf16.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from visionmamba.ops import fast  # noqa: E402

DEV = "cuda"
SEQLENS = (65, 197, 730)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(autouse=True)
def _require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference uses matmuls (einsum)
    torch.backends.cudnn.allow_tf32 = False
    yield


def make_inputs(b, L, E, N=16, dtype=torch.float32, seed=0, strided=False, device=None, dt_cols=16):
    """`bimamba_scan` inputs; with strided, x/dt are channel views of one (B, L, 2E) tensor, z the second half of
    another, and B/C views of a (B, L, dt_cols + 2N) projection (what the mixer's linear layers produce: it pads
    the dt rank to a multiple of 8, so 16 for Vim-T; 12 gives B/C views that are not 16-byte aligned)."""
    device = device or DEV
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    seq = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731  (cast whole bases, then take views)
    par = lambda t: t.to(device)  # noqa: E731  fp32 parameters
    ins = []
    for _ in range(2):
        if strided:
            xdt = seq(torch.cat([r(b, L, E), r(b, L, E) * 0.5 - 1.0], -1))
            x, dt = xdt[..., :E], xdt[..., E:]
            dbl = seq(r(b, L, dt_cols + 2 * N))
            Bm, Cm = dbl[..., dt_cols:dt_cols + N], dbl[..., dt_cols + N:]
        else:
            x, dt, Bm, Cm = seq(r(b, L, E)), seq(r(b, L, E) * 0.5 - 1.0), seq(r(b, L, N)), seq(r(b, L, N))
        A = -torch.exp(r(E, N) * 0.5 + 0.5)  # spread like trained S4D-real A = -exp(A_log)
        ins += [x, dt, par(A), Bm, Cm, par(r(E)), par(r(E) * 0.5)]
    ins.append(seq(r(b, L, 2 * E))[..., E:] if strided else seq(r(b, L, E)))
    return ins


def run_fast(ins, g):
    leaves = [t.detach().requires_grad_(True) for t in ins]  # detach keeps the strides
    y = fast.bimamba_scan(*leaves)
    grads = torch.autograd.grad(y, leaves, g)
    return y, grads


def run_reference(ins, g):
    leaves = [t.detach().float().requires_grad_(True) for t in ins]
    y = fast.bimamba_scan_reference(*leaves)
    grads = torch.autograd.grad(y, leaves, g.float())
    return y, grads


@pytest.fixture(params=["gluon", "gluon_unsplit", "gluon_lanes2", "gluon_dirs", "gluon_dirs_whole", "triton"])
def kernels(request, monkeypatch):
    """Both kernel sets: the Gluon forward and backward (default on CUDA) and the Triton ones (the CPU interpreter's,
    and the fallback). These small batches run the Gluon forward with each state over 4 lanes (as at high resolution)
    and the Gluon backward with the directions in separate programs. gluon_unsplit: both as at batch 128, the forward
    with whole states per thread and the backward with both directions in each program, which takes the dB / dC
    channel sums in groups of red_k chunks. gluon_lanes2: the forward over 2 lanes with 2 rows per lane and chunk.
    gluon_dirs / gluon_dirs_whole: the forward running both directions at once in two warp groups, with states over
    2 lanes (as at 1248 px) / whole states per thread."""
    if request.param == "gluon_unsplit":
        monkeypatch.setitem(fast.CONFIG, "fwd_gluon", [dict(max_e=1 << 30, T=4, E_T=1, num_warps=1)])
    if request.param == "gluon_lanes2":
        monkeypatch.setitem(fast.CONFIG, "fwd_gluon", [dict(max_e=1 << 30, T=4, E_T=1, num_warps=1, N_L=2)])
    if request.param == "gluon_dirs":
        monkeypatch.setitem(fast.CONFIG, "fwd_gluon", [dict(max_e=1 << 30, T=8, E_T=1, num_warps=4, N_L=2, dirs=True)])
    if request.param == "gluon_dirs_whole":
        monkeypatch.setitem(fast.CONFIG, "fwd_gluon", [dict(max_e=1 << 30, T=4, E_T=1, num_warps=2, dirs=True)])
    if request.param == "triton":
        monkeypatch.setitem(fast.CONFIG, "bwd_gluon", [])
        monkeypatch.setitem(fast.CONFIG, "fwd_gluon", [])
    if request.param == "gluon_unsplit":
        monkeypatch.setitem(fast.CONFIG, "bwd_gluon", [dict(c, split=False) for c in fast.CONFIG["bwd_gluon"]])
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_fast_scan_matches_reference(seqlen, dtype, check, kernels):
    ins = make_inputs(2, seqlen, 96, dtype=dtype, seed=seqlen)
    g = torch.randn(2, seqlen, 96, device=DEV).to(dtype)
    y, grads = run_fast(ins, g)
    y_ref, grads_ref = run_reference(ins, g)
    assert y.dtype == dtype
    # fp32 state in both; fp32 inputs: ~1e-6 expected, the tolerances are mamba-ssm's test tolerances
    check(y, y_ref, "y", dtype, seqlen)
    for name, a, r in zip(fast._INPUT_NAMES, grads, grads_ref):
        assert a.dtype == ins[fast._INPUT_NAMES.index(name)].dtype
        check(a, r, "d" + name, dtype, seqlen)


@pytest.mark.parametrize("dt_cols", [12, 16])
def test_fast_scan_strided_inputs_and_partial_channel_block(check, dt_cols):
    """Channel views of wider tensors (no copies; B/C 16-byte aligned or not) and E not a multiple of the channel
    block."""
    ins = make_inputs(3, 197, 200, dtype=torch.float32, seed=7, strided=True, dt_cols=dt_cols)
    assert not ins[0].is_contiguous() and not ins[3].is_contiguous()
    g = torch.randn(3, 197, 200, device=DEV)
    y, grads = run_fast(ins, g)
    y_ref, grads_ref = run_reference(ins, g)
    check(y, y_ref, "y", torch.float32, 197)
    for name, a, r in zip(fast._INPUT_NAMES, grads, grads_ref):
        check(a, r, "d" + name, torch.float32, 197)


def test_fast_scan_equals_official_flipped_backward_branch(check):
    """scan_rev on the unflipped axis == flip(scan(flip(.))) of the official backward branch (mamba-ssm semantics)."""
    from visionmamba.ops.ref import selective_scan_ref

    ins = make_inputs(2, 65, 64, dtype=torch.float32, seed=3)
    x_f, dt_f, A_f, B_f, C_f, D_f, bf, x_b, dt_b, A_b, B_b, C_b, D_b, bb, z = ins
    tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
    fl = lambda t: t.flip(1)  # noqa: E731
    y_f = selective_scan_ref(tr(x_f), tr(dt_f), A_f, tr(B_f), tr(C_f), D_f, tr(z), bf, True)
    y_b = selective_scan_ref(tr(fl(x_b)), tr(fl(dt_b)), A_b, tr(fl(B_b)), tr(fl(C_b)), D_b, tr(fl(z)), bb, True)
    official = ((y_f + y_b.flip(-1)) / 2).transpose(1, 2)
    check(fast.bimamba_scan(*ins), official, "y_vs_official", torch.float32, 65)


def test_fast_scan_torch_compile_fullgraph(check):
    ins = make_inputs(2, 65, 64, dtype=torch.bfloat16, seed=11)
    lin = torch.nn.Linear(64, 64, device=DEV, dtype=torch.bfloat16)

    def f(*a):
        return lin(fast.bimamba_scan(*a)).float().square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    leaves = [t.detach().requires_grad_(True) for t in ins]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    leaves2 = [t.detach().requires_grad_(True) for t in ins]
    out2 = f(*leaves2)
    grads2 = torch.autograd.grad(out2, leaves2)
    check(out, out2, "loss_compiled_vs_eager", torch.bfloat16, 65)
    for name, a, r in zip(fast._INPUT_NAMES, grads, grads2):
        check(a, r, "d" + name + "_compiled", torch.bfloat16, 65)


CONV_CASES = [(L, 384, 4, "gluon") for L in SEQLENS] + [(197, 384, 4, "triton"), (197, 160, 3, "gluon"),
                                                         (730, 160, 2, "triton"), (6085, 64, 4, "gluon")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("seqlen,E,W,kernel", CONV_CASES, ids=lambda v: str(v))
def test_fast_conv_matches_reference(seqlen, E, W, kernel, dtype, monkeypatch):
    """`bimamba_conv` vs the F.conv1d reference in fp32: both outputs, dx, both weights and biases; the backward as
    the one-launch Gluon kernel (rows split over programs, partial channel blocks, narrower kernels) and as the
    Triton pair."""
    if kernel == "triton":
        monkeypatch.setitem(fast.CONFIG, "conv_bwd_gluon", [])
    g = torch.Generator(device="cpu").manual_seed(seqlen)
    xz = torch.randn(4, seqlen, 2 * E, generator=g).to(DEV, dtype)
    ins = [xz[..., :E], *(t.to(DEV) for t in (torch.randn(E, W, generator=g) * 0.5, torch.randn(E, generator=g),
                                                torch.randn(E, W, generator=g) * 0.5, torch.randn(E, generator=g)))]
    gf, gb = (torch.randn(4, seqlen, E, generator=g).to(DEV, dtype) for _ in range(2))
    leaves = [t.detach().requires_grad_(True) for t in ins]
    outs = fast.bimamba_conv(*leaves)
    grads = torch.autograd.grad(outs, leaves, (gf, gb))
    ref_leaves = [t.detach().float().requires_grad_(True) for t in ins]
    ref_outs = fast.bimamba_conv_reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_outs, ref_leaves, (gf.float(), gb.float()))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of each output / input gradient
    for name, a, r in zip(("x_f", "x_b", "dx", "dw_f", "db_f", "dw_b", "db_b"), (*outs, *grads),
                          (*ref_outs, *ref_grads)):
        err = ((a.float() - r).abs().max() / r.abs().max()).item()
        assert err < tol, (name, err)


@pytest.mark.parametrize("b,L,E", [(2, 197, 96), (3, 6085, 64), (64, 197, 384)])
def test_fast_scan_into_x_matches_scan(b, L, E, kernels):
    """The inference variant writes y over x_f (in place with the Gluon forward, whole states or lanes, and with the
    directions at once, which keeps the reverse direction's y in x_b until they meet; a copy otherwise): the same
    values as `bimamba_scan`, bit for bit."""
    ins = make_inputs(b, L, E, dtype=torch.bfloat16, seed=L)
    expected = fast.bimamba_scan(*ins)
    x_f = ins[0].clone()
    out = fast.bimamba_scan_into_x(x_f, *ins[1:7], ins[7].clone(), *ins[8:])
    assert out.data_ptr() == x_f.data_ptr()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("b,L,E", [(2, 197, 96), (64, 197, 384)])
def test_fast_inner_matches_unfused_composition(b, L, E, kernels):
    """`bimamba_inner` (one autograd node: the scan and conv backward kernels write dz / dx into the halves of d_xz,
    and the x_proj dgrad GEMM adds the scan's dx) against the same ops composed under autograd, fp32: output and all
    15 gradients. Small batches run the backward with split directions (dz rows 2E apart in both dz buffers); B 64
    runs both directions in each program."""
    import torch.nn.functional as F

    N, R, W = 16, 16, 4
    g = torch.Generator(device="cpu").manual_seed(L + b)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEV)  # noqa: E731
    ins = [r(b, L, 2 * E), r(E, W, scale=0.5), r(E, scale=0.5), r(E, W, scale=0.5), r(E, scale=0.5)]
    for _ in range(2):
        ins += [r(R + 2 * N, E, scale=E ** -0.5), r(E, R, scale=R ** -0.5), -torch.exp(r(E, N, scale=0.5) + 0.3),
                r(E), r(E, scale=0.3)]

    def unfused(xz, cw_f, cb_f, cw_b, cb_b, xw_f, dw_f, A_f, D_f, bias_f, xw_b, dw_b, A_b, D_b, bias_b):
        x_f, x_b = fast.bimamba_conv(xz[..., :E], cw_f, cb_f, cw_b, cb_b)
        dbl_f, dbl_b = F.linear(x_f, xw_f), F.linear(x_b, xw_b)
        return fast.bimamba_scan(
            x_f, F.linear(dbl_f[..., :R], dw_f), A_f, dbl_f[..., R:R + N], dbl_f[..., R + N:], D_f, bias_f,
            x_b, F.linear(dbl_b[..., :R], dw_b), A_b, dbl_b[..., R:R + N], dbl_b[..., R + N:], D_b, bias_b,
            xz[..., E:])

    gy = r(b, L, E)
    leaves = [t.clone().requires_grad_(True) for t in ins]
    y = fast.bimamba_inner(*leaves)
    grads = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.clone().requires_grad_(True) for t in ins]
    y_ref = unfused(*ref_leaves)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, gy)
    # the same kernels and matmuls in the forward, except dt_proj (one Triton launch for both directions instead of
    # two cuBLAS products: another summation order)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for i, (a, ref) in enumerate(zip(grads, grads_ref)):
        err = ((a - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (i, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R,RW", [(12, 12), (16, 16), (24, 24), (48, 48), (16, 12)])
def test_fast_dt_proj_kernels_match_matmuls(R, RW, dtype):
    """`dt_proj` (both directions in one launch) and its backward (d dt_low into a column slice, dW in fp32) against
    the cuBLAS products, dt_low a column slice of x_proj's output and W (fp32 parameter) stored transposed; with RW <
    R (Vim-T in the mixer), dt_low's last R - RW columns are x_proj's zero padding and W has RW columns."""
    M, E, N = 128 * 197 + 3, 384, 16
    g = torch.Generator(device="cpu").manual_seed(R)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    dbl = [r(M, R + 2 * N).to(dtype) for _ in range(2)]
    for d in dbl:
        d[:, RW:R] = 0
    a = [d[:, :R] for d in dbl]
    w = [r(RW, E).t() * RW ** -0.5 for _ in range(2)]
    gy = [r(M, E).to(dtype) for _ in range(2)]
    out = fast.dt_proj(a[0], w[0], a[1], w[1])
    da_f, da_b, dw_f, dw_b = fast._dt_proj_backward(gy[0], a[0], w[0], gy[1], a[1], w[1])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for d, (da, dw) in enumerate(((da_f, dw_f), (da_b, dw_b))):
        assert out[d].dtype == da.dtype == dtype and dw.dtype == torch.float32 and dw.shape == (E, RW)
        assert da.shape == (M, R) and not da[:, RW:].any()
        ref = a[d][:, :RW].float() @ w[d].to(dtype).float().t()
        assert ((out[d].float() - ref).abs().max() / ref.abs().max()).item() < tol
        ref = gy[d].float() @ w[d].to(dtype).float()
        assert ((da[:, :RW].float() - ref).abs().max() / ref.abs().max()).item() < tol
        ref = gy[d].float().t() @ a[d][:, :RW].float()
        assert ((dw - ref).abs().max() / ref.abs().max()).item() < 1e-5  # fp32 sums of the same products


def test_fast_scan_poisoned_outputs_fully_written():
    """Every output element is written (NaN/inf-poisoned output buffers) and a rerun gives the same output."""
    ins = make_inputs(2, 197, 160, dtype=torch.bfloat16, seed=5)
    y1 = fast.fwd_triton(*ins, out=torch.full((2, 197, 160), float("nan"), device=DEV, dtype=torch.bfloat16))
    y2 = fast.fwd_triton(*ins, out=torch.full((2, 197, 160), float("inf"), device=DEV, dtype=torch.bfloat16))
    assert torch.isfinite(y1.float()).all()
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    grads = fast.bwd_triton(g, *ins)
    assert all(torch.isfinite(t.float()).all() for t in grads)


# ------------------------------------------------------------------------------------------------------------
# micro-benchmark
# ------------------------------------------------------------------------------------------------------------

def _bench(fn, reps=30):
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def bench(out_dir=None, configs=None, shapes=((128, 197, 384), (128, 197, 768)), dtype=torch.bfloat16):
    from visionmamba.ops import cuda as vcuda

    lines = []
    have_mamba = True
    try:
        vcuda.load_kernels()
    except ImportError as exc:
        have_mamba = False
        lines.append(f"mamba-ssm unavailable: {exc}")
    dev_name = torch.cuda.get_device_name(0)
    import triton

    lines.append(f"device {dev_name}; torch {torch.__version__}; triton {triton.__version__}; dtype {dtype}")
    results = []
    default = {k: [dict(c) for c in v] for k, v in fast.CONFIG.items()}
    for (b, L, E) in shapes:
        ins = make_inputs(b, L, E, dtype=dtype, seed=1)
        g = torch.randn(b, L, E, device=DEV).to(dtype)
        row = dict(B=b, L=L, E=E)
        # ---- mamba-ssm: two selective_scan_fn calls (z-gated), the stock layout work around them
        if have_mamba:
            x_f, dt_f, A_f, B_f, C_f, D_f, bf, x_b, dt_b, A_b, B_b, C_b, D_b, bb, z = ins
            tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
            pre = [tr(x_f), tr(dt_f), tr(B_f), tr(C_f), tr(x_b.flip(1)), tr(dt_b.flip(1)), tr(B_b.flip(1)),
                   tr(C_b.flip(1)), tr(z), tr(z.flip(1))]

            def mamba_kernels(p=pre):
                y1 = vcuda.selective_scan(p[0], p[1], A_f, p[2], p[3], D_f, p[8], bf, True)
                y2 = vcuda.selective_scan(p[4], p[5], A_b, p[6], p[7], D_b, p[9], bb, True)
                return y1, y2

            def mamba_with_layout():
                p = [tr(x_f), tr(dt_f), tr(B_f), tr(C_f), tr(x_b.flip(1)), tr(dt_b.flip(1)), tr(B_b.flip(1)),
                     tr(C_b.flip(1)), tr(z), tr(z.flip(1))]
                y1, y2 = mamba_kernels(p)
                return ((y1 + y2.flip(-1)) * 0.5).transpose(1, 2).contiguous()

            with torch.no_grad():
                row["mamba_fwd_kernels_ms"] = _bench(lambda: mamba_kernels())
                row["mamba_fwd_layout_ms"] = _bench(lambda: mamba_with_layout())
            leaves_m = [t.detach().requires_grad_(True) for t in pre]
            gT = tr(g)

            def mamba_fb():
                y1, y2 = mamba_kernels(leaves_m)
                torch.autograd.grad((y1, y2), leaves_m, (gT, gT.flip(-1)))

            row["mamba_fwdbwd_kernels_ms"] = _bench(mamba_fb)
            leaves_l = [t.detach().requires_grad_(True) for t in ins]

            def mamba_fb_layout():
                x_f, dt_f, A_f, B_f, C_f, D_f, bf, x_b, dt_b, A_b, B_b, C_b, D_b, bb, z = leaves_l
                p = [tr(x_f), tr(dt_f), tr(B_f), tr(C_f), tr(x_b.flip(1)), tr(dt_b.flip(1)), tr(B_b.flip(1)),
                     tr(C_b.flip(1)), tr(z), tr(z.flip(1))]
                y1 = vcuda.selective_scan(p[0], p[1], A_f, p[2], p[3], D_f, p[8], bf, True)
                y2 = vcuda.selective_scan(p[4], p[5], A_b, p[6], p[7], D_b, p[9], bb, True)
                y = ((y1 + y2.flip(-1)) * 0.5).transpose(1, 2)
                torch.autograd.grad(y, leaves_l, g)

            row["mamba_fwdbwd_layout_ms"] = _bench(mamba_fb_layout)
        # ---- fast: default config through the op, then a config sweep on the raw launches
        leaves = [t.detach().requires_grad_(True) for t in ins]
        with torch.no_grad():
            row["fast_fwd_ms"] = _bench(lambda: fast.bimamba_scan(*ins))

        def fast_fb():
            torch.autograd.grad(fast.bimamba_scan(*leaves), leaves, g)

        row["fast_fwdbwd_ms"] = _bench(fast_fb)
        row["fast_bwd_launch_ms"] = _bench(lambda: fast.bwd_triton(g, *ins))
        sweep = {}
        y_def = fast.fwd_triton(*ins).float()
        g_def = [t.float() for t in fast.bwd_triton(g, *ins)]

        def rel(a, r):
            return ((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()

        for kind, cfg in (configs or []):
            if kind == "conv_bwd_gluon":  # swept with the convs below
                continue
            fast.CONFIG[kind] = [dict(cfg, max_e=1 << 30)]
            if kind in ("fwd", "bwd"):  # a Triton-kernel config: switch the Gluon kernel of that direction off
                fast.CONFIG[kind + "_gluon"] = []
            is_fwd = kind.startswith("fwd")
            try:
                fn = (lambda: fast.fwd_triton(*ins)) if is_fwd else (lambda: fast.bwd_triton(g, *ins))
                t = _bench(fn)
                # every swept config is checked against the default one (itself checked by the tests)
                err = (rel(fast.fwd_triton(*ins), y_def) if is_fwd
                       else max(rel(a, r) for a, r in zip(fast.bwd_triton(g, *ins), g_def)))
                t = f"{t:.3f} ms (max rel diff to default {err:.1e})"
            except Exception as exc:  # a config that does not compile (registers, shared memory)
                t = f"{type(exc).__name__}: {str(exc)[:80]}"
            extra = (f"prefetch={cfg.get('prefetch')}" if kind == "fwd" else "" if kind == "fwd_gluon"
                     else f"seg={cfg.get('seg')} atomic={cfg.get('atomic', 'auto')} split={cfg.get('split', False)}")
            extra += f" maxnreg={cfg['maxnreg']}" if cfg.get("maxnreg") else ""
            extra += f" walk_k={cfg['walk_k']}" if cfg.get("walk_k") else ""
            extra += f" red_k={cfg['red_k']}" if cfg.get("red_k") else ""
            shape = (f"N_L={cfg['N_L']}" if kind == "bwd_gluon" else f"E_T={cfg['E_T']} N_L={cfg.get('N_L', 1)}"
                     if kind == "fwd_gluon" else f"BE={cfg['BLOCK_E']} ns={cfg.get('num_stages', 1)}")
            sweep[f"{kind} T={cfg['T']} {shape} nw={cfg['num_warps']} {extra}"] = t
            fast.CONFIG.update({k: [dict(c) for c in v] for k, v in default.items()})
        row["sweep"] = sweep
        # ---- the two depthwise convs + SiLU: fused kernel vs F.conv1d in the (B, E, L) layout (the former path)
        xz = torch.randn(b, L, 2 * E, device=DEV, dtype=dtype, requires_grad=True)
        wts = [torch.randn(E, 4, device=DEV, requires_grad=True), torch.randn(E, device=DEV, requires_grad=True),
               torch.randn(E, 4, device=DEV, requires_grad=True), torch.randn(E, device=DEV, requires_grad=True)]
        gc = (torch.randn(b, L, E, device=DEV, dtype=dtype), torch.randn(b, L, E, device=DEV, dtype=dtype))

        def conv_torch():
            import torch.nn.functional as F
            x_t = xz[..., :E].transpose(1, 2)
            with torch.autocast("cuda", dtype=dtype):
                f = F.silu(F.conv1d(F.pad(x_t, (3, 0)), wts[0][:, None], wts[1], groups=E)).transpose(1, 2).contiguous()
                r = F.silu(F.conv1d(F.pad(x_t, (0, 3)), wts[2].flip(-1)[:, None], wts[3], groups=E))
            return f, r.transpose(1, 2).contiguous()

        for label, fn in (("conv_fast", lambda: fast.bimamba_conv(xz[..., :E], *wts)), ("conv_torch", conv_torch)):
            with torch.no_grad():
                row[label + "_fwd_ms"] = _bench(fn)
            row[label + "_fwdbwd_ms"] = _bench(lambda fn=fn: torch.autograd.grad(fn(), [xz, *wts], gc))
        # the conv backward launch alone: the one-launch Gluon kernel (default and swept configs), the Triton pair
        conv_args = (gc[0], gc[1], xz.detach()[..., :E], *(w.detach() for w in wts))
        conv_def = [t.float() for t in fast._conv_bwd_launch(*conv_args)]
        row["conv_bwd_launch_ms"] = _bench(lambda: fast._conv_bwd_launch(*conv_args))
        conv_sweep = {}
        for kind, cfg in [("conv_bwd_gluon", None)] + [c for c in (configs or []) if c[0] == "conv_bwd_gluon"]:
            fast.CONFIG["conv_bwd_gluon"] = [] if cfg is None else [dict(cfg, max_e=1 << 30)]
            t = _bench(lambda: fast._conv_bwd_launch(*conv_args))
            err = max(rel(a, r) for a, r in zip(fast._conv_bwd_launch(*conv_args), conv_def))
            conv_sweep["triton pair" if cfg is None else str(cfg)] = f"{t:.3f} ms (max rel diff to default {err:.1e})"
            fast.CONFIG.update({k: [dict(c) for c in v] for k, v in default.items()})
        row["conv_bwd_sweep"] = conv_sweep
        results.append(row)
        torch.cuda.empty_cache()
    # table
    lines.append(f"{'B':>4s} {'L':>4s} {'E':>4s} | {'fast fwd':>9s} {'mamba fwd':>9s} {'(+layout)':>9s} {'ratio':>6s} | "
                 f"{'fast f+b':>9s} {'mamba f+b':>9s} {'(+layout)':>9s} {'ratio':>6s}")
    for r in results:
        mf, mfl = r.get("mamba_fwd_kernels_ms", math.nan), r.get("mamba_fwd_layout_ms", math.nan)
        mb, mbl = r.get("mamba_fwdbwd_kernels_ms", math.nan), r.get("mamba_fwdbwd_layout_ms", math.nan)
        lines.append(f"{r['B']:4d} {r['L']:4d} {r['E']:4d} | {r['fast_fwd_ms']:9.3f} {mf:9.3f} {mfl:9.3f} "
                     f"{mfl / r['fast_fwd_ms']:6.2f} | {r['fast_fwdbwd_ms']:9.3f} {mb:9.3f} {mbl:9.3f} "
                     f"{mbl / r['fast_fwdbwd_ms']:6.2f}")
    lines.append("ratio = mamba-ssm (two selective_scan_fn calls + the transposes/flips of the stock layout) / fast; "
                 "times in ms, median of triton.testing.do_bench (L2 flushed)")
    for r in results:
        lines.append(f"E={r['E']} convs+SiLU: fused fwd {r['conv_fast_fwd_ms']:.3f} / fwd+bwd {r['conv_fast_fwdbwd_ms']:.3f}"
                     f" ms; F.conv1d path {r['conv_torch_fwd_ms']:.3f} / {r['conv_torch_fwdbwd_ms']:.3f} ms")
    for r in results:
        lines.append(f"E={r['E']} conv backward launch: {r['conv_bwd_launch_ms']:.3f} ms (default)")
        for k, v in r["conv_bwd_sweep"].items():
            lines.append(f"  E={r['E']} conv backward {k}: {v}")
        for k, v in r["sweep"].items():
            lines.append(f"  E={r['E']} {k}: {v}")
    text = "\n".join(lines)
    print(text, flush=True)
    if out_dir:
        Path(out_dir, "fast_scan_bench.json").write_text(json.dumps(dict(device=dev_name, results=results), indent=1))
        Path(out_dir, "fast_scan_bench.txt").write_text(text + "\n")
    return results


if __name__ == "__main__" and "--bench" in sys.argv:
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    sweep_cfgs = []
    if "--sweep" in sys.argv:
        # kind,T,BLOCK_E,warps,stages,extra (Triton kernels),
        # bwd_gluon,T,N_L,warps,seg[:atomic[:maxnreg[:split[:walk_k[:red_k]]]]] or fwd_gluon,T,E_T,warps[,N_L]
        for spec in sys.argv[sys.argv.index("--sweep") + 1].split(";"):
            if spec.startswith("fwd_gluon,"):  # fwd_gluon,T,E_T,warps[,N_L]
                _, T, e_t, nw, n_l = (spec.split(",") + ["1"])[:5]
                sweep_cfgs.append(("fwd_gluon", dict(T=int(T), E_T=int(e_t), num_warps=int(nw), N_L=int(n_l))))
                continue
            if spec.startswith("conv_bwd_gluon,"):  # conv_bwd_gluon,BLOCK_T,VE,warps,min_programs:min_rows
                _, bt, ve, nw, extra = spec.split(",")
                mp, mr = extra.split(":")
                sweep_cfgs.append(("conv_bwd_gluon", dict(BLOCK_T=int(bt), VE=int(ve), num_warps=int(nw),
                                                          min_programs=int(mp), min_rows=int(mr))))
                continue
            if spec.startswith("bwd_gluon,"):  # bwd_gluon,T,N_L,warps,seg[:atomic[:maxnreg[:split[:walk_k[:red_k]]]]]
                _, T, n_l, nw, extra = spec.split(",")
                seg, atomic, maxnreg, split, walk_k, red_k = (extra.split(":") + [""] * 5)[:6]
                sweep_cfgs.append(("bwd_gluon", dict(T=int(T), N_L=int(n_l), num_warps=int(nw), seg=int(seg),
                                                     **({"atomic": bool(int(atomic))} if atomic else {}),
                                                     **({"maxnreg": int(maxnreg)} if maxnreg else {}),
                                                     **({"split": bool(int(split))} if split else {}),
                                                     **({"walk_k": int(walk_k)} if walk_k else {}),
                                                     **({"red_k": int(red_k)} if red_k else {}))))
                continue
            kind, T, BE, nw, ns, extra = spec.split(",")
            cfg = dict(T=int(T), BLOCK_E=int(BE), num_warps=int(nw), num_stages=int(ns))
            if kind == "fwd":  # prefetch[:maxnreg]
                prefetch, _, maxnreg = extra.partition(":")
                cfg.update(prefetch=bool(int(prefetch)))
            else:  # seg[:atomic[:maxnreg]] (atomic empty: automatic)
                seg, _, rest = extra.partition(":")
                atomic, _, maxnreg = rest.partition(":")
                cfg.update(seg=int(seg), **({"atomic": bool(int(atomic))} if atomic else {}))
            cfg.update({"maxnreg": int(maxnreg)} if maxnreg else {})
            sweep_cfgs.append((kind, cfg))
    shapes = ((128, 197, 384), (128, 197, 768))
    if "--shapes" in sys.argv:  # e.g. "128x197x384;32x6085x384" (B x L x E)
        shapes = tuple(tuple(int(v) for v in sh.split("x")) for sh in sys.argv[sys.argv.index("--shapes") + 1].split(";"))
    bench(out, sweep_cfgs, shapes=shapes)
