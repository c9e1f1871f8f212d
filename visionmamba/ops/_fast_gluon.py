"""Forward and backward of the `fast` bidirectional selective scan, and of its two depthwise convs + SiLU (at the end
of the file), in Gluon (Triton's explicit-layout dialect), CUDA only.

Same maths, inputs and outputs as `bimamba_fwd_kernel` / `bimamba_bwd_kernel` in `visionmamba.ops._fast_kernels`.
Every register tile has a layout chosen here instead of by the compiler, all of them slices of ONE 3-D layout over
(T, BLOCK_E, N), with the chunk axis T in each thread and each thread owning whole states (N_L = 1) or 1 / N_L of
them (backward N_L = 2; forward N_L = 2 or 4 for small batches, where whole states per thread leave SMs idle):

    L3 = blocked(size_per_thread [T, E_T, N / N_L], threads_per_warp [1, 32 / N_L, N_L], warps [1, num_warps, 1])

so the recurrences run row by row in registers (one FMA per state element and token, no scan combine, no shuffle:
`_row` extracts a row for free), the sums over the state (y = <h, C> and the two behind dx and dΔ) are in-thread, and
softplus(dt + bias), the gating and every other per-(token, channel) term run once per channel instead of once per lane.
The kernels have no layout conversion. B and C are the same for every channel: a program loads each (T, N) tile once in
a compact layout and stages it through a double-buffered shared tile that every thread reads row by row as a broadcast
(one barrier per chunk; chunk c computes while chunk c + 1's B and C go to shared memory and chunk c + 2's tiles are
in flight).

Backward (per direction; with SPLIT the two directions run in separate programs): phase 1 stores the state entering
every segment of SEG chunks (nothing to do when the sequence is one segment); per segment, from the last, 2a walks
forward storing the state entering each chunk into per-program scratch (both walks take WALK_K chunks per step, in a
twin of L3 with WALK_K T rows per thread: `_walk`), and 2b takes the chunks in reverse: the states
again (keeping h_t and a_t), then the adjoint dh_t = gy_t C_t + a_{t+1} dh_{t+1} row by row. dB and dC are sums over
channels: each thread stores its rows' terms to shared memory (16-byte stores) and, once per RED_K chunks, the program
reads them back in `reduce_layout`, summing mostly in-thread. As in the forward, with N_L = 2 the per-(token, channel)
work of the walks and of 2b (loads, softplus, gating, the dx / dΔ / dz terms, stores) runs in a row layout where each
of a channel's lanes takes its own rows, instead of both lanes repeating it: Δ, Δx, gy go to the state layout and
y, s1, s2 come back (H200, B 128, L 197, E 384: 396 M warp instructions instead of 517 M, backward launch 0.733
against 0.761 ms, the walk's loop 539 instead of 685 SASS instructions per step and 2b's 569 instead of 648 per chunk;
B 32, L 6085: 6.86 against 8.10 ms). The kernel is as much L1 / shared-memory bound as issue bound: the dB / dC
terms' tile is swizzled per 32-bank line (`_terms_layout`) and the scratch is thread-major (`_scratch_slot`), which
took the L1 data pipe from 80 % to 75 % of its wavefronts and the launch from 0.735 to 0.685 ms at E 384 (H200).

Why: compiled offline for sm_90 (triton 3.6), the Triton backward's chunk loop took ~58 SASS instructions per state
element, 25 of them shuffles (the compiler spreads N over 4-16 lanes, converts every per-token tile between its load
layout and the state layout, and lowers the reverse `associative_scan` to shuffles although T is in-thread). The
previous Gluon backward (4 lanes per state, 2 channels per thread) took ~67 per element over phases 2a and 2b, a third
of them per-(token, channel) work repeated on every lane and cross-lane sums; this one ~36 (N_L 1) or ~49 (N_L 2),
with up to 2x the resident warps at N_L 2. Measured (H200, B 128, L 197, bf16, backward launch): 0.92 / 1.65 ms at
E 384 / 768 against 1.17 / 2.26 ms for the previous Gluon backward and 1.60 / 3.13 ms for the Triton one; at B 32, L
6085, E 384: 7.6 against 13.6 ms. The forward's loop: 9.1 / 11.1 instructions per element (first / second pass) against
12.8 / 14.2 for the Triton forward, with one MUFU exponential per element (~8.5) as the floor; 0.159 / 0.297 ms against
0.208 / 0.403 ms (H100). With the state over N_L lanes the forward's per-(token, channel) work is not repeated on
every lane: each lane takes T / N_L rows of it and Δ, Δx and y cross between the lanes (`_lanes`); at 1248 px (B 32,
L 6085, E 384, N_L 4, T 16, 4 warps) it runs 1.44 ms against 2.13-2.23 with whole states (too few warps) and 2.44
for the Triton forward (H200). At that batch `bimamba_fwd_dirs_gluon_kernel` now runs the two directions at once in
two warp groups of a program (the direction is a tensor axis over the warps), which doubles the warps and lets states
stay on 2 lanes: 1.31 ms. Gluon is not run by Triton's CPU interpreter: the CPU tests run the Triton kernels and compile
these for sm_90 (checking for layout conversions); the GPU tests check both sets against the reference.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# the CTA barrier is `thread_barrier` in triton 3.6 and `barrier` in later releases (Gluon is experimental), and a
# shared-memory view of other shape is `_reinterpret` in 3.6 and `reinterpret` later (a constexpr picks the branch)
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_REINTERPRET_PUBLIC: gl.constexpr = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))


@gluon.jit
def _as_rows(smem, ROWS: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr):
    """A (K, T, BLOCK_E, N) shared tile as (ROWS = K T, BLOCK_E, N): the same bytes (the layout is per (T, ...) slot)."""
    if _REINTERPRET_PUBLIC:
        view = smem.reinterpret(gl.float32, [ROWS, BLOCK_E, N], smem.layout)
    else:
        view = smem._reinterpret(gl.float32, [ROWS, BLOCK_E, N], smem.layout)
    return view


@gluon.constexpr_function
def _row_layout(state_layout, rows, e_t, n_l, num_warps, dirs=False):
    """Layout of the per-(token, channel) (rows, channels) tiles beside 3-D state tiles in `state_layout` =
    blocked([rows, E_T, N / N_L], lanes [1, 32 / N_L, N_L]): with the state over N_L > 1 lanes, lane j of a channel's
    N_L lanes holds rows / N_L of the rows (none repeats another's work; `_lanes` converts); with whole states per
    thread, the state layout's own slice (nothing to convert). With ``dirs``, the same with a leading direction axis
    over two warp groups: (2, rows, channels) beside the 4-D blocked([1, rows, E_T, N / N_L]) state layout."""
    if n_l == 1:
        return gl.SliceLayout(3 if dirs else 2, state_layout)
    if dirs:
        return gl.BlockedLayout(size_per_thread=[1, rows // n_l, e_t], threads_per_warp=[1, n_l, 32 // n_l],
                                warps_per_cta=[2, 1, num_warps // 2], order=[1, 2, 0])
    return gl.BlockedLayout(size_per_thread=[rows // n_l, e_t], threads_per_warp=[n_l, 32 // n_l],
                            warps_per_cta=[1, num_warps], order=[0, 1])


@gluon.constexpr_function
def _terms_layout(n):
    """Shared layout of one (T, BLOCK_E, N) slot of the backward's dB / dC terms, N fp32 states per channel row. A
    warp stores them as 16-byte vectors, each thread its channel's states (or its lane's part of them); the vector
    slots of a row are XOR-swizzled with the row's phase so that one store spreads over all 32 banks. A row is N * 4
    bytes, 128 / (4 N) rows to one 32-bank line: rows that share a line must share a phase (per_phase), else the
    swizzle only permutes slots inside each half of the line and half the banks take all the stores (measured at N 16
    with per_phase 1: 8.4 wavefronts per 16-byte store instead of 4, 48 % of the store wavefronts bank conflicts)."""
    vec = min(4, n)
    return gl.SwizzledSharedLayout(vec=vec, per_phase=max(1, 32 // n), max_phase=max(1, n // vec), order=[2, 1, 0])


@gluon.jit
def _ex2_ftz(v):
    """2^v as one MUFU.EX2 (ex2.approx.ftz: results below 2^-126 flush to zero); `gl.exp` adds a denormal range check
    (a compare and two predicated multiplies) to every call."""
    return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [v], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _rcp_ftz(v):
    """1 / v as one MUFU.RCP (rcp.approx.ftz, within 1 ulp); the IEEE division adds refinement FMAs and a slow-path
    branch (BSSY / BSYNC) to every call, which per (token, channel) cost more than a state update."""
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [v], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _softplus(v):
    """torch's softplus, as max(v, 0) + log1p(e^-|v|), and w = e^-|v| (for `_sigmoid_w`). log1p(w), w in (0, 1]: one
    MUFU.LG2 of 1 + w (`gl.log` lowers to a ~20-instruction polynomial, which per (token, channel) costs more than a
    state update), or below w = 1/16, where lg2.approx's absolute error (2^-22.6) would be large relative to the
    result, the series to w^4 (relative error < 3e-6 on both sides). Above v = 20, v + log1p(e^-v) rounds to v, as
    torch's threshold returns."""
    w = _ex2_ftz(gl.abs(v) * -1.4426950408889634)
    lg2 = gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + w], dtype=gl.float32, is_pure=True,
                                    pack=1)
    series = w * (1.0 - w * (0.5 - w * (0.3333333333 - w * 0.25)))
    return gl.maximum(v, 0.0) + gl.where(w < 0.0625, series, lg2 * 0.6931471805599453), w


@gluon.jit
def _sigmoid_w(v, w):
    """sigmoid(v) from w = e^-|v| (`_softplus`'s): no second exponential."""
    r = _rcp_ftz(1.0 + w)
    return gl.where(v >= 0.0, r, w * r)


@gluon.jit
def _sigmoid_ftz(v):
    """1 / (1 + 2^(-v log2 e)) with the flush-to-zero MUFU approximations: two MUFU instructions and an add."""
    return _rcp_ftz(1.0 + _ex2_ftz(v * -1.4426950408889634))


@gluon.jit
def _rows(c, L, T: gl.constexpr, layout: gl.constexpr, REVERSE: gl.constexpr):
    """Token index of each row of chunk c (time reversed for the reverse direction), in `layout`, and its validity."""
    tau = c * T + gl.arange(0, T, layout=layout)
    valid = (tau < L) & (tau >= 0)
    if REVERSE:
        t = L - 1 - tau
    else:
        t = tau
    return gl.where(valid, t, 0), valid


@gluon.jit
def _tile(ptr, b_off, t, s_l, cols, mask):
    """(T, X) tile of a (B, L, X) tensor with unit stride along X, rows t, as fp32 (the layout is t's and cols')."""
    return gl.load(ptr + b_off + t[:, None] * s_l + cols[None, :], mask=mask, other=0.0).to(gl.float32)


@gluon.jit
def _bc_chunk(b_ptr, c_ptr, c, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, T: gl.constexpr, LBC: gl.constexpr,
              REVERSE: gl.constexpr):
    """B and C (T, N) of chunk c in the compact layout LBC (each value loaded by one thread), as fp32."""
    t, v = _rows(c, L, T, gl.SliceLayout(1, LBC), REVERSE)
    return _tile(b_ptr, b64 * s_bb, t, s_bl, n_bc, v[:, None]), _tile(c_ptr, b64 * s_cb, t, s_cl, n_bc, v[:, None])


@gluon.jit
def _xdt_chunk(x_ptr, dt_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, e_te, e_mask_te, T: gl.constexpr,
               LTE: gl.constexpr, REVERSE: gl.constexpr):
    """x and dt (T, BLOCK_E) of chunk c in LTE, as fp32."""
    t, v = _rows(c, L, T, gl.SliceLayout(1, LTE), REVERSE)
    m = v[:, None] & e_mask_te[None, :]
    return _tile(x_ptr, b64 * s_xb, t, s_xl, e_te, m), _tile(dt_ptr, b64 * s_dtb, t, s_dtl, e_te, m)


@gluon.jit
def _row(rows3, x3, i: gl.constexpr, AXIS: gl.constexpr = 0):
    """Row i of a (T, BLOCK_E, N) tile as (BLOCK_E, N) (T on axis AXIS: 1 with a leading direction axis). T lives in
    each thread and `rows3` is a compile-time constant per register, so the select and the adds of -0.0 fold away: a
    register rename, no instruction. (-0.0 as a tensor: a Python -0.0 becomes +0.0 in `where`, since Triton builds
    constants equal to 0 as the null value, and x + 0.0 does not fold.)"""
    return gl.sum(gl.where(rows3 == i, x3, gl.zeros_like(x3) * -1.0), axis=AXIS)


@gluon.jit
def _lanes(v, layout: gl.constexpr, N_L: gl.constexpr):
    """The forward's one data-moving conversion, between a (T, BLOCK_E) tile in LROW (each of a channel's N_L lanes
    holding its own rows) and in L3's slice (every lane holding all rows): with N_L = 1 they are the same layout and
    nothing is emitted."""
    if N_L == 1:
        out = v
    else:
        out = gl.convert_layout(v, layout)
    return out


@gluon.jit
def _fwd_pass(x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, z_ptr, out_ptr, pid_b, pid_e, L, E,
              s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol,
              REVERSE: gl.constexpr, FIRST: gl.constexpr, T: gl.constexpr, BLOCK_E: gl.constexpr,
              N: gl.constexpr, L3: gl.constexpr, LBC: gl.constexpr, LROW: gl.constexpr, N_L: gl.constexpr):
    """One direction of the forward: y_t = <h_t, C_t> + D x_t, chunk by chunk and row by row (each thread owns whole
    states, or N / N_L of them with the state split over N_L lanes). B and C of a chunk are loaded once per program in
    the compact layout LBC and staged through a double-buffered shared tile, from which every thread reads each row as
    a broadcast. Loads run ahead: chunk c computes while chunk c + 1's B and C go to shared memory and chunk c + 2's
    tiles are in flight. The per-(token, channel) work (loads, softplus, D skip, gating, stores) runs in LROW: with
    N_L lanes per channel each lane takes T / N_L of the chunk's rows instead of all lanes repeating it, Δ and Δx go
    to the state layout (a broadcast within the lane group) and y = <h, C> comes back from it. The first pass stores
    y; the second reads it back and stores (y_f + y_b) / 2 * SiLU(z)."""
    LTE: gl.constexpr = gl.SliceLayout(2, L3)  # (T, BLOCK_E), replicated over the lanes of a channel
    LEN: gl.constexpr = gl.SliceLayout(0, L3)  # (BLOCK_E, N)
    e_r = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, LROW))
    e_mask_r = e_r < E
    e_en = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, LEN))
    n_en = gl.arange(0, N, layout=gl.SliceLayout(0, LEN))
    n_bc = gl.arange(0, N, layout=gl.SliceLayout(0, LBC))
    rows3 = gl.arange(0, T, layout=gl.SliceLayout(1, LTE))[:, None, None]
    A2 = gl.load(a_ptr + e_en[:, None] * N + n_en[None, :], mask=(e_en < E)[:, None], other=0.0) * 1.4426950408889634
    Dv = gl.load(d_ptr + e_r, mask=e_mask_r, other=0.0)
    bias = gl.load(bias_ptr + e_r, mask=e_mask_r, other=0.0)
    b64 = pid_b.to(gl.int64)
    # (2, T, N): chunk c in buffer c % 2; row i of a buffer is the (1, N) slice every thread loads whole, in LEN
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    b_smem = gl.allocate_shared_memory(gl.float32, [2, T, N], SMEM)
    c_smem = gl.allocate_shared_memory(gl.float32, [2, T, N], SMEM)
    h = gl.zeros((BLOCK_E, N), gl.float32, LEN)
    cx, cdt, cB, cC, cz, cprev = _fwd_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, 0, L, b64, s_xb, s_xl,
                                             s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol, e_r,
                                             e_mask_r, n_bc, T, LROW, LBC, REVERSE, FIRST)
    b_smem.index(0).store(cB)
    c_smem.index(0).store(cC)
    nx, ndt, nB, nC, nz, nprev = _fwd_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, 1, L, b64, s_xb, s_xl,
                                             s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol, e_r,
                                             e_mask_r, n_bc, T, LROW, LBC, REVERSE, FIRST)
    for c in range(0, gl.cdiv(L, T)):
        t_r, v_r = _rows(c, L, T, gl.SliceLayout(1, LROW), REVERSE)
        m_r = v_r[:, None] & e_mask_r[None, :]
        # one barrier per chunk: chunk c's B, C (stored last iteration) are visible, and every thread is done with
        # chunk c - 1's buffer, which chunk c + 1's B, C overwrite now
        _cta_barrier()
        b_smem.index(1 - c % 2).store(nB)
        c_smem.index(1 - c % 2).store(nC)
        b_buf = b_smem.index(c % 2)
        c_buf = c_smem.index(c % 2)
        x, dt, z, prev = cx, cdt, cz, cprev
        cx, cdt, cz, cprev = nx, ndt, nz, nprev
        nx, ndt, nB, nC, nz, nprev = _fwd_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, c + 2, L, b64, s_xb,
                                                 s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol,
                                                 e_r, e_mask_r, n_bc, T, LROW, LBC, REVERSE, FIRST)
        delta = gl.where(m_r, _softplus(dt + bias[None, :])[0], 0.0)
        delta3 = _lanes(delta, LTE, N_L)[:, :, None]  # (T, BLOCK_E, 1)
        dx3 = _lanes(delta * x, LTE, N_L)[:, :, None]
        y3 = gl.zeros((T, BLOCK_E, 1), gl.float32, L3)
        for i in gl.static_range(T):
            B_i = b_buf.slice(i, 1).load(LEN)  # (1, N), the same in every thread
            C_i = c_buf.slice(i, 1).load(LEN)
            h = gl.exp2(_row(rows3, delta3, i) * A2) * h + _row(rows3, dx3, i) * B_i
            y3 = gl.where(rows3 == i, y3 + gl.sum(h * C_i, axis=1, keep_dims=True)[None, :, :], y3)
        y = _lanes(gl.sum(y3, axis=2), LROW, N_L) + Dv[None, :] * x  # (T, BLOCK_E); axis 2 has size 1
        o_ptrs = out_ptr + b64 * s_ob + t_r[:, None] * s_ol + e_r[None, :]
        if FIRST:
            gl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_r)
        else:
            gl.store(o_ptrs, _gate(prev, y, z).to(out_ptr.dtype.element_ty), mask=m_r)


@gluon.jit
def _fwd_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb,
                s_cl, s_zb, s_zl, s_ob, s_ol, e_r, e_mask_r, n_bc, T: gl.constexpr, LROW: gl.constexpr,
                LBC: gl.constexpr, REVERSE: gl.constexpr, FIRST: gl.constexpr):
    """Chunk c's x, dt (T, BLOCK_E) in LROW and B, C (T, N) in the compact LBC, as fp32; for the second pass also z
    and the first pass's y (written by this program before the barrier between the passes), else x twice (unused)."""
    x, dt = _xdt_chunk(x_ptr, dt_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, e_r, e_mask_r, T, LROW, REVERSE)
    Bm, Cm = _bc_chunk(b_ptr, c_ptr, c, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, T, LBC, REVERSE)
    if FIRST:
        z = x
        prev = x
    else:
        t_r, v_r = _rows(c, L, T, gl.SliceLayout(1, LROW), REVERSE)
        m_r = v_r[:, None] & e_mask_r[None, :]
        z = _tile(z_ptr, b64 * s_zb, t_r, s_zl, e_r, m_r)
        prev = _tile(out_ptr, b64 * s_ob, t_r, s_ol, e_r, m_r)
    return x, dt, Bm, Cm, z, prev


@gluon.jit
def bimamba_fwd_gluon_kernel(
        xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr,
        xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr,
        z_ptr, out_ptr, L, E,
        s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl,
        s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl,
        s_zb, s_zl, s_ob, s_ol,
        T: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr, E_T: gl.constexpr, NUM_WARPS: gl.constexpr,
        N_L: gl.constexpr = 1):
    """`bimamba_fwd_kernel`'s contract (arguments, grid (channel blocks, batch)); BLOCK_E = E_T * (32 / N_L) *
    NUM_WARPS: each thread owns E_T channels' whole states (N_L = 1) or, with N_L lanes per channel (E_T = 1, T a
    multiple of N_L: small batches of long sequences, where whole states per thread leave most of the GPU idle), N / N_L
    of one channel's state."""
    gl.static_assert(BLOCK_E == E_T * (32 // N_L) * NUM_WARPS)
    gl.static_assert(N <= 32)
    gl.static_assert(N % N_L == 0)
    gl.static_assert(T % N_L == 0)
    gl.static_assert(N_L == 1 or E_T == 1)
    L3: gl.constexpr = gl.BlockedLayout(size_per_thread=[T, E_T, N // N_L], threads_per_warp=[1, 32 // N_L, N_L],
                                        warps_per_cta=[1, NUM_WARPS, 1], order=[2, 1, 0])
    # per-(token, channel) tiles: lane j of a channel's N_L lanes holds rows j, j + N_L, ... (the lane order of L3)
    LROW: gl.constexpr = _row_layout(L3, T, E_T, N_L, NUM_WARPS)
    # (T, N) B and C tiles: one element per thread (each loaded once per program, not once per thread)
    LBC: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32 // N, N],
                                         warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    pid_e = gl.program_id(0)
    pid_b = gl.program_id(1)
    _fwd_pass(xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr, z_ptr, out_ptr, pid_b, pid_e, L, E,
              s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl, s_zb, s_zl, s_ob, s_ol,
              False, True, T, BLOCK_E, N, L3, LBC, LROW, N_L)
    # pass 2 reads what other threads of this program wrote in pass 1 (y), and its first shared-memory stores must not
    # race pass 1's last reads
    _cta_barrier()
    _fwd_pass(xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr, z_ptr, out_ptr, pid_b, pid_e, L, E,
              s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl, s_zb, s_zl, s_ob, s_ol,
              True, False, T, BLOCK_E, N, L3, LBC, LROW, N_L)


@gluon.jit
def _dir_rows(c, K, L, T: gl.constexpr, d, layout: gl.constexpr):
    """Token index (2, T) of each row of step c for both directions (d: (2, 1), 0 forward, 1 reverse), on one chunk
    grid: the forward direction's chunk c, and the reverse's chunk K - 1 - c from its last token (its first chunk may
    start past L: those rows are masked, a zero step); and their validity."""
    tau = c * T + gl.arange(0, T, layout=layout)[None, :]
    t = gl.where(d == 0, tau, K * T - 1 - tau)
    valid = (t < L) & (t >= 0)
    return gl.where(valid, t, 0), valid


@gluon.jit
def _dirs_inputs(x_base, x_sl, dt_base, dt_sl, b_base, b_sl, c_base, c_sl, z_base, s_zl, c, K, L, with_z, d_r, d_bc,
                 e_r, e_mask, n_bc, T: gl.constexpr, LROW: gl.constexpr, LBC: gl.constexpr):
    """Step c's x, dt and (with_z) z (2, T, BLOCK_E) in LROW and B, C (2, T, N) in the compact LBC, as fp32; the
    bases and row strides are per direction ((2, 1) tensors), z is shared."""
    t, v = _dir_rows(c, K, L, T, d_r, gl.SliceLayout(0, gl.SliceLayout(2, LROW)))
    m = v[:, :, None] & e_mask
    cols = e_r[None, None, :]
    x = gl.load(x_base[:, :, None] + (t * x_sl)[:, :, None] + cols, mask=m, other=0.0).to(gl.float32)
    dt = gl.load(dt_base[:, :, None] + (t * dt_sl)[:, :, None] + cols, mask=m, other=0.0).to(gl.float32)
    z = gl.load(z_base + (t * s_zl)[:, :, None] + cols, mask=m & with_z, other=0.0).to(gl.float32)
    tb, vb = _dir_rows(c, K, L, T, d_bc, gl.SliceLayout(0, gl.SliceLayout(2, LBC)))
    n = n_bc[None, None, :]
    Bm = gl.load(b_base[:, :, None] + (tb * b_sl)[:, :, None] + n, mask=vb[:, :, None], other=0.0).to(gl.float32)
    Cm = gl.load(c_base[:, :, None] + (tb * c_sl)[:, :, None] + n, mask=vb[:, :, None], other=0.0).to(gl.float32)
    return x, dt, z, Bm, Cm


@gluon.jit
def _dirs_chunk(h, x, dt, m, A2, Dv, bias, b_buf, c_buf, rows4, T: gl.constexpr, BLOCK_E: gl.constexpr,
                L4: gl.constexpr, LROW: gl.constexpr, N_L: gl.constexpr):
    """One step of both directions: the state through the chunk's rows (row by row in registers, B and C rows read
    from the shared tiles as broadcasts) and y = <h, C> + D x (2, T, BLOCK_E) in LROW."""
    LTE: gl.constexpr = gl.SliceLayout(3, L4)  # (2, T, BLOCK_E), replicated over the lanes of a channel
    LEN: gl.constexpr = gl.SliceLayout(1, L4)  # (2, BLOCK_E, N)
    delta = gl.where(m, _softplus(dt + bias[:, None, :])[0], 0.0)
    delta4 = _lanes(delta, LTE, N_L)[:, :, :, None]  # (2, T, BLOCK_E, 1)
    dx4 = _lanes(delta * x, LTE, N_L)[:, :, :, None]
    y4 = gl.zeros((2, T, BLOCK_E, 1), gl.float32, L4)
    for i in gl.static_range(T):
        B_i = b_buf.slice(i, 1, dim=1).load(LEN)  # (2, 1, N), the same in every thread of a direction
        C_i = c_buf.slice(i, 1, dim=1).load(LEN)
        h = gl.exp2(_row(rows4, delta4, i, 1) * A2) * h + _row(rows4, dx4, i, 1) * B_i
        y4 = gl.where(rows4 == i, y4 + gl.sum(h * C_i, axis=2, keep_dims=True)[:, None, :, :], y4)
    return h, _lanes(gl.sum(y4, axis=3), LROW, N_L) + Dv[:, None, :] * x


@gluon.jit
def _dirs_step(b_smem, c_smem, c, nB, nC, x_base, x_sl, dt_base, dt_sl, b_base, b_sl, c_base, c_sl, z_base, s_zl,
               K, L, H, d_r, d_bc, e_r, e_mask, n_bc, T: gl.constexpr, LROW: gl.constexpr, LBC: gl.constexpr):
    """Start of step c: one barrier (step c's B, C, stored last step, are visible; every thread is done with step
    c - 1's buffer, which step c + 1's B, C overwrite now; y stored by the other direction in earlier steps is
    visible), and step c + 2's tiles put in flight (z from step H on, where the gating starts). Returns those tiles
    and step c's token rows (2, T) and (2, T, BLOCK_E) mask in LROW."""
    _cta_barrier()
    b_smem.index(1 - c % 2).store(nB)
    c_smem.index(1 - c % 2).store(nC)
    nx, ndt, nz, nB, nC = _dirs_inputs(x_base, x_sl, dt_base, dt_sl, b_base, b_sl, c_base, c_sl, z_base, s_zl, c + 2,
                                       K, L, c + 2 >= H, d_r, d_bc, e_r, e_mask, n_bc, T, LROW, LBC)
    t_r, v_r = _dir_rows(c, K, L, T, d_r, gl.SliceLayout(0, gl.SliceLayout(2, LROW)))
    return nx, ndt, nz, nB, nC, t_r, v_r[:, :, None] & e_mask


@gluon.jit
def _gate(prev, y, z):
    """(y_f + y_b) / 2 * SiLU(z)."""
    return (prev + y) * 0.5 * (z * _sigmoid_ftz(z))


@gluon.jit
def bimamba_fwd_dirs_gluon_kernel(
        xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr,
        xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr,
        z_ptr, out_ptr, L, E,
        s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl,
        s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl,
        s_zb, s_zl, s_ob, s_ol, yb_ptr, s_ybb, s_ybl,
        T: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr, E_T: gl.constexpr, NUM_WARPS: gl.constexpr,
        N_L: gl.constexpr = 1):
    """`bimamba_fwd_gluon_kernel` with the two directions at once, each in its own group of NUM_WARPS / 2 warps
    (BLOCK_E = E_T * (32 / N_L) * NUM_WARPS / 2): twice the warps for the same channels, for batches too small to
    fill the GPU, at the forward's per-chunk cost (no pass waits for the other). Both walk one chunk grid from
    opposite ends: at step c the forward direction takes chunk c, the reverse chunk K - 1 - c. Until the two meet
    (steps < H = K // 2) each stores its y; after, the other direction's y of these tokens is already stored (an
    earlier step, before this step's barrier), and each stores (y_f + y_b) / 2 * SiLU(z). With K odd both take the
    middle chunk at step H: the forward's y is stored first, then the reverse gates it. The direction is the leading
    tensor axis, over the two warp groups, so every instruction (and barrier) is common to both.

    The forward's y goes to out, the reverse's to yb (a (B, L, E) tensor of out's dtype): out itself, or, to write
    over x_f in place (out = x_f), x_b. Each direction reads its x of a chunk before its y goes there, and x_f is
    read only by the forward direction (which at each chunk stores after reading), x_b only by the reverse."""
    gl.static_assert(2 * BLOCK_E == E_T * (32 // N_L) * NUM_WARPS)
    gl.static_assert(N <= 32)
    gl.static_assert(N % N_L == 0)
    gl.static_assert(T % N_L == 0)
    gl.static_assert(N_L == 1 or E_T == 1)
    W2: gl.constexpr = NUM_WARPS // 2
    L4: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, T, E_T, N // N_L], threads_per_warp=[1, 1, 32 // N_L, N_L],
                                        warps_per_cta=[2, 1, W2, 1], order=[3, 2, 1, 0])
    LROW: gl.constexpr = _row_layout(L4, T, E_T, N_L, NUM_WARPS, True)
    LBC: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 1], threads_per_warp=[1, 32 // N, N],
                                         warps_per_cta=[2, W2, 1], order=[2, 1, 0])
    LEN: gl.constexpr = gl.SliceLayout(1, L4)  # (2, BLOCK_E, N)
    LDE: gl.constexpr = gl.SliceLayout(1, LROW)  # (2, BLOCK_E)
    pid_e = gl.program_id(0)
    pid_b = gl.program_id(1)
    b64 = pid_b.to(gl.int64)
    # per-direction operands as (2, 1) tensors: row 0 the forward direction's, row 1 the reverse's
    d_r = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, LROW)))[:, None]
    d_e = gl.arange(0, 2, layout=gl.SliceLayout(1, LDE))[:, None]
    d_bc = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, LBC)))[:, None]
    e_r = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, LDE))
    e_mask = (e_r < E)[None, None, :]
    Dv = gl.load(gl.where(d_e == 0, Df_ptr, Db_ptr) + e_r[None, :], mask=(e_r < E)[None, :], other=0.0)
    bias = gl.load(gl.where(d_e == 0, biasf_ptr, biasb_ptr) + e_r[None, :], mask=(e_r < E)[None, :], other=0.0)
    d_en = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, LEN)))[:, None, None]
    e_en = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, gl.SliceLayout(2, LEN)))[None, :, None]
    n_en = gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, LEN)))[None, None, :]
    A2 = gl.load(gl.where(d_en == 0, Af_ptr, Ab_ptr) + e_en * N + n_en, mask=(e_en < E) & (n_en < N),
                 other=0.0) * 1.4426950408889634
    x_base = gl.where(d_r == 0, xf_ptr + b64 * s_xfb, xb_ptr + b64 * s_xbb)
    x_sl = gl.where(d_r == 0, s_xfl, s_xbl)
    dt_base = gl.where(d_r == 0, dtf_ptr + b64 * s_dtfb, dtb_ptr + b64 * s_dtbb)
    dt_sl = gl.where(d_r == 0, s_dtfl, s_dtbl)
    b_base = gl.where(d_bc == 0, Bf_ptr + b64 * s_Bfb, Bb_ptr + b64 * s_Bbb)
    b_sl = gl.where(d_bc == 0, s_Bfl, s_Bbl)
    c_base = gl.where(d_bc == 0, Cf_ptr + b64 * s_Cfb, Cb_ptr + b64 * s_Cbb)
    c_sl = gl.where(d_bc == 0, s_Cfl, s_Cbl)
    z_base = z_ptr + b64 * s_zb
    o_base = out_ptr + b64 * s_ob
    yb_base = yb_ptr + b64 * s_ybb
    # each direction's own y before the two meet, and where it finds the other's after
    own_base = gl.where(d_r == 0, o_base, yb_base)
    own_sl = gl.where(d_r == 0, s_ol, s_ybl)
    other_base = gl.where(d_r == 0, yb_base, o_base)
    other_sl = gl.where(d_r == 0, s_ybl, s_ol)
    n_bc = gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, LBC)))
    rows4 = gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))[None, :, None, None]
    K = gl.cdiv(L, T)
    H = K // 2
    # (buffer, direction, T, N): step c in buffer c % 2; row i of a direction is the (1, N) slice its threads load
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0])
    b_smem = gl.allocate_shared_memory(gl.float32, [2, 2, T, N], SMEM)
    c_smem = gl.allocate_shared_memory(gl.float32, [2, 2, T, N], SMEM)
    h = gl.zeros((2, BLOCK_E, N), gl.float32, LEN)
    cx, cdt, cz, cB, cC = _dirs_inputs(x_base, x_sl, dt_base, dt_sl, b_base, b_sl, c_base, c_sl, z_base, s_zl, 0, K,
                                       L, 0 >= H, d_r, d_bc, e_r, e_mask, n_bc, T, LROW, LBC)
    b_smem.index(0).store(cB)
    c_smem.index(0).store(cC)
    nx, ndt, nz, nB, nC = _dirs_inputs(x_base, x_sl, dt_base, dt_sl, b_base, b_sl, c_base, c_sl, z_base, s_zl, 1, K,
                                       L, 1 >= H, d_r, d_bc, e_r, e_mask, n_bc, T, LROW, LBC)
    # steps before the directions meet, and the middle chunk (K odd)
    for c in range(0, K - H):
        x, dt, z = cx, cdt, cz
        cx, cdt, cz = nx, ndt, nz
        nx, ndt, nz, nB, nC, t_r, m_r = _dirs_step(b_smem, c_smem, c, nB, nC, x_base, x_sl, dt_base, dt_sl, b_base,
                                                   b_sl, c_base, c_sl, z_base, s_zl, K, L, H, d_r, d_bc, e_r, e_mask,
                                                   n_bc, T, LROW, LBC)
        cols = e_r[None, None, :]
        own_ptrs = own_base[:, :, None] + (t_r * own_sl)[:, :, None] + cols
        h, y = _dirs_chunk(h, x, dt, m_r, A2, Dv, bias, b_smem.index(c % 2), c_smem.index(c % 2), rows4, T,
                           BLOCK_E, L4, LROW, N_L)
        if c < H:
            gl.store(own_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_r)
        else:  # the middle chunk, the same tokens in both directions: the forward's y first, then the reverse gates
            gl.store(own_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_r & (d_r[:, :, None] == 0))
            _cta_barrier()
            m_b = m_r & (d_r[:, :, None] == 1)
            o_ptrs = o_base + (t_r * s_ol)[:, :, None] + cols
            prev = gl.load(o_ptrs, mask=m_b, other=0.0).to(gl.float32)
            gl.store(o_ptrs, _gate(prev, y, z).to(out_ptr.dtype.element_ty), mask=m_b)
    # steps after: the other direction stored these tokens' y in an earlier step
    for c in range(K - H, K):
        x, dt, z = cx, cdt, cz
        cx, cdt, cz = nx, ndt, nz
        nx, ndt, nz, nB, nC, t_r, m_r = _dirs_step(b_smem, c_smem, c, nB, nC, x_base, x_sl, dt_base, dt_sl, b_base,
                                                   b_sl, c_base, c_sl, z_base, s_zl, K, L, H, d_r, d_bc, e_r, e_mask,
                                                   n_bc, T, LROW, LBC)
        cols = e_r[None, None, :]
        # the other direction's y, in flight while the chunk computes
        prev = gl.load(other_base[:, :, None] + (t_r * other_sl)[:, :, None] + cols, mask=m_r,
                       other=0.0).to(gl.float32)
        h, y = _dirs_chunk(h, x, dt, m_r, A2, Dv, bias, b_smem.index(c % 2), c_smem.index(c % 2), rows4, T,
                           BLOCK_E, L4, LROW, N_L)
        gl.store(o_base + (t_r * s_ol)[:, :, None] + cols, _gate(prev, y, z).to(out_ptr.dtype.element_ty), mask=m_r)


@gluon.jit
def _tiles_2b(x_ptr, dt_ptr, z_ptr, g_ptr, dz_ptr, c, L, E, b64, s_xb, s_xl, s_dtb, s_dtl, s_zb, s_zl,
              s_gb, s_gl, s_dzl, e_r, e_mask_r, T: gl.constexpr, BLOCK_E: gl.constexpr, LROW: gl.constexpr,
              REVERSE: gl.constexpr, FIRST: gl.constexpr):
    """Per-token tiles phase 2b reads for chunk c, in LROW (each of a channel's lanes its own rows): x, dt, z, g, the
    first pass's dz."""
    t_r, v_r = _rows(c, L, T, gl.SliceLayout(1, LROW), REVERSE)
    m_r = v_r[:, None] & e_mask_r[None, :]
    x, dt = _xdt_chunk(x_ptr, dt_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, e_r, e_mask_r, T, LROW, REVERSE)
    z = _tile(z_ptr, b64 * s_zb, t_r, s_zl, e_r, m_r)
    g = _tile(g_ptr, b64 * s_gb, t_r, s_gl, e_r, m_r)
    if FIRST:
        prev = gl.zeros((T, BLOCK_E), gl.float32, LROW)
    else:  # written by the first pass of this program (before the barrier between the passes)
        prev = _tile(dz_ptr, b64 * L * s_dzl, t_r, s_dzl, e_r, m_r)
    return x, dt, z, g, prev


@gluon.jit
def _scratch_slot(BLOCK_E: gl.constexpr, N: gl.constexpr, N_L: gl.constexpr, L3: gl.constexpr):
    """Offsets of a (BLOCK_E, N) state tile in one scratch slot (the state entering a chunk, stored by the walk and
    loaded back by 2b, each thread its own part), thread-major: a thread's N / N_L states of a channel are vectors of
    V = min(4, N / N_L), and vector k of every lane of a warp is one contiguous run of 32 V (512 bytes at V 4), so each
    16-byte access of the warp covers 4 whole 128-byte lines. Channel-major (e * N + n) spread every access over 8 half
    used lines: twice the L1 requests (the scratch was 17 % of the backward's L1 wavefronts)."""
    LEN: gl.constexpr = gl.SliceLayout(0, L3)
    S: gl.constexpr = N // N_L  # states per thread
    V: gl.constexpr = 4 if S >= 4 else S
    PER_WARP: gl.constexpr = 32 // N_L  # channels per warp
    e = gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, LEN))[:, None]
    n = gl.arange(0, N, layout=gl.SliceLayout(0, LEN))[None, :]
    lane = (e % PER_WARP) * N_L + n // S
    off = (e // PER_WARP) * (PER_WARP * N) + ((n % S) // V * 32 + lane) * V + n % V
    # runs of V states contiguous and V-aligned: tell the compiler, which cannot see it through // and %
    return gl.max_contiguous(gl.multiple_of(off, [1, V]), [1, V])


@gluon.jit
def _entering_state(scr_base, j, BLOCK_E: gl.constexpr, N: gl.constexpr, L3: gl.constexpr):
    """The state entering the segment's chunk j (scratch slot j, written by the walk); nothing for j < 0."""
    LEN: gl.constexpr = gl.SliceLayout(0, L3)
    zero = gl.zeros((BLOCK_E, N), gl.int32, LEN)
    return gl.load(scr_base + gl.maximum(j, 0) * BLOCK_E * N, mask=(zero + j) >= 0, other=0.0)


@gluon.jit
def _walk(x_ptr, dt_ptr, b_ptr, c_ptr, h, c_begin, count, st_base, st_stride, st_mask, bias_r, A2, wb_smem, L,
          b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, e_r, e_mask_r, n_bc,
          EVERY: gl.constexpr, T: gl.constexpr, K: gl.constexpr, L3: gl.constexpr, L3W: gl.constexpr,
          LBC: gl.constexpr, REVERSE: gl.constexpr, LRW: gl.constexpr, N_L: gl.constexpr):
    """Phases 1 and 2a: the state through chunks c_begin .. c_begin + count - 1 (c_begin a multiple of K), storing
    the state entering every EVERY-th of them (at st_base + k * st_stride) and the state leaving the last at the next
    slot. The walk takes K chunks (W = K T rows, layout L3W) per step, the next step's tiles in flight while this one
    computes, and B through a double-buffered shared tile (one barrier per step). Why K chunks: a loaded bf16 tile is
    packed into registers (two values in one) at the loop's back edge, which waits for the load. With one T-row chunk
    per step (as 2b) the walk was 38 % of the backward's stall samples on the H100, 2/3 of them on that wait; a step
    of K chunks hides most of the latency and pays the per-step work (addresses, masks, barrier) once per W rows.
    The per-(token, channel) work (loads, softplus, Δx) runs in LRW, each of a channel's N_L lanes taking W / N_L
    rows, as in 2b; e_r, e_mask_r, bias_r are in 2b's LROW slice (the same registers as LRW's)."""
    W: gl.constexpr = K * T
    LEN: gl.constexpr = gl.SliceLayout(0, L3)
    LTW: gl.constexpr = gl.SliceLayout(2, L3W)  # (W, BLOCK_E)
    LENW: gl.constexpr = gl.SliceLayout(0, L3W)  # (BLOCK_E, N): the same registers as LEN, so converts are free
    ew = gl.convert_layout(e_r, gl.SliceLayout(0, LRW), assert_trivial=True)
    ew_mask = gl.convert_layout(e_mask_r, gl.SliceLayout(0, LRW), assert_trivial=True)
    biasw = gl.convert_layout(bias_r, gl.SliceLayout(0, LRW), assert_trivial=True)
    A2w = gl.convert_layout(A2, LENW, assert_trivial=True)
    h = gl.convert_layout(h, LENW, assert_trivial=True)
    rows3 = gl.arange(0, W, layout=gl.SliceLayout(1, LTW))[:, None, None]
    sc0 = c_begin // K
    # rows at or past lim (the walk's end, or the sequence's) leave the state unchanged (a zero step)
    lim = gl.minimum((c_begin + count) * T, L)
    x, dt = _xdt_chunk(x_ptr, dt_ptr, sc0, L, b64, s_xb, s_xl, s_dtb, s_dtl, ew, ew_mask, W, LRW, REVERSE)
    cB, cC = _bc_chunk(b_ptr, c_ptr, sc0, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, W, LBC, REVERSE)  # C: unused
    _cta_barrier()  # the shared tile's previous readers are done
    wb_smem.index(0).store(cB)
    nB, nC = _bc_chunk(b_ptr, c_ptr, sc0 + 1, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, W, LBC, REVERSE)
    for j in range(0, gl.cdiv(count, K)):
        _cta_barrier()
        wb_smem.index(1 - j % 2).store(nB)
        b_buf = wb_smem.index(j % 2)
        cx, cdt = x, dt
        x, dt = _xdt_chunk(x_ptr, dt_ptr, sc0 + j + 1, L, b64, s_xb, s_xl, s_dtb, s_dtl, ew, ew_mask, W, LRW,
                           REVERSE)
        nB, nC = _bc_chunk(b_ptr, c_ptr, sc0 + j + 2, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, W, LBC, REVERSE)
        tau = (sc0 + j) * W + gl.arange(0, W, layout=gl.SliceLayout(1, LRW))  # time-order index, >= 0
        delta = gl.where((tau < lim)[:, None] & ew_mask[None, :], _softplus(cdt + biasw[None, :])[0], 0.0)
        delta3 = _lanes(delta, LTW, N_L)[:, :, None]  # (W, BLOCK_E, 1), all rows in every lane of a channel
        dx3 = _lanes(delta * cx, LTW, N_L)[:, :, None]
        for i in gl.static_range(W):
            if i % T == 0:  # entering chunk c_begin + cj
                cj = j * K + i // T
                gl.store(st_base + (cj // EVERY) * st_stride, gl.convert_layout(h, LEN, assert_trivial=True),
                         mask=st_mask & ((cj % EVERY == 0) & (cj < count)))
            h = gl.exp2(_row(rows3, delta3, i) * A2w) * h + _row(rows3, dx3, i) * b_buf.slice(i, 1).load(LENW)
    h = gl.convert_layout(h, LEN, assert_trivial=True)
    gl.store(st_base + gl.cdiv(count, EVERY) * st_stride, h, mask=st_mask)
    return h


@gluon.jit
def _bwd_pass(x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, z_ptr, g_ptr,
                   dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, ck_ptr, scr_ptr,
                   b_smem, c_smem, rb_smem, rc_smem, wb_smem, pid_b, pid_e, B, L, E,
                   s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_gb, s_gl, s_dzl,
                   REVERSE: gl.constexpr, FIRST: gl.constexpr, T: gl.constexpr, BLOCK_E: gl.constexpr,
                   N: gl.constexpr, SEG: gl.constexpr, ATOMIC: gl.constexpr, L3: gl.constexpr, LBC: gl.constexpr,
                   RL: gl.constexpr, WALK_K: gl.constexpr, L3W: gl.constexpr, RED_K: gl.constexpr,
                   LROW: gl.constexpr, LRW: gl.constexpr, N_L: gl.constexpr):
    """One direction of the backward (the module docstring has the phases)."""
    LTE: gl.constexpr = gl.SliceLayout(2, L3)  # (T, BLOCK_E), replicated over the lanes of a channel
    LEN: gl.constexpr = gl.SliceLayout(0, L3)  # (BLOCK_E, N)
    LRN: gl.constexpr = gl.SliceLayout(1, RL)  # (RED_K * T, N): the reduced dB / dC rows of a group of chunks
    e_te = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, LTE))
    e_mask_te = e_te < E
    e_en = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, LEN))
    n_en = gl.arange(0, N, layout=gl.SliceLayout(0, LEN))
    en_mask = (e_en < E)[:, None] & (n_en < N)[None, :]
    n_bc = gl.arange(0, N, layout=gl.SliceLayout(0, LBC))
    n_rn = gl.arange(0, N, layout=gl.SliceLayout(0, LRN))[None, :]
    s_rn = gl.arange(0, RED_K * T, layout=gl.SliceLayout(1, LRN))  # group row s: row s % T of chunk first - s // T
    rows3 = gl.arange(0, T, layout=gl.SliceLayout(1, LTE))[:, None, None]
    A2 = gl.load(a_ptr + e_en[:, None] * N + n_en[None, :], mask=en_mask, other=0.0) * 1.4426950408889634
    # the per-(token, channel) work runs in LROW (2b) and LRW (the walks): each of a channel's N_L lanes takes its
    # own rows
    e_r = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, LROW))
    e_mask_r = e_r < E
    Dv = gl.load(d_ptr + e_r, mask=e_mask_r, other=0.0)
    bias_r = gl.load(bias_ptr + e_r, mask=e_mask_r, other=0.0)
    b64 = pid_b.to(gl.int64)
    n_chunks = gl.cdiv(L, T)
    n_seg = gl.cdiv(n_chunks, SEG)
    ck_base = ck_ptr + b64 * n_seg * E * N + e_en[:, None] * N + n_en[None, :]
    n_eb = gl.cdiv(E, BLOCK_E)
    slots = gl.minimum(n_chunks, SEG)
    scr_base = scr_ptr + (b64 * n_eb + pid_e) * slots * (BLOCK_E * N) + _scratch_slot(BLOCK_E, N, N_L, L3)
    if ATOMIC:
        part_base = b64 * L * N
    else:
        part_base = (pid_e * B + b64) * L * N

    # phase 1: the state entering every segment (checkpoints; nothing to do when the sequence is one segment)
    h = gl.zeros((BLOCK_E, N), gl.float32, LEN)
    if n_seg > 1:
        h = _walk(x_ptr, dt_ptr, b_ptr, c_ptr, h, 0, (n_seg - 1) * SEG, ck_base, E * N, en_mask, bias_r, A2,
                  wb_smem, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, e_r, e_mask_r, n_bc,
                  SEG, T, WALK_K, L3, L3W, LBC, REVERSE, LRW, N_L)
    else:
        gl.store(ck_base, h, mask=en_mask)

    u = gl.zeros((BLOCK_E, N), gl.float32, LEN)  # a_{t+1} dh_{t+1} entering a chunk from the right
    dA_acc = gl.zeros((BLOCK_E, N), gl.float32, LEN)
    dD_acc = gl.zeros((T, BLOCK_E), gl.float32, LROW)  # summed over the rows (and lanes) at the end
    dbias_acc = gl.zeros((T, BLOCK_E), gl.float32, LROW)
    for ss in range(0, n_seg):
        s = n_seg - 1 - ss
        c0 = s * SEG
        nj = gl.minimum(n_chunks - c0, SEG)
        # 2a: the state entering each chunk of the segment, into this program's scratch slots (each thread reads
        # back only what it wrote: no barrier)
        h = gl.load(ck_base + s * E * N, mask=en_mask, other=0.0)
        # the scratch stores are unmasked (en_mask | True): 2b loads every slot, padding channels included (zeros)
        h = _walk(x_ptr, dt_ptr, b_ptr, c_ptr, h, c0, nj - 1, scr_base, BLOCK_E * N, en_mask | True, bias_r, A2,
                  wb_smem, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, e_r, e_mask_r, n_bc,
                  1, T, WALK_K, L3, L3W, LBC, REVERSE, LRW, N_L)
        # 2b: the chunks in reverse; per-token tiles and the entering state one chunk ahead, B and C two chunks
        # ahead (staged like the forward)
        px, pdt, pz, pg, pprev = _tiles_2b(x_ptr, dt_ptr, z_ptr, g_ptr, dz_ptr, c0 + nj - 1, L, E, b64, s_xb, s_xl,
                                           s_dtb, s_dtl, s_zb, s_zl, s_gb, s_gl, s_dzl, e_r, e_mask_r, T, BLOCK_E, LROW,
                                           REVERSE, FIRST)
        ph0 = _entering_state(scr_base, nj - 1, BLOCK_E, N, L3)
        cB, cC = _bc_chunk(b_ptr, c_ptr, c0 + nj - 1, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, T, LBC, REVERSE)
        _cta_barrier()  # the walk's last reads of the shared tile are done
        b_smem.index(0).store(cB)
        c_smem.index(0).store(cC)
        nB, nC = _bc_chunk(b_ptr, c_ptr, c0 + nj - 2, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, T, LBC, REVERSE)
        for jj in range(0, nj):
            j = nj - 1 - jj
            c = c0 + j
            t_r, v_r = _rows(c, L, T, gl.SliceLayout(1, LROW), REVERSE)
            m_r = v_r[:, None] & e_mask_r[None, :]
            # chunk c's B and C (stored last iteration) are visible, every thread is done with the buffer chunk c - 1's
            # overwrite now, and with the last group's reduction tiles
            _cta_barrier()
            grp = jj % RED_K  # this chunk's slot in the group of RED_K chunks whose dB / dC are reduced together
            rc_grp = rc_smem.index(grp)
            rb_grp = rb_smem.index(grp)
            b_smem.index(1 - jj % 2).store(nB)
            c_smem.index(1 - jj % 2).store(nC)
            b_buf = b_smem.index(jj % 2)
            c_buf = c_smem.index(jj % 2)
            x, dt, z, g, prev, h0 = px, pdt, pz, pg, pprev, ph0
            px, pdt, pz, pg, pprev = _tiles_2b(x_ptr, dt_ptr, z_ptr, g_ptr, dz_ptr, c - 1, L, E, b64, s_xb, s_xl,
                                               s_dtb, s_dtl, s_zb, s_zl, s_gb, s_gl, s_dzl, e_r, e_mask_r, T, BLOCK_E, LROW,
                                               REVERSE, FIRST)
            ph0 = _entering_state(scr_base, j - 1, BLOCK_E, N, L3)
            nB, nC = _bc_chunk(b_ptr, c_ptr, c - 2, L, b64, s_bb, s_bl, s_cb, s_cl, n_bc, T, LBC, REVERSE)
            sp, w = _softplus(dt + bias_r[None, :])
            delta = gl.where(m_r, sp, 0.0)
            dx_ = delta * x
            sz = _sigmoid_ftz(z)
            gy = g * (z * sz) * 0.5
            # to the state layout (every lane of a channel holding all rows): (T, BLOCK_E, 1)
            delta3 = _lanes(delta, LTE, N_L)[:, :, None]
            dx3 = _lanes(dx_, LTE, N_L)[:, :, None]
            gy3 = _lanes(gy, LTE, N_L)[:, :, None]
            # the chunk's states again, row by row, keeping h_t and a_t for the adjoint; y_t = <h_t, C_t>
            h = h0
            hs = gl.zeros((T, BLOCK_E, N), gl.float32, L3)
            As = gl.zeros((T, BLOCK_E, N), gl.float32, L3)
            y3 = gl.zeros((T, BLOCK_E, 1), gl.float32, L3)
            for i in gl.static_range(T):
                a_i = gl.exp2(_row(rows3, delta3, i) * A2)
                h = a_i * h + _row(rows3, dx3, i) * b_buf.slice(i, 1).load(LEN)
                hs = gl.where(rows3 == i, h[None, :, :], hs)
                As = gl.where(rows3 == i, a_i[None, :, :], As)
                y3 = gl.where(rows3 == i, gl.sum(h * c_buf.slice(i, 1).load(LEN), axis=1, keep_dims=True)[None, :, :],
                              y3)
            # adjoint from the chunk's end: dh_t = gy_t C_t + u, u = a_t dh_t; the dB / dC terms of each row go to
            # shared memory, reduced over the channels below
            s1_3 = gl.zeros((T, BLOCK_E, 1), gl.float32, L3)
            s2_3 = gl.zeros((T, BLOCK_E, 1), gl.float32, L3)
            for i in gl.static_range(T - 1, -1, -1):
                gy_i = _row(rows3, gy3, i)  # (BLOCK_E, 1)
                h_i = _row(rows3, hs, i)
                dh = gy_i * c_buf.slice(i, 1).load(LEN) + u
                rc_grp.slice(i, 1).store((gy_i * h_i)[None, :, :])
                rb_grp.slice(i, 1).store((_row(rows3, dx3, i) * dh)[None, :, :])
                u = _row(rows3, As, i) * dh
                # q = dh_t a_t h_{t-1}: the terms of dA (times Δ) and of dΔ (times A)
                if i > 0:
                    q = u * _row(rows3, hs, i - 1)
                else:
                    q = u * h0
                dA_acc += _row(rows3, delta3, i) * q
                s2_3 = gl.where(rows3 == i, gl.sum(q * A2, axis=1, keep_dims=True)[None, :, :], s2_3)
                s1_3 = gl.where(rows3 == i, gl.sum(dh * b_buf.slice(i, 1).load(LEN), axis=1, keep_dims=True)[None, :, :],
                                s1_3)
            # back to each lane's rows (axis 2 has size 1)
            y = _lanes(gl.sum(y3, axis=2), LROW, N_L) + Dv[None, :] * x
            s1 = _lanes(gl.sum(s1_3, axis=2), LROW, N_L)
            ddelta = x * s1 + _lanes(gl.sum(s2_3, axis=2), LROW, N_L) * 0.6931471805599453  # s2 summed q A log2(e)
            dxo = delta * s1 + gy * Dv[None, :]
            ddt = gl.where(m_r, ddelta * _sigmoid_w(dt + bias_r[None, :], w), 0.0)
            dbias_acc += ddt
            dD_acc += gy * x
            dzp = g * 0.5 * y * (sz * (1.0 + z * (1.0 - sz)))
            off_o = b64 * L * E + t_r[:, None] * E + e_r[None, :]  # contiguous (B, L, E) gradient buffers
            gl.store(dx_ptr + off_o, dxo.to(dx_ptr.dtype.element_ty), mask=m_r)
            gl.store(ddt_ptr + off_o, ddt.to(ddt_ptr.dtype.element_ty), mask=m_r)
            off_z = b64 * L * s_dzl + t_r[:, None] * s_dzl + e_r[None, :]  # dz: rows s_dzl apart (E, or 2E in d_xz)
            gl.store(dz_ptr + off_z, (prev + dzp).to(dz_ptr.dtype.element_ty), mask=m_r)
            # the channel sums of dB / dC once per RED_K chunks (and at the segment's last chunk): one barrier, one
            # pass of shared-memory loads and sums and one set of atomics for the group instead of one per chunk
            if (grp == RED_K - 1) | (jj == nj - 1):
                _cta_barrier()  # every row's dB / dC terms of the group are in shared memory
                # (RED_K * T, N): in-thread then over a few lanes; the slots as rows of one tile (same bytes)
                dBo = gl.sum(_as_rows(rb_smem, RED_K * T, BLOCK_E, N).load(RL), axis=1)
                dCo = gl.sum(_as_rows(rc_smem, RED_K * T, BLOCK_E, N).load(RL), axis=1)
                k_rn = s_rn // T
                tau = (c + grp - k_rn) * T + s_rn % T  # slot k holds chunk c + grp - k (time-order index)
                v_rn = (tau >= 0) & (tau < L) & (k_rn <= grp)  # slots past grp: stale, from an earlier group
                if REVERSE:
                    t_rn = L - 1 - tau
                else:
                    t_rn = tau
                off_bn = part_base + gl.where(v_rn, t_rn, 0)[:, None] * N + n_rn
                m_bn = v_rn[:, None] & (n_rn < N)
                if ATOMIC:
                    gl.atomic_add(dB_ptr + off_bn, dBo, mask=m_bn, sem="relaxed")
                    gl.atomic_add(dC_ptr + off_bn, dCo, mask=m_bn, sem="relaxed")
                else:
                    gl.store(dB_ptr + off_bn, dBo, mask=m_bn)
                    gl.store(dC_ptr + off_bn, dCo, mask=m_bn)
    # sums over the batch rows: relaxed fp32 atomics into zeroed (E, N) / (E,) buffers (no partials, no reduce launch)
    gl.atomic_add(dA_ptr + e_en[:, None] * N + n_en[None, :], dA_acc, mask=en_mask, sem="relaxed")
    gl.atomic_add(dD_ptr + e_r, gl.sum(dD_acc, axis=0), mask=e_mask_r, sem="relaxed")
    gl.atomic_add(dbias_ptr + e_r, gl.sum(dbias_acc, axis=0), mask=e_mask_r, sem="relaxed")


def reduce_layout(T: int, N: int, block_e: int, num_warps: int, red_k: int = 1) -> gl.BlockedLayout:
    """Layout in which the (red_k * T, BLOCK_E, N) dB / dC terms of a group of red_k chunks are read back from shared
    memory for the channel sum: 4 states per thread (one 16-byte load), (token, state group) positions over lanes and
    warps first, the channels left over lanes and in each thread, so the sum is mostly in-thread adds."""
    rows = red_k * T
    v = min(4, N)
    tw_n = min(N // v, 32)
    tw_t = min(rows, 32 // tw_n)
    tw_e = 32 // (tw_n * tw_t)
    wt = min(num_warps, rows // tw_t)
    we = num_warps // wt
    return gl.BlockedLayout(size_per_thread=[1, 1, v], threads_per_warp=[tw_t, tw_e, tw_n],
                            warps_per_cta=[wt, we, 1], order=[2, 1, 0])


@gluon.jit
def bimamba_bwd_gluon_kernel(
        xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr,
        xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr,
        z_ptr, g_ptr,
        dxf_ptr, ddtf_ptr, dxb_ptr, ddtb_ptr, dz_ptr,
        dBf_ptr, dCf_ptr, dBb_ptr, dCb_ptr,
        dAf_ptr, dDf_ptr, dbiasf_ptr, dAb_ptr, dDb_ptr, dbiasb_ptr,
        ck_ptr, scr_ptr, B, L, E,
        s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl,
        s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl,
        s_zb, s_zl, s_gb, s_gl, dzb_ptr, s_dzl,
        T: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr, SEG: gl.constexpr, ATOMIC: gl.constexpr,
        N_L: gl.constexpr, NUM_WARPS: gl.constexpr, RL: gl.constexpr, SPLIT: gl.constexpr,
        WALK_K: gl.constexpr, RED_K: gl.constexpr):
    """`bimamba_bwd_kernel`'s contract (buffers, grid), plus: with SPLIT the grid has a third axis of 2 and the two
    directions run in separate programs (twice the programs, half as long: fewer idle SMs in the last wave); the reverse
    direction then writes its dz terms to dzb_ptr (the caller adds them) and uses the second half of the checkpoint
    and scratch buffers. Without SPLIT one program runs both directions, the second adding to the first's dz. dz (and
    dzb) rows are s_dzl elements apart (E; 2E when dz is the z half of the (B, L, 2E) gradient of in_proj's output).
    BLOCK_E = (32 // N_L) * NUM_WARPS; RL = `reduce_layout(T, N, BLOCK_E, NUM_WARPS, RED_K)`."""
    gl.static_assert(BLOCK_E == (32 // N_L) * NUM_WARPS)
    gl.static_assert(N <= 32)
    gl.static_assert(T % N_L == 0)
    L3: gl.constexpr = gl.BlockedLayout(size_per_thread=[T, 1, N // N_L], threads_per_warp=[1, 32 // N_L, N_L],
                                        warps_per_cta=[1, NUM_WARPS, 1], order=[2, 1, 0])
    # 2b's per-(token, channel) tiles: each of a channel's N_L lanes holds T / N_L rows (the forward's LROW)
    LROW: gl.constexpr = _row_layout(L3, T, 1, N_L, NUM_WARPS)
    LBC: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32 // N, N],
                                         warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    RED: gl.constexpr = _terms_layout(N)  # per slot
    b_smem = gl.allocate_shared_memory(gl.float32, [2, T, N], SMEM)
    c_smem = gl.allocate_shared_memory(gl.float32, [2, T, N], SMEM)
    rb_smem = gl.allocate_shared_memory(gl.float32, [RED_K, T, BLOCK_E, N], RED)
    rc_smem = gl.allocate_shared_memory(gl.float32, [RED_K, T, BLOCK_E, N], RED)
    # the walks (phases 1 and 2a) take WALK_K chunks per step: rows in each thread as in L3, B through its own tile
    gl.static_assert(SEG % WALK_K == 0)
    L3W: gl.constexpr = gl.BlockedLayout(size_per_thread=[WALK_K * T, 1, N // N_L],
                                         threads_per_warp=[1, 32 // N_L, N_L], warps_per_cta=[1, NUM_WARPS, 1],
                                         order=[2, 1, 0])
    wb_smem = gl.allocate_shared_memory(gl.float32, [2, WALK_K * T, N], SMEM)
    LRW: gl.constexpr = _row_layout(L3W, WALK_K * T, 1, N_L, NUM_WARPS)
    if ATOMIC:
        pid_b = gl.program_id(0)
        pid_e = gl.program_id(1)
    else:
        pid_e = gl.program_id(0)
        pid_b = gl.program_id(1)
    ck_rev, scr_rev, dz_rev = ck_ptr, scr_ptr, dz_ptr
    run_fwd = True
    run_rev = True
    if SPLIT:  # one direction per program; the reverse one has its own checkpoints, scratch and dz terms
        n_chunks = gl.cdiv(L, T)
        ck_rev = ck_ptr + B * gl.cdiv(n_chunks, SEG) * E * N
        scr_rev = scr_ptr + B * gl.cdiv(E, BLOCK_E) * gl.minimum(n_chunks, SEG) * BLOCK_E * N
        dz_rev = dzb_ptr
        run_fwd = gl.program_id(2) == 0
        run_rev = gl.program_id(2) == 1
    if run_fwd:
        _bwd_pass(xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr, z_ptr, g_ptr,
                  dxf_ptr, ddtf_ptr, dz_ptr, dBf_ptr, dCf_ptr, dAf_ptr, dDf_ptr, dbiasf_ptr, ck_ptr, scr_ptr,
                  b_smem, c_smem, rb_smem, rc_smem, wb_smem, pid_b, pid_e, B, L, E,
                  s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl, s_zb, s_zl, s_gb, s_gl, s_dzl,
                  False, True, T, BLOCK_E, N, SEG, ATOMIC, L3, LBC, RL, WALK_K, L3W, RED_K, LROW, LRW, N_L)
    if not SPLIT:
        _cta_barrier()  # the reverse pass adds to the forward pass's dz and reuses its shared tiles
    if run_rev:
        _bwd_pass(xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr, z_ptr, g_ptr,
                  dxb_ptr, ddtb_ptr, dz_rev, dBb_ptr, dCb_ptr, dAb_ptr, dDb_ptr, dbiasb_ptr, ck_rev, scr_rev,
                  b_smem, c_smem, rb_smem, rc_smem, wb_smem, pid_b, pid_e, B, L, E,
                  s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl, s_zb, s_zl, s_gb, s_gl, s_dzl,
                  True, SPLIT, T, BLOCK_E, N, SEG, ATOMIC, L3, LBC, RL, WALK_K, L3W, RED_K, LROW, LRW, N_L)


# ----------------------------------------------------------------------------------------------------------------
# Backward of the bidirectional depthwise conv + SiLU (`visionmamba.ops.fast.bimamba_conv`) in one launch
#
#   pre_f[t] = b_f + sum_k w_f[k] x[t - D + k],  pre_b[t] = b_b + sum_k w_b[k] x[t + D - k]   (D = W - 1)
#   gp_*[t] = g_*[t] SiLU'(pre_*[t]),  dx[s] = sum_k w_f[k] gp_f[s + D - k] + w_b[k] gp_b[s - D + k],
#   dw_f[k] = sum_t gp_f[t] x[t - D + k],  dw_b[k] = sum_t gp_b[t] x[t + D - k],  db_* = sum_t gp_*[t]
#
# Taps are handled in a width-4 frame (a narrower kernel is the same conv with leading zero taps), so D = 3 below.
# Each thread owns VE channels and walks ROWS rows of one batch row in time order, one row at a time: tiles of
# BLOCK_T rows are loaded (the next one in flight while this one is processed) with the rows in each thread, so a row
# is a register rename (`_row`), and the last 2D rows of x and gp stay in registers, so every value is computed once:
# row tau gives gp at tau - D and dx at tau - 2D, and the weight-gradient sums are per-thread accumulators. The Triton
# pair of kernels (`bimamba_conv_bwd_gp_kernel`, `bimamba_conv_bwd_dx_kernel`) instead re-read shifted rows from global
# memory and round-trip gp through it. A program's first 4D rows are warm-up (computed with a zero history, masked
# off); its weight-gradient sums go to dpar with relaxed fp32 atomics.
# ----------------------------------------------------------------------------------------------------------------

@gluon.jit
def _zeros6(BLOCK_E: gl.constexpr, layout: gl.constexpr):
    """Six distinct (BLOCK_E,) fp32 zero tensors."""
    return (gl.zeros((BLOCK_E,), gl.float32, layout), gl.zeros((BLOCK_E,), gl.float32, layout),
            gl.zeros((BLOCK_E,), gl.float32, layout), gl.zeros((BLOCK_E,), gl.float32, layout),
            gl.zeros((BLOCK_E,), gl.float32, layout), gl.zeros((BLOCK_E,), gl.float32, layout))


@gluon.jit
def _conv_tap(w_ptr, e, e_mask, k4: gl.constexpr, W: gl.constexpr):
    """Tap k4 of the width-4 frame (tap k4 - (4 - W) of the real kernel; zero for the padding taps), fp32."""
    if k4 >= 4 - W:
        return gl.load(w_ptr + e * W + (k4 - (4 - W)), mask=e_mask, other=0.0)
    else:
        return gl.zeros_like(e).to(gl.float32)


@gluon.jit
def _conv_weights(w_ptr, bias_ptr, e, e_mask, W: gl.constexpr):
    """One direction's four taps (width-4 frame) and bias for channels e, fp32."""
    return (_conv_tap(w_ptr, e, e_mask, 0, W), _conv_tap(w_ptr, e, e_mask, 1, W), _conv_tap(w_ptr, e, e_mask, 2, W),
            _conv_tap(w_ptr, e, e_mask, 3, W), gl.load(bias_ptr + e, mask=e_mask, other=0.0))


@gluon.jit
def _conv_program(L, E, ROWS, BLOCK_E: gl.constexpr, LE: gl.constexpr):
    """This program's channels (in LE) and their mask, batch row (int64) and output rows [s0, s1) on the (channel
    blocks, batch, row splits) grid of the Gluon conv kernels."""
    e = gl.program_id(0) * BLOCK_E + gl.arange(0, BLOCK_E, layout=LE)
    s0 = gl.program_id(2) * ROWS
    return e, e < E, gl.program_id(1).to(gl.int64), s0, gl.minimum(s0 + ROWS, L)


@gluon.jit
def _conv_dw(dpar_ptr, acc, e, e_mask, k4: gl.constexpr, W: gl.constexpr):
    """Add tap k4's weight-gradient sum (nothing for the padding taps)."""
    if k4 >= 4 - W:
        gl.atomic_add(dpar_ptr + e * W + (k4 - (4 - W)), acc, mask=e_mask, sem="relaxed")


@gluon.jit
def _conv_param_grads(dpar_ptr, dw0, dw1, dw2, dw3, db, e, e_mask, E, W: gl.constexpr):
    """Add one direction's weight- and bias-gradient sums to its [dw (E, W) | db (E,)] slice of dpar."""
    _conv_dw(dpar_ptr, dw0, e, e_mask, 0, W)
    _conv_dw(dpar_ptr, dw1, e, e_mask, 1, W)
    _conv_dw(dpar_ptr, dw2, e, e_mask, 2, W)
    _conv_dw(dpar_ptr, dw3, e, e_mask, 3, W)
    gl.atomic_add(dpar_ptr + E * W + e, db, mask=e_mask, sem="relaxed")


@gluon.jit
def _conv_x_tile(x_ptr, tau, b64, L, s_xb, s_xl, e, em, BLOCK_T: gl.constexpr, LT: gl.constexpr):
    """x rows [tau, tau + BLOCK_T), zero outside [0, L) (the conv's padding), in x's dtype."""
    r = tau + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LT))
    return gl.load(x_ptr + b64 * s_xb + r[:, None] * s_xl + e[None, :], mask=((r >= 0) & (r < L))[:, None] & em,
                   other=0.0)


@gluon.jit
def _conv_tiles(x_ptr, gf_ptr, gb_ptr, tau, b64, L, E, s_xb, s_xl, e, em, BLOCK_T: gl.constexpr,
                LT: gl.constexpr):
    """x rows [tau, tau + BLOCK_T) and g_f, g_b rows [tau - 3, ...), zero outside [0, L), in the inputs' dtypes."""
    xv = _conv_x_tile(x_ptr, tau, b64, L, s_xb, s_xl, e, em, BLOCK_T, LT)
    t = tau + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LT)) - 3
    gm = ((t >= 0) & (t < L))[:, None] & em
    off = b64 * L * E + t[:, None] * E + e[None, :]
    return xv, gl.load(gf_ptr + off, mask=gm, other=0.0), gl.load(gb_ptr + off, mask=gm, other=0.0)


@gluon.jit
def bimamba_conv_bwd_gluon_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, gf_ptr, gb_ptr, dx_ptr, dpar_ptr,
                                  L, E, s_xb, s_xl, s_dxl, ROWS,
                                  W: gl.constexpr, BLOCK_T: gl.constexpr, VE: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Grid (channel blocks of VE * 32 * NUM_WARPS, batch, row splits of ROWS rows). x: (B, L, E) with unit stride
    along E; g_f, g_b: contiguous (B, L, E); dx: (B, L, E) rows s_dxl apart (E, or 2E: the x half of d_xz); w_*: (E, W) fp32; dpar: zeroed fp32 (2, E * W + E) = [dw (E, W) |
    db] per direction, added to."""
    D: gl.constexpr = 3
    gl.static_assert(W <= 4)
    BLOCK_E: gl.constexpr = VE * 32 * NUM_WARPS
    LT: gl.constexpr = gl.BlockedLayout([BLOCK_T, VE], [1, 32], [1, NUM_WARPS], [1, 0])  # (rows, channels)
    LE: gl.constexpr = gl.SliceLayout(0, LT)
    e, e_mask, b64, s0, s1 = _conv_program(L, E, ROWS, BLOCK_E, LE)
    em = e_mask[None, :]
    wf0, wf1, wf2, wf3, bias_f = _conv_weights(wf_ptr, bf_ptr, e, e_mask, W)
    wb0, wb1, wb2, wb3, bias_b = _conv_weights(wb_ptr, bb_ptr, e, e_mask, W)
    rows2 = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LT))[:, None]
    # history (times before the current row): x at 1..6 rows before the current one, gp_f / gp_b at 1..3 / 1..6
    # rows before the row's gp time; the weight-gradient accumulators. Each its own zero tensor: the loop-carried
    # values are those the loop body changes, and a rotation of one shared initial value looks unchanged
    x1, x2, x3, x4, x5, x6 = _zeros6(BLOCK_E, LE)
    f1, f2, f3, g1, g2, g3 = _zeros6(BLOCK_E, LE)
    g4, g5, g6, dbf, dbb, dwf0 = _zeros6(BLOCK_E, LE)
    dwf1, dwf2, dwf3, dwb0, dwb1, dwb2 = _zeros6(BLOCK_E, LE)
    dwb3 = gl.zeros((BLOCK_E,), gl.float32, LE)
    tau0 = s0 - 2 * D
    n_tiles = gl.cdiv(s1 - s0 + 4 * D, BLOCK_T)
    nx, ngf, ngb = _conv_tiles(x_ptr, gf_ptr, gb_ptr, tau0, b64, L, E, s_xb, s_xl, e, em, BLOCK_T, LT)
    dx_base = dx_ptr + b64 * L * s_dxl + e
    for i in range(0, n_tiles):
        tau = tau0 + i * BLOCK_T
        xt = nx.to(gl.float32)
        gft = ngf.to(gl.float32)
        gbt = ngb.to(gl.float32)
        # the next tile's loads in flight while this one is processed (past the end: masked, no traffic)
        nx, ngf, ngb = _conv_tiles(x_ptr, gf_ptr, gb_ptr, tau + BLOCK_T, b64, L, E, s_xb, s_xl, e, em, BLOCK_T, LT)
        for jj in gl.static_range(BLOCK_T):
            x0 = _row(rows2, xt, jj)  # x[tau + jj]; this row's gp time t = tau + jj - D, dx time s = t - D
            t = tau + jj - D
            pf = bias_f + wf0 * x6 + wf1 * x5 + wf2 * x4 + wf3 * x3  # x[t - D + k]
            pb = bias_b + wb0 * x0 + wb1 * x1 + wb2 * x2 + wb3 * x3  # x[t + D - k]
            sf = _sigmoid_ftz(pf)
            sb = _sigmoid_ftz(pb)
            f0 = _row(rows2, gft, jj) * sf * (1.0 + pf * (1.0 - sf))  # gp_f[t]
            g0 = _row(rows2, gbt, jj) * sb * (1.0 + pb * (1.0 - sb))  # gp_b[t]
            own = (t >= s0) & (t < s1)  # this program's weight-gradient rows
            af = gl.where(own, f0, 0.0)
            ab = gl.where(own, g0, 0.0)
            dwf0 += af * x6
            dwf1 += af * x5
            dwf2 += af * x4
            dwf3 += af * x3
            dbf += af
            dwb0 += ab * x0
            dwb1 += ab * x1
            dwb2 += ab * x2
            dwb3 += ab * x3
            dbb += ab
            # dx[s], s = t - D: gp_f[s + D - k] = gp_f[t - k], gp_b[s - D + k] = gp_b[t - 2D + k]
            dx = (wf0 * f0 + wf1 * f1 + wf2 * f2 + wf3 * f3) + (wb0 * g6 + wb1 * g5 + wb2 * g4 + wb3 * g3)
            s = t - D
            gl.store(dx_base + s * s_dxl, dx.to(dx_ptr.dtype.element_ty), mask=e_mask & (s >= s0) & (s < s1))
            x6, x5, x4, x3, x2, x1 = x5, x4, x3, x2, x1, x0
            f3, f2, f1 = f2, f1, f0
            g6, g5, g4, g3, g2, g1 = g5, g4, g3, g2, g1, g0
    _conv_param_grads(dpar_ptr, dwf0, dwf1, dwf2, dwf3, dbf, e, e_mask, E, W)
    _conv_param_grads(dpar_ptr + E * W + E, dwb0, dwb1, dwb2, dwb3, dbb, e, e_mask, E, W)


@gluon.jit
def bimamba_conv_fwd_gluon_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, of_ptr, ob_ptr, L, E, s_xb, s_xl, ROWS,
                                  W: gl.constexpr, BLOCK_T: gl.constexpr, VE: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Forward of `bimamba_conv` the same way (rows in each thread, the last 2D rows of x in registers): row tau gives
    both outputs at tau - D. Grid and x as `bimamba_conv_bwd_gluon_kernel`'s; outputs contiguous (B, L, E)."""
    D: gl.constexpr = 3
    gl.static_assert(W <= 4)
    BLOCK_E: gl.constexpr = VE * 32 * NUM_WARPS
    LT: gl.constexpr = gl.BlockedLayout([BLOCK_T, VE], [1, 32], [1, NUM_WARPS], [1, 0])  # (rows, channels)
    LE: gl.constexpr = gl.SliceLayout(0, LT)
    e, e_mask, b64, s0, s1 = _conv_program(L, E, ROWS, BLOCK_E, LE)
    em = e_mask[None, :]
    wf0, wf1, wf2, wf3, bias_f = _conv_weights(wf_ptr, bf_ptr, e, e_mask, W)
    wb0, wb1, wb2, wb3, bias_b = _conv_weights(wb_ptr, bb_ptr, e, e_mask, W)
    rows2 = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LT))[:, None]
    x1, x2, x3, x4, x5, x6 = _zeros6(BLOCK_E, LE)  # x at 1..6 rows before the current one (distinct zeros: see above)
    tau0 = s0 - D  # D warm-up rows: the first output row's window starts at s0 - D; the last ends at s1 - 1 + D
    n_tiles = gl.cdiv(s1 - s0 + 2 * D, BLOCK_T)
    nx = _conv_x_tile(x_ptr, tau0, b64, L, s_xb, s_xl, e, em, BLOCK_T, LT)
    o_off = b64 * L * E + e
    for i in range(0, n_tiles):
        tau = tau0 + i * BLOCK_T
        xt = nx.to(gl.float32)
        nx = _conv_x_tile(x_ptr, tau + BLOCK_T, b64, L, s_xb, s_xl, e, em, BLOCK_T, LT)
        for jj in gl.static_range(BLOCK_T):
            x0 = _row(rows2, xt, jj)  # x[tau + jj]; outputs at t = tau + jj - D
            pf = bias_f + wf0 * x6 + wf1 * x5 + wf2 * x4 + wf3 * x3  # x[t - D + k]
            pb = bias_b + wb0 * x0 + wb1 * x1 + wb2 * x2 + wb3 * x3  # x[t + D - k]
            t = tau + jj - D
            m = e_mask & (t >= s0) & (t < s1)
            gl.store(of_ptr + o_off + t * E, (pf * _sigmoid_ftz(pf)).to(of_ptr.dtype.element_ty), mask=m)
            gl.store(ob_ptr + o_off + t * E, (pb * _sigmoid_ftz(pb)).to(ob_ptr.dtype.element_ty), mask=m)
            x6, x5, x4, x3, x2, x1 = x5, x4, x3, x2, x1, x0
