"""The `fast` bidirectional scan's Triton kernels, run on the CPU by Triton's interpreter, against the reference.

The kernels run in a subprocess with ``TRITON_INTERPRET=1`` set before triton is imported (another test in this
process may already have imported triton in compiled mode). In that subprocess Triton's interpreter gets a vectorised
`associative_scan` (the stock one calls the combine function once per element in Python, minutes for these shapes);
the replacement is checked against the stock implementation first. Outputs and all 15 gradients must match
`bimamba_scan_reference` (fp64 on the same inputs) to ~1e-4.

In this process (no interpreter) the custom op runs its PyTorch reference path on the CPU, which is enough to check
the op registration: schema, fake kernel, autograd, and a `torch.compile(fullgraph=True)` without graph breaks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
_adj_combine = None  # set to the kernel's combine function inside the interpreter worker (a @triton.jit global)

# (batch, L, E, N, T, BLOCK_E, noncontiguous, dtype, backward chunks per checkpoint segment, forward prefetch):
# odd lengths, a partial last chunk, a single partial chunk, E not a multiple of BLOCK_E, strided (B, L, 2E)-split
# inputs, several checkpoint segments with a partial last one.
CASES = [
    (2, 7, 24, 16, 8, 16, False, "float32", 16, False),
    (2, 65, 32, 16, 8, 16, True, "float32", 2, True),
]


def make_inputs(b, L, E, N, dtype=torch.float32, seed=0, noncontiguous=False, device="cpu"):
    """Random inputs in `bimamba_scan` order (A < 0, moderate Δ). With noncontiguous, x/z and dt are channel views
    of (B, L, 2E) tensors and B/C views of a (B, L, R + 2N) projection, as the mixer produces them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out = []
    for _ in range(2):
        if noncontiguous:
            xz = r(b, L, 2 * E)
            x, dt = xz[..., :E], xz[..., E:] * 0.5
            dbl = r(b, L, 3 + 2 * N)
            Bm, Cm = dbl[..., 3:3 + N], dbl[..., 3 + N:]
        else:
            x, dt, Bm, Cm = r(b, L, E), r(b, L, E) * 0.5, r(b, L, N), r(b, L, N)
        A = -torch.exp(r(E, N) * 0.5 + 0.3)
        out += [x, dt, A, Bm, Cm, r(E), r(E) * 0.3]
    out.append(r(b, L, E))
    res = []
    for i, t in enumerate(out):
        is_param = i % 7 in (2, 5, 6) and i != 14
        t = t.to(device)
        res.append(t if is_param else t.to(dtype))
    return res


# ------------------------------------------------------------------------------------------------------------
# subprocess worker
# ------------------------------------------------------------------------------------------------------------

def _install_fast_interpreter_scan():
    """Vectorise the interpreter's generic associative_scan along the scanned axis (same combine order)."""
    import numpy as np
    from triton.runtime import interpreter as itp

    scan_cls = getattr(itp, "ScanOps", None)
    if scan_cls is None or not hasattr(scan_cls, "generic_scan"):
        return None
    original = scan_cls.generic_scan

    def generic_scan(self, input):
        datas = [arg.handle.data for arg in input]
        axis = self.axis
        sl = lambda i: (slice(None),) * axis + (i,)  # noqa: E731
        outs = [np.empty_like(d) for d in datas]
        acc = None
        for i in range(datas[0].shape[axis]):
            cur = tuple(self.to_tensor(np.ascontiguousarray(d[sl(i)]), input[j].dtype) for j, d in enumerate(datas))
            if acc is None:
                acc = cur
            else:
                ret = self.combine_fn.fn(*acc, *cur)
                acc = tuple(ret) if isinstance(ret, tuple) else (ret,)
            for j, o in enumerate(outs):
                o[sl(i)] = acc[j].handle.data
        return [self.to_tensor(o, input[j].dtype) for j, o in enumerate(outs)]

    scan_cls.generic_scan = generic_scan
    return original


def _check_patched_scan(original):
    """The vectorised scan equals the stock one on a non-commutative 3-tensor scan, both directions."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as itp

    from visionmamba.ops import _fast_kernels

    globals()["_adj_combine"] = _fast_kernels._adj_combine  # @triton.jit resolves names in the module's globals

    @triton.jit
    def k(a_ptr, p_ptr, s_ptr, o_ptr, M: tl.constexpr, K: tl.constexpr, REV: tl.constexpr):
        off = tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :]
        f, p, s = tl.associative_scan((tl.load(a_ptr + off), tl.load(p_ptr + off), tl.load(s_ptr + off)), 0,
                                      _adj_combine, reverse=REV)
        tl.store(o_ptr + off, s + 10 * p + 100 * f)

    g = torch.Generator().manual_seed(1)
    a, p, s = (torch.rand(8, 4, generator=g) for _ in range(3))
    for rev in (False, True):
        outs = []
        for impl in (original, itp.ScanOps.generic_scan):
            saved, itp.ScanOps.generic_scan = itp.ScanOps.generic_scan, impl
            o = torch.empty(8, 4)
            k[(1,)](a, p, s, o, M=8, K=4, REV=rev)
            itp.ScanOps.generic_scan = saved
            outs.append(o)
        assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6), (rev, outs)


def _worker(case_json: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, str(ROOT))
    b, L, E, N, T, BE, nonc, dtype, seg, prefetch = json.loads(case_json)
    original = _install_fast_interpreter_scan()
    if original is not None:
        _check_patched_scan(original)
    from visionmamba.ops import fast

    fast.CONFIG["fwd"] = [dict(max_e=1 << 30, T=T, BLOCK_E=BE, num_warps=1, prefetch=prefetch)]
    fast.CONFIG["bwd"] = [dict(max_e=1 << 30, T=T, BLOCK_E=BE, num_warps=1, seg=seg)]
    assert fast.uses_triton("cpu")
    ins = make_inputs(b, L, E, N, dtype=getattr(torch, dtype), noncontiguous=nonc)
    g = torch.randn(b, L, E, generator=torch.Generator().manual_seed(5)).to(ins[0].dtype)
    # through the custom op and autograd (so the registered backward is what runs)
    leaves = [t.detach().clone().requires_grad_(True) for t in ins]
    y = fast.bimamba_scan(*leaves)
    y.backward(g)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in ins]
    y_ref = fast.bimamba_scan_reference(*ref_leaves)
    y_ref.backward(g.double())
    report = {}

    def err(a, r):
        a, r = a.detach().double(), r.detach().double()
        scale = max(r.abs().max().item(), 1e-30)
        return dict(max_abs=(a - r).abs().max().item(), scale=scale, rel=(a - r).abs().max().item() / scale,
                    finite=bool(torch.isfinite(a).all()))

    report["y"] = err(y, y_ref)
    for name, leaf, ref in zip(fast._INPUT_NAMES, leaves, ref_leaves):
        report["d" + name] = err(leaf.grad, ref.grad)
    print("RESULT " + json.dumps(report))


def _conv_worker(case_json: str) -> None:
    """`bimamba_conv` through the custom op and autograd (Triton interpreter) against the F.conv1d reference in fp64."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, str(ROOT))
    from visionmamba.ops import fast

    b, L, E, W, block_t, block_e, strided = json.loads(case_json)
    fast.CONFIG["conv_fwd"] = fast.CONFIG["conv_bwd"] = [dict(max_e=1 << 30, BLOCK_T=block_t, BLOCK_E=block_e,
                                                              num_warps=1)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, L, 2 * E, generator=g)[..., :E] if strided else torch.randn(b, L, E, generator=g)
    ins = [x, torch.randn(E, W, generator=g), torch.randn(E, generator=g), torch.randn(E, W, generator=g),
           torch.randn(E, generator=g)]
    gf, gb = torch.randn(b, L, E, generator=g), torch.randn(b, L, E, generator=g)
    leaves = [t.detach().clone().requires_grad_(True) for t in ins]
    out_f, out_b = fast.bimamba_conv(*leaves)
    torch.autograd.backward((out_f, out_b), (gf, gb))
    ref = [t.detach().double().requires_grad_(True) for t in ins]
    ref_f, ref_b = fast.bimamba_conv_reference(*ref)
    torch.autograd.backward((ref_f, ref_b), (gf.double(), gb.double()))
    rel = lambda a, r: ((a.detach().double() - r.detach()).abs().max() / r.detach().abs().max()).item()  # noqa: E731
    report = {"x_f": rel(out_f, ref_f), "x_b": rel(out_b, ref_b)}
    for name, leaf, r in zip(("dx", "dw_f", "db_f", "dw_b", "db_b"), leaves, ref):
        report[name] = rel(leaf.grad, r.grad)
    print("RESULT " + json.dumps(report))


def _inner_inputs(b, L, E, N, R, W, dtype=torch.float64, seed=0):
    """`bimamba_inner` inputs: xz (B, L, 2E), conv weights / biases, then per direction x_proj (R + 2N, E), dt_proj
    (E, R), A (E, N) < 0, D, dt_bias."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ins = [r(b, L, 2 * E), r(E, W) * 0.5, r(E) * 0.5, r(E, W) * 0.5, r(E) * 0.5]
    for _ in range(2):
        ins += [r(R + 2 * N, E) * E ** -0.5, r(E, R) * R ** -0.5, -torch.exp(r(E, N) * 0.5 + 0.3), r(E), r(E) * 0.3]
    return ins


def _inner_reference(xz, cw_f, cb_f, cw_b, cb_b, xw_f, dw_f, A_f, D_f, bias_f, xw_b, dw_b, A_b, D_b, bias_b):
    """`bimamba_inner` composed from the references with plain autograd."""
    import torch.nn.functional as F

    from visionmamba.ops import fast

    E, R, N = xz.shape[-1] // 2, dw_f.shape[1], A_f.shape[1]
    x_f, x_b = fast.bimamba_conv_reference(xz[..., :E], cw_f, cb_f, cw_b, cb_b)
    dbl_f, dbl_b = F.linear(x_f, xw_f), F.linear(x_b, xw_b)
    return fast.bimamba_scan_reference(
        x_f, F.linear(dbl_f[..., :R], dw_f), A_f, dbl_f[..., R:R + N], dbl_f[..., R + N:], D_f, bias_f,
        x_b, F.linear(dbl_b[..., :R], dw_b), A_b, dbl_b[..., R:R + N], dbl_b[..., R + N:], D_b, bias_b, xz[..., E:])


def _inner_worker(case_json: str) -> None:
    """`bimamba_inner` (one autograd node, dz / dx written into d_xz's halves) through the Triton interpreter against
    the reference composition in fp64: output and all 15 gradients."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, str(ROOT))
    _install_fast_interpreter_scan()
    from visionmamba.ops import fast

    b, L, E, N, R, W, T, BE = json.loads(case_json)
    fast.CONFIG["fwd"] = [dict(max_e=1 << 30, T=T, BLOCK_E=BE, num_warps=1, prefetch=True)]
    fast.CONFIG["bwd"] = [dict(max_e=1 << 30, T=T, BLOCK_E=BE, num_warps=1, seg=2)]
    fast.CONFIG["conv_fwd"] = fast.CONFIG["conv_bwd"] = [dict(max_e=1 << 30, BLOCK_T=8, BLOCK_E=BE, num_warps=1)]
    assert fast.uses_triton("cpu")
    ins = _inner_inputs(b, L, E, N, R, W)
    g = torch.randn(b, L, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = [t.float().requires_grad_(True) for t in ins]
    y = fast.bimamba_inner(*leaves)
    y.backward(g.float())
    ref = [t.detach().clone().requires_grad_(True) for t in ins]
    y_ref = _inner_reference(*ref)
    y_ref.backward(g)
    rel = lambda a, r: ((a.detach().double() - r.detach()).abs().max() / r.detach().abs().max()).item()  # noqa: E731
    report = {"y": rel(y, y_ref)}
    for i, (leaf, r) in enumerate(zip(leaves, ref)):
        report[f"d{i}"] = rel(leaf.grad, r.grad)
    print("RESULT " + json.dumps(report))


def _dt_proj_worker(case_json: str) -> None:
    """Both dt_proj kernels (forward, and backward reading ddt once) against the matmuls, fp32: rows not a multiple of
    the row tile, R padded to the 16-wide dot, dt_low a column slice of x_proj's output, W stored transposed; with
    RW < R, dt_low has R - RW zero columns (x_proj's padding) and W only RW."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from visionmamba.ops import fast

    M, E, R, K, RW = json.loads(case_json)
    fast.CONFIG["dt_proj_fwd"] = [dict(max_e=1 << 30, BM=16, BE=32, num_warps=1, BM_fp32=16)]
    fast.CONFIG["dt_proj_bwd"] = [dict(max_e=1 << 30, BM=16, BE=32, num_warps=1, BM_fp32=16)]
    g = torch.Generator().manual_seed(M)
    dbl = [torch.randn(M, K, generator=g) for _ in range(2)]
    for d in dbl:
        d[:, RW:R] = 0.0
    a = [d[:, :R] for d in dbl]
    w = [torch.randn(RW, E, generator=g).t() for _ in range(2)]
    gy = [torch.randn(M, E, generator=g) for _ in range(2)]
    rel = lambda x, r: ((x - r).abs().max() / r.abs().max()).item()  # noqa: E731
    out = fast.dt_proj_fwd_triton(a[0], w[0], a[1], w[1])
    d_dbl = torch.full((2, M, K), 7.0)
    dw = fast.dt_proj_bwd_triton(gy[0], a[0], w[0], gy[1], a[1], w[1], d_dbl[0][:, :R], d_dbl[1][:, :R])
    report = {}
    for d in range(2):
        report[f"dt{d}"] = rel(out[d], a[d][:, :RW] @ w[d].t())
        report[f"d_dt_low{d}"] = rel(d_dbl[d][:, :RW], gy[d] @ w[d])
        report[f"dw{d}"] = rel(dw[d], gy[d].t() @ a[d][:, :RW])
        report[f"untouched{d}"] = float((d_dbl[d][:, R:] != 7.0).sum())
        report[f"pad_nonzero{d}"] = float((d_dbl[d][:, RW:R] != 0.0).sum())
    # with the scan backward's dB / dC: whole rows of d x_dbl = [d dt_low | dB | dC], the same d dt_low and dW
    N = (K - R) // 2
    dBC = torch.randn(4, M, N, generator=g)
    d_dbl_bc = torch.full((2, M, K), 7.0)
    dw_bc = fast.dt_proj_bwd_triton(gy[0], a[0], w[0], gy[1], a[1], w[1], d_dbl_bc[0], d_dbl_bc[1], dBC)
    for d in range(2):
        report[f"mismatch_dt_low{d}"] = float((d_dbl_bc[d][:, :R] != d_dbl[d][:, :R]).sum())
        report[f"mismatch_bc{d}"] = float((d_dbl_bc[d][:, R:] != torch.cat([dBC[2 * d], dBC[2 * d + 1]], 1)).sum())
        report[f"dw_bc{d}"] = rel(dw_bc[d], gy[d].t() @ a[d][:, :RW])
    print("RESULT " + json.dumps(report))


# ------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------

def _run_worker(mode: str, case) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, json.dumps(case)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# (batch, L, E, conv width, BLOCK_T, BLOCK_E, strided x): row tiles shorter than the conv's reach, a partial last row
# tile and channel block, the (B, L, 2E) split view the mixer passes; width 3 (taps padded to 4 in the partials)
CONV_CASES = [(2, 37, 24, 4, 8, 16, True), (1, 5, 16, 3, 16, 16, False)]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"B{c[0]}-L{c[1]}-E{c[2]}-W{c[3]}-T{c[4]}")
def test_fast_conv_interpreter_matches_reference(case):
    report = _run_worker("--conv-worker", case)
    print(report)
    assert set(report) == {"x_f", "x_b", "dx", "dw_f", "db_f", "dw_b", "db_b"}
    assert max(report.values()) < 1e-5, report


def test_fast_conv_op_registration_cpu_reference_path():
    """opcheck of `visionmamba::bimamba_conv` on its CPU reference path; x_b is conv1d_b of the flipped sequence."""
    import torch.nn.functional as F

    from visionmamba.ops import fast

    if fast.uses_triton("cpu"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    g = torch.Generator().manual_seed(0)
    E, W = 6, 4
    ins = [torch.randn(2, 9, E, generator=g, dtype=torch.float64), torch.randn(E, W, generator=g, dtype=torch.float64),
           torch.randn(E, generator=g, dtype=torch.float64), torch.randn(E, W, generator=g, dtype=torch.float64),
           torch.randn(E, generator=g, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.visionmamba.bimamba_conv.default, tuple(t.requires_grad_(True) for t in ins))
    x, w_f, b_f, w_b, b_b = ins
    out_f, out_b = fast.bimamba_conv(*ins)
    official = lambda x_, w, b: F.silu(F.conv1d(x_.transpose(1, 2), w[:, None], b, padding=W - 1, groups=E)[..., :9])  # noqa: E731
    torch.testing.assert_close(out_f, official(x, w_f, b_f).transpose(1, 2))
    torch.testing.assert_close(out_b, official(x.flip(1), w_b, b_b).flip(-1).transpose(1, 2))


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-L{c[1]}-E{c[2]}-N{c[3]}-T{c[4]}-BE{c[5]}"
                         + ("-strided" if c[6] else "") + f"-{c[7]}-seg{c[8]}" + ("-prefetch" if c[9] else ""))
def test_fast_scan_interpreter_matches_reference(case):
    report = _run_worker("--worker", case)
    print(json.dumps(report, indent=1))
    assert len(report) == 16
    bad = {k: v for k, v in report.items() if not v["finite"] or v["max_abs"] > 1e-4 * max(1.0, v["scale"])}
    assert not bad, bad


# (batch, L, E, N, dt_rank, conv width, T, BLOCK_E): several checkpoint segments, a partial last chunk and channel block
INNER_CASES = [(2, 21, 24, 16, 8, 4, 4, 16)]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", INNER_CASES, ids=lambda c: f"B{c[0]}-L{c[1]}-E{c[2]}-N{c[3]}-R{c[4]}")
def test_fast_inner_interpreter_matches_reference(case):
    """The fused mixer node's hand-written backward (scan and conv backward writing into the halves of d_xz, the
    x_proj dgrad adding the scan's dx) against autograd through the references."""
    report = _run_worker("--inner-worker", case)
    print(report)
    assert set(report) == {"y"} | {f"d{i}" for i in range(15)}
    assert max(report.values()) < 1e-4, report


def test_fast_inner_ops_registration_cpu_reference_path():
    """The two mutating backward ops `bimamba_inner` uses: declared mutation of d_xz only, each writes its half and
    leaves the other, fake kernels agree with the real outputs; the node's output and gradients against autograd
    through the references (CPU reference path, fp64). (Not opcheck: its dispatch modes also see the torch.func.vjp
    inside the CPU reference path and fail on functorch's storage-less wrappers. The compiled whole-model test in
    test_mixer_fast_path runs these ops through functionalization.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from visionmamba.ops import fast

    if fast.uses_triton("cpu"):
        pytest.skip("TRITON_INTERPRET is set in this process")

    def check_fake(op, args, real):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(a) for a in args])
        fake = fake if isinstance(fake, tuple) else (fake,)
        real = real if isinstance(real, tuple) else (real,)
        assert [(f.shape, f.dtype) for f in fake] == [(r.shape, r.dtype) for r in real]

    for op in (torch.ops.visionmamba.bimamba_scan_bwd_xz, torch.ops.visionmamba.bimamba_conv_bwd_xz):
        written = [a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written == ["d_xz"]
    b, L, E, N = 2, 9, 8, 4
    scan_ins = make_inputs(b, L, E, N, dtype=torch.float64)
    grad = torch.randn(b, L, E, dtype=torch.float64)
    d_xz = torch.zeros(b, L, 2 * E, dtype=torch.float64)
    expected = torch.ops.visionmamba.bimamba_scan_bwd(grad, *scan_ins)
    got = torch.ops.visionmamba.bimamba_scan_bwd_xz(grad, *scan_ins, d_xz)
    torch.testing.assert_close(d_xz[..., E:], expected[4])
    assert (d_xz[..., :E] == 0).all()
    for a, r in zip(got, expected[:4] + expected[5:]):
        torch.testing.assert_close(a, r)
    check_fake(torch.ops.visionmamba.bimamba_scan_bwd_xz, (grad, *scan_ins, d_xz.clone()), got)
    g = torch.Generator().manual_seed(1)
    conv_ins = [torch.randn(b, L, E, generator=g, dtype=torch.float64)] + [
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((E, 4), (E,), (E, 4), (E,))]
    gf, gb = torch.randn(b, L, E, dtype=torch.float64), torch.randn(b, L, E, dtype=torch.float64)
    dpar = torch.ops.visionmamba.bimamba_conv_bwd_xz(gf, gb, *conv_ins, d_xz)
    dx, dpar_ref = torch.ops.visionmamba.bimamba_conv_bwd(gf, gb, *conv_ins)
    torch.testing.assert_close(d_xz[..., :E], dx)
    torch.testing.assert_close(d_xz[..., E:], expected[4])  # the other half untouched
    torch.testing.assert_close(dpar, dpar_ref)
    check_fake(torch.ops.visionmamba.bimamba_conv_bwd_xz, (gf, gb, *conv_ins, d_xz.clone()), dpar)
    ins = [t.requires_grad_(True) for t in _inner_inputs(b, L, E, N, 3, 4)]
    y = fast.bimamba_inner(*ins)
    y_ref = _inner_reference(*ins)
    torch.testing.assert_close(y, y_ref)
    g_out = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, ins, g_out), torch.autograd.grad(y_ref, ins, g_out)):
        torch.testing.assert_close(a, r)

def test_fast_module_needs_no_triton():
    """visionmamba.ops.fast imports (and its op runs, on the CPU reference path) with triton made unimportable.
    (Other libraries such as timm may import triton themselves; this checks that our module does not need it.)"""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, visionmamba, visionmamba.ops.fast as fast\n"
            "sys.path.insert(0, 'tests'); from test_fast_scan_interpret import make_inputs\n"
            "y = fast.bimamba_scan(*make_inputs(1, 3, 4, 4)); assert y.shape == (1, 3, 4); print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                          env=dict(env, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_fast_op_registration_cpu_reference_path():
    """Schema, fake kernel and autograd registration (opcheck), on the CPU reference path of the op."""
    from visionmamba.ops import fast

    if fast.uses_triton("cpu"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    ins = make_inputs(2, 9, 8, 4, dtype=torch.float64)
    ins = [t.double().requires_grad_(True) for t in ins]
    torch.library.opcheck(torch.ops.visionmamba.bimamba_scan.default, tuple(ins))
    # gradient of the op == gradient of the reference
    g = torch.randn(2, 9, 8, dtype=torch.float64)
    y = fast.bimamba_scan(*ins)
    grads = torch.autograd.grad(y, ins, g)
    y2 = fast.bimamba_scan_reference(*ins)
    grads2 = torch.autograd.grad(y2, ins, g)
    torch.testing.assert_close(y, y2)
    for a, r in zip(grads, grads2):
        torch.testing.assert_close(a, r)


def test_fast_op_compiles_without_graph_break():
    from visionmamba.ops import fast

    if fast.uses_triton("cpu"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    ins = make_inputs(1, 5, 4, 4)
    lin = torch.nn.Linear(4, 4)

    def f(*args):
        y = fast.bimamba_scan(*args)
        return lin(y).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in ins]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in ins]
    f(*ref_leaves).backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", [(70, 96, 12, 44, 12), (33, 40, 24, 56, 24), (70, 96, 16, 48, 12)],
                         ids=["R12", "R24", "R16_W12"])
def test_fast_dt_proj_interpreter_matches_matmuls(case):
    report = _run_worker("--dt-proj-worker", list(case))
    print(report)
    assert all(report[f"untouched{d}"] == 0 for d in range(2)), report  # only the dt_low columns are written
    # past W's rank, d dt_low is written as zeros (the gradient of x_proj's zero rows)
    assert all(report[f"pad_nonzero{d}"] == 0 for d in range(2)), report
    # given dB / dC, the rest of each row is them, copied exactly, and the d dt_low part is unchanged
    assert all(v == 0 for k, v in report.items() if k.startswith("mismatch")), report
    assert max(v for k, v in report.items() if not k.startswith(("untouched", "pad_nonzero", "mismatch"))) < 1e-5, \
        report


def test_fast_dt_proj_cpu_path_is_the_matmuls():
    """Off CUDA, `dt_proj` and its backward are the F.linear / matmul products autograd would run (bit-equal)."""
    from visionmamba.ops import fast

    g = torch.Generator().manual_seed(0)
    dbl = [torch.randn(2, 5, 40, generator=g) for _ in range(2)]
    a = [d[..., :8] for d in dbl]
    w = [torch.randn(24, 8, generator=g, requires_grad=True) for _ in range(2)]
    with torch.no_grad():
        out = fast.dt_proj(a[0], w[0], a[1], w[1])
    gy = [torch.randn(10, 24, generator=g) for _ in range(2)]
    da_f, da_b, dw_f, dw_b = fast._dt_proj_backward(gy[0], a[0], w[0], gy[1], a[1], w[1])
    for d, (da, dw) in enumerate(((da_f, dw_f), (da_b, dw_b))):
        leaf = a[d].detach().requires_grad_(True)
        ref = torch.nn.functional.linear(leaf, w[d])
        assert torch.equal(out[d], ref.detach())
        ref_da, ref_dw = torch.autograd.grad(ref, (leaf, w[d]), gy[d].view(2, 5, 24))
        torch.testing.assert_close(da.view(2, 5, 8), ref_da, rtol=0, atol=0)
        torch.testing.assert_close(dw, ref_dw, rtol=1e-6, atol=1e-6)


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
elif __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "--conv-worker":
    _conv_worker(sys.argv[2])
elif __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "--inner-worker":
    _inner_worker(sys.argv[2])
elif __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "--dt-proj-worker":
    _dt_proj_worker(sys.argv[2])
