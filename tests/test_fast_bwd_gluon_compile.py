"""The Gluon scan backward (`visionmamba.ops._fast_bwd_gluon`) compiled offline for sm_90 on a CPU-only machine.

Triton's interpreter cannot run Gluon, so its numerics are tested on the GPU (`tests/gpu/test_fast_scan_gpu.py`). Here
the installed triton compiles it to a cubin with ptxas (shipped in the triton wheel) at the production shapes and
specialisations, which catches Gluon API drift between triton releases, and checks the design's point: no layout
conversion anywhere in the kernel (every tile is a slice of one 3-D layout).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

triton = pytest.importorskip("triton")


def _ptxas_available() -> bool:
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel ships no ptxas")
def test_gluon_backward_compiles_for_sm90_without_layout_conversions():
    pytest.importorskip("triton.experimental.gluon")
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from visionmamba.ops import _fast_bwd_gluon as G
    from visionmamba.ops import fast

    cfg = fast._config("bwd_gluon", 384)
    B, L, E, N, R = 128, 197, 384, 16, 24  # shufflemamba_tiny at 224 px: E = 2 * 192, dt_rank 12 -> x_dbl width 56
    fn = G.bimamba_bwd_gluon_kernel
    consts = dict(T=cfg["T"], BLOCK_E=cfg["E_T"] * (32 // cfg["N_L"]) * cfg["num_warps"], N=N, SEG=cfg["seg"],
                  ATOMIC=True, E_T=cfg["E_T"], N_L=cfg["N_L"], NUM_WARPS=cfg["num_warps"])
    ints = dict(B=B, L=L, E=E, s_zb=L * 2 * E, s_zl=2 * E, s_gb=L * E, s_gl=E)
    for d in ("f", "b"):  # conv outputs contiguous, B/C column slices of x_dbl (B, L, R + 2N)
        ints.update({f"s_x{d}b": L * E, f"s_x{d}l": E, f"s_dt{d}b": L * E, f"s_dt{d}l": E,
                     f"s_B{d}b": L * (R + 2 * N), f"s_B{d}l": R + 2 * N, f"s_C{d}b": L * (R + 2 * N),
                     f"s_C{d}l": R + 2 * N})
    fp32 = ("Af", "Ab", "Df", "Db", "bias", "dA", "dD", "dbias", "ck", "scr", "dB", "dC")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):  # what the launcher specialises: 16-byte aligned pointers
            sig[name] = "*fp32" if name.startswith(fp32) else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernel = triton.compile(GluonASTSource(fn, sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg["num_warps"]))
    ttgir = kernel.asm["ttgir"]
    assert "ttg.convert_layout" not in ttgir, "a layout conversion crept into the Gluon backward"
    assert ttgir.count("tt.reduce") >= 10  # the kernel is really there: the N- and channel-reductions of both passes
    assert len(kernel.asm["cubin"]) > 10_000
