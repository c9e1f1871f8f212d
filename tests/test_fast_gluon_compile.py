"""The Gluon scan kernels (`visionmamba.ops._fast_gluon`) compiled offline for sm_90 on a CPU-only machine.

Triton's interpreter cannot run Gluon, so their numerics are tested on the GPU (`tests/gpu/test_fast_scan_gpu.py`).
Here the installed triton compiles them to cubins with ptxas (shipped in the triton wheel) at the production shapes
and specialisations, which catches Gluon API drift between triton releases, and checks the designs' point: no layout
conversion that moves data (every register tile is a slice of one 3-D layout, or, in the backward's walks, of a twin
with more rows per thread whose state tiles sit in the same registers; the B and C tiles go through shared memory
explicitly).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

triton = pytest.importorskip("triton")

B, L, E, N, R = 128, 197, 384, 16, 24  # shufflemamba_tiny at 224 px: E = 2 * 192, dt_rank 12 -> x_dbl width 56
FP32_ARGS = ("Af", "Ab", "Df", "Db", "bias", "dA", "dD", "dbias", "ck", "scr", "dB", "dC", "wf", "wb", "bf_", "bb_",
             "dpar")


def _ptxas_available() -> bool:
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _compile_sm90(fn, consts: dict, num_warps: int, maxnreg=None):
    """``fn`` compiled for sm_90 the way the launcher specialises it: 16-byte aligned pointers, ints divisible by 16
    marked so; conv outputs contiguous, B/C column slices of x_dbl (B, L, R + 2N), z a view of the (B, L, 2E) in_proj
    output."""
    pytest.importorskip("triton.experimental.gluon")
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    ints = dict(B=B, L=L, E=E, s_zb=L * 2 * E, s_zl=2 * E, s_gb=L * E, s_gl=E, s_ob=L * E, s_ol=E,
                s_xb=L * 2 * E, s_xl=2 * E, ROWS=66,  # the conv reads x as a view of the in_proj output
                s_dzl=2 * E, s_dxl=2 * E,  # and the backward kernels write dz / dx into the halves of its gradient
                s_ybb=L * E, s_ybl=E)  # the forward with both directions at once: the reverse's y before they meet
    for d in ("f", "b"):
        ints.update({f"s_x{d}b": L * E, f"s_x{d}l": E, f"s_dt{d}b": L * E, f"s_dt{d}l": E,
                     f"s_B{d}b": L * (R + 2 * N), f"s_B{d}l": R + 2 * N, f"s_C{d}b": L * (R + 2 * N),
                     f"s_C{d}l": R + 2 * N})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name.startswith(FP32_ARGS) else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return triton.compile(GluonASTSource(fn, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {})))


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel ships no ptxas")
@pytest.mark.parametrize("entry", [0, 1], ids=["E384", "E768"])
def test_gluon_backward_compiles_for_sm90_with_per_lane_rows(entry):
    """Both configured backward variants (2 lanes per state with a register cap, 1 lane), the first with both
    directions in each program (batch 128), the second with the directions in separate programs (small batches).
    With the state over N_L = 2 lanes each lane does the per-(token, channel) work of its own rows (one softplus per
    lane and T / N_L rows), and the only data-moving conversions are the token tiles that cross between those rows
    and the state layout; with whole states per thread there are none."""
    from visionmamba.ops import _fast_gluon as G
    from visionmamba.ops import fast

    cfg = fast._config("bwd_gluon", (E, 2 * E)[entry])
    n_l, T, W = cfg["N_L"], cfg["T"], cfg.get("walk_k", 4) * cfg["T"]
    assert (n_l, T) == ((2, 2), (1, 2))[entry]
    block_e = (32 // n_l) * cfg["num_warps"]
    consts = dict(T=T, BLOCK_E=block_e, N=N, SEG=cfg["seg"], ATOMIC=False, N_L=n_l,
                  NUM_WARPS=cfg["num_warps"], SPLIT=bool(entry), WALK_K=cfg.get("walk_k", 4),
                  RED_K=1 if entry else cfg.get("red_k", 1),
                  RL=G.reduce_layout(T, N, block_e, cfg["num_warps"], 1 if entry else cfg.get("red_k", 1)))
    kernel = _compile_sm90(G.bimamba_bwd_gluon_kernel, consts, cfg["num_warps"], maxnreg=cfg.get("maxnreg"))
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    conversions = [line for line in ttgir.splitlines() if "= ttg.convert_layout" in line]
    # (BLOCK_E, N) state tiles and (BLOCK_E,) channel vectors between L3 and the walks' K-chunk twin sit in the same
    # registers (the source asks for assert_trivial, so the compile above fails on one that moves data)
    token_tiles = [c for c in conversions if f"tensor<{T}x{block_e}x" in c or f"tensor<{W}x{block_e}x" in c]
    assert all(f"tensor<{block_e}x" in c for c in conversions if c not in token_tiles)
    # per direction: the walks' Δ and Δx (phase 1 and 2a), 2b's Δ, Δx, gy to the state layout and y, s1, s2 back
    assert len(token_tiles) == (2 * (2 + 2 + 6), 0)[entry], token_tiles
    source = Path(G.__file__).read_text()
    # (plus `_lanes`, which moves data only with the state spread over lanes)
    assert source.count("gl.convert_layout(") == source.count("assert_trivial=True)") + 1
    # softplus per direction: W / N_L rows per lane in each walk, T / N_L in 2b
    assert ptx.count("lg2.approx") == 2 * (2 * W + T) // n_l
    assert ".local" not in ptx or cfg.get("maxnreg")
    # the kernel is really there: per direction, the sums over the state (y, dx, dΔ), over the chunk's tokens (dD,
    # d dt_bias) and the shared-memory channel sums (dB, dC)
    assert ttgir.count("tt.reduce") >= 14
    assert ttgir.count("ttg.local_load") >= 8  # B / C rows and the dB / dC tiles, both directions
    assert len(kernel.asm["cubin"]) > 10_000


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel ships no ptxas")
def test_gluon_forward_compiles_for_sm90_with_whole_states_per_thread():
    from visionmamba.ops import _fast_gluon as G
    from visionmamba.ops import fast

    cfg = fast._config("fwd_gluon", E)
    consts = dict(T=cfg["T"], BLOCK_E=cfg["E_T"] * 32 * cfg["num_warps"], N=N, E_T=cfg["E_T"],
                  NUM_WARPS=cfg["num_warps"], N_L=1)
    kernel = _compile_sm90(G.bimamba_fwd_gluon_kernel, consts, cfg["num_warps"])
    ttgir = kernel.asm["ttgir"]
    assert "ttg.convert_layout" not in ttgir, "a layout conversion crept into the Gluon forward"
    # B and C staged through shared memory (two buffers, stored once per chunk, read row by row by every thread)
    assert ttgir.count("ttg.local_alloc") >= 2 and "ttg.local_load" in ttgir
    # each thread owns whole states, so y = <h, C> reduces in registers: no warp shuffle in the kernel
    assert "shfl" not in kernel.asm["ptx"]


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel ships no ptxas")
def test_gluon_forward_compiles_for_sm90_with_states_over_lanes():
    """The high-resolution forward (few batch rows): each state over N_L = 4 lanes (`_gluon_fwd_config` at batch 32).
    y = <h, C> ends in a butterfly over the 4 lanes (2 shuffles per row), the per-(token, channel) work runs once per
    channel (each lane its own rows: one softplus per lane and T / N_L rows), and the only layout conversions are
    `_lanes`' three per direction (Δ and Δx to the state layout, y back), no register spills."""
    from visionmamba.ops import _fast_gluon as G
    from visionmamba.ops import fast

    cfg = dict(fast._config("fwd_gluon", E), N_L=4)
    cfg.update(T=cfg["lane_rows"] * 4, num_warps=cfg["lane_block_e"] * 4 // 32)
    assert cfg["N_L"] == 4 and cfg["T"] % cfg["N_L"] == 0
    consts = dict(T=cfg["T"], BLOCK_E=cfg["E_T"] * (32 // cfg["N_L"]) * cfg["num_warps"], N=N, E_T=cfg["E_T"],
                  NUM_WARPS=cfg["num_warps"], N_L=cfg["N_L"])
    kernel = _compile_sm90(G.bimamba_fwd_gluon_kernel, consts, cfg["num_warps"])
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    assert ttgir.count("= ttg.convert_layout") == 6
    assert ptx.count("shfl.sync.bfly") == 2 * 2 * cfg["T"]  # log2(4) per row, both directions
    # softplus: one lg2 per thread and chunk, i.e. T / N_L rows per lane, per direction
    assert ptx.count("lg2.approx") == 2 * cfg["T"] // cfg["N_L"]
    assert ".local" not in ptx


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel ships no ptxas")
def test_gluon_forward_compiles_for_sm90_with_directions_in_warp_groups(monkeypatch):
    """The 1248 px forward (`_gluon_fwd_config` at batch 32: states over 2 lanes, the two directions at once in two
    warp groups): the direction is a tensor axis over the warps, so the kernel is one instruction stream; its two
    loops (before and after the directions meet) each convert Δ, Δx to the state layout and y back and nothing else,
    move as much across lanes as the kernel that runs the directions one after the other, run one softplus per lane
    and T / N_L rows, and do not spill."""
    import torch

    from visionmamba.ops import _fast_gluon as G
    from visionmamba.ops import fast

    monkeypatch.setattr(fast, "_sm_count", lambda index: 132)
    cfg = fast._gluon_fwd_config(torch.device("cuda"), 32, E, N)
    assert cfg["dirs"] and cfg["N_L"] == 2 and cfg["num_warps"] == 4 and cfg["block_e"] == 32
    consts = dict(T=cfg["T"], BLOCK_E=cfg["block_e"], N=N, E_T=cfg["E_T"], NUM_WARPS=cfg["num_warps"],
                  N_L=cfg["N_L"])
    kernel = _compile_sm90(G.bimamba_fwd_dirs_gluon_kernel, consts, cfg["num_warps"])
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    assert ttgir.count("= ttg.convert_layout") == 2 * 3
    one_by_one = _compile_sm90(G.bimamba_fwd_gluon_kernel, dict(consts, BLOCK_E=cfg["block_e"],
                                                                NUM_WARPS=cfg["num_warps"] // 2),
                               cfg["num_warps"] // 2)
    assert ptx.count("shfl.sync") == one_by_one.asm["ptx"].count("shfl.sync") > 0
    assert ptx.count("lg2.approx") == 2 * cfg["T"] // cfg["N_L"]
    assert ".local" not in ptx
    # per loop one barrier per step, plus the middle chunk's between the forward's store and the reverse's load
    assert ptx.count("bar.sync") >= 3


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel ships no ptxas")
def test_gluon_convs_compile_for_sm90_with_rows_in_registers(monkeypatch):
    """The conv forward and the one-launch conv backward: rows in each thread, so every shifted operand is a register (no shared memory,
    no shuffle, no layout conversion) and the weight gradients leave as atomics (4 taps + bias, two directions).
    Where it runs: CUDA with a non-empty configuration and widths up to 4, never in the interpreter."""
    import torch

    from visionmamba.ops import _fast_gluon as G
    from visionmamba.ops import fast

    cfg = fast._gluon_conv_config("conv_bwd_gluon", torch.device("cuda"), E, 4)
    consts = dict(W=4, BLOCK_T=cfg["BLOCK_T"], VE=cfg["VE"], NUM_WARPS=cfg["num_warps"])
    kernel = _compile_sm90(G.bimamba_conv_bwd_gluon_kernel, consts, cfg["num_warps"])
    ttgir = kernel.asm["ttgir"]
    assert "ttg.convert_layout" not in ttgir and "ttg.local_alloc" not in ttgir
    assert "shfl" not in kernel.asm["ptx"]
    assert ttgir.count("tt.atomic_rmw") == 10
    assert fast._gluon_conv_config("conv_bwd_gluon", torch.device("cpu"), E, 4) is None
    assert fast._gluon_conv_config("conv_bwd_gluon", torch.device("cuda"), E, 5) is None  # wider than the width-4 frame
    fcfg = fast._gluon_conv_config("conv_fwd_gluon", torch.device("cuda"), E, 4)
    fwd = _compile_sm90(G.bimamba_conv_fwd_gluon_kernel,
                        dict(W=4, BLOCK_T=fcfg["BLOCK_T"], VE=fcfg["VE"], NUM_WARPS=fcfg["num_warps"]),
                        fcfg["num_warps"])
    assert "ttg.convert_layout" not in fwd.asm["ttgir"] and "ttg.local_alloc" not in fwd.asm["ttgir"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fast._gluon_conv_config("conv_bwd_gluon", torch.device("cuda"), E, 4) is None


def test_gluon_forward_launch_selection(monkeypatch):
    """Which forward runs where: Gluon on CUDA, with whole states per thread while a batch fills the SMs and each
    state over the fewest lanes that do otherwise (E_T shrinks first); never Gluon off CUDA, in the interpreter or
    for d_state > 32."""
    import torch

    from visionmamba.ops import fast

    monkeypatch.setattr(fast, "_sm_count", lambda index: 132)  # an H100 / H200
    cuda = torch.device("cuda")
    keys = ("N_L", "T", "num_warps", "E_T", "dirs")
    pick = lambda b, E, N=16: {k: fast._gluon_fwd_config(cuda, b, E, N)[k] for k in keys}  # noqa: E731
    # the shipped configuration (11 warps per SM: 1452 warps of one channel-lane per thread)
    assert pick(128, 384) == dict(N_L=1, T=4, num_warps=2, E_T=1, dirs=False)  # 1536 warps with whole states
    assert pick(64, 768)["N_L"] == 1
    # 1152 -> 2304 (32 channels, 4 rows per lane)
    assert pick(96, 384) == dict(N_L=2, T=8, num_warps=2, E_T=1, dirs=False)
    assert pick(64, 384)["N_L"] == 2 and pick(32, 768)["N_L"] == 2
    # 1248 px inference: 384 -> 768 -> 1536 warps with the directions in two warp groups of 2 (32 channels)
    assert pick(32, 384) == dict(N_L=2, T=8, num_warps=4, E_T=1, dirs=True)
    assert fast._gluon_fwd_config(cuda, 32, 384, 16)["block_e"] == 32
    # smaller batches: 4 lanes, the directions one after the other (dirs is the rung between 2 and 4 lanes)
    assert pick(16, 384) == dict(N_L=4, T=16, num_warps=4, E_T=1, dirs=False)
    assert pick(1, 384)["N_L"] == 4  # never more than max_lanes: too few warps, but still the Gluon forward
    assert pick(1, 384, N=2)["N_L"] == 2  # nor more lanes than state elements
    monkeypatch.setitem(fast.CONFIG, "fwd_gluon", [dict(max_e=1 << 30, T=4, E_T=2, num_warps=2, min_warps_per_sm=11)])
    assert pick(512, 384)["E_T"] == 2  # 3072 warps with 2 channels per thread: as configured
    # E_T halves first; no lanes nor warp groups configured
    assert pick(128, 384) == dict(N_L=1, T=4, num_warps=2, E_T=1, dirs=False)
    assert pick(32, 384)["N_L"] == 1
    assert fast._gluon_fwd_config(torch.device("cpu"), 128, 384, 16) is None
    assert fast._gluon_fwd_config(cuda, 512, 384, 64) is None  # d_state > 32: whole states would not fit a thread
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fast._gluon_fwd_config(cuda, 512, 384, 16) is None
    monkeypatch.setitem(fast.CONFIG, "fwd_gluon", [])
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fast._gluon_fwd_config(cuda, 512, 384, 16) is None


def _words_per_bank(addresses) -> int:
    """Most 4-byte words one warp-wide access puts on a single one of the 32 shared-memory banks (distinct words;
    a broadcast of one word counts once): the access takes at least that many wavefronts."""
    per_bank = {}
    for a in set(addresses):
        per_bank.setdefault(a % 32, set()).add(a)
    return max(len(words) for words in per_bank.values())


def _swizzled(layout, row: int, col: int, n: int) -> int:
    """Word offset of element (row, col) of a (rows, n) fp32 shared tile in a swizzled layout (Triton's rule: the
    vector slot of a column is XOR-ed with the row's phase)."""
    phase = (row // layout.per_phase) % layout.max_phase
    return row * n + ((col // layout.vec) ^ phase) * layout.vec + col % layout.vec


@pytest.mark.parametrize("n", [8, 16, 32])
@pytest.mark.parametrize("n_l", [1, 2])
def test_backward_dbdc_terms_move_through_shared_memory_without_bank_conflicts(n, n_l):
    """The backward's dB / dC terms (the biggest shared-memory traffic of the kernel): each thread stores its channel's
    N / N_L states of a row as 16-byte vectors, and `reduce_layout` reads them back 4 states per thread. Both must
    spread a warp's words evenly over the 32 banks (`vec` words per bank: the 4 wavefronts of 512 bytes). The
    swizzle this replaced (per_phase 1 at N 16) put every store on half the banks: 8 wavefronts instead of 4, 48 %
    of the store wavefronts were conflicts and the H200 backward ran 6 % slower."""
    from visionmamba.ops import _fast_gluon as G

    layout = G._terms_layout(n)
    per_thread = n // n_l
    vec = layout.vec
    for warp in range(2):  # channels of the warp: 32 / N_L from warp * 32 / N_L
        for k in range(per_thread // vec):  # the thread's k-th 16-byte store of a row
            words = []
            for lane in range(32):
                c = warp * (32 // n_l) + lane // n_l
                first = (lane % n_l) * per_thread + k * vec
                words += [_swizzled(layout, c, first + i, n) for i in range(vec)]
            assert _words_per_bank(words) == vec, (n, n_l, k)
    # the read-back: reduce_layout's (rows, channels, states) thread grid, one register repetition at a time
    for block_e, num_warps in ((32 // n_l, 1), (2 * 32 // n_l, 2)):
        rl = G.reduce_layout(2, n, block_e, num_warps, red_k=2)
        (_, tw_e, tw_n), (v,) = rl.threads_per_warp, rl.size_per_thread[2:]
        we = rl.warps_per_cta[1]
        reps = block_e // (tw_e * we)
        for rep in range(reps):
            words = []
            for lane in range(32):
                it, ie, i_n = lane // (tw_e * tw_n), (lane // tw_n) % tw_e, lane % tw_n
                c = ie + rep * tw_e * we  # warp 0's channels
                row_base = it * block_e * n  # each (token) slot its own (BLOCK_E, N) tile
                words += [row_base + _swizzled(layout, c, i_n * v + i, n) for i in range(v)]
            assert _words_per_bank(words) == v, (n, n_l, rep)
