"""Forward and backward of the `fast` bidirectional selective scan in Gluon (Triton's explicit-layout dialect), CUDA
only.

Same algorithms, arguments, grids and outputs as `bimamba_fwd_kernel` / `bimamba_bwd_kernel` in
`visionmamba.ops._fast_kernels`. What differs is that every tile has a layout chosen here instead of by the compiler,
all of them slices of ONE 3-D layout over (T, BLOCK_E, N) with the chunk axis T in each thread:

    L3 = blocked(size_per_thread [T, E_T, N / N_L], threads_per_warp [1, 32 / N_L, N_L], warps [1, num_warps, 1])

Backward (phase 1: segment checkpoints; 2a: chunk-start states of a segment; 2b: its chunks in reverse, the forward
recomputed inside the chunk, then the adjoint):
- both recurrences (state forward, adjoint backward) run row by row in registers, one FMA per element and token, with
  no scan combine and no shuffle (`_row` extracts a row for free);
- per-token tiles (x, dt, z, g, dx, ...) are loaded and stored directly in SliceLayout(2, L3), per-token state-width
  tiles (B, C, dB, dC) in SliceLayout(1, L3) and (channel, state) tiles (A, h, dA) in SliceLayout(0, L3), so
  broadcasting them into L3 and reducing L3 tiles back to them is free: the kernel has no layout conversion;
- the only cross-lane traffic left is the reductions themselves: over the N_L lanes that share a channel (y and the
  two sums behind dx and dΔ) and over the lanes and warps that share a state (dB, dC);
- phase 2b loads the next chunk's per-token tiles and entering state while the current chunk computes.

Forward (N_L = 1: each thread owns whole states, so y = <h, C> reduces in registers and softplus(dt + bias) is
computed once per (token, channel), not once per lane): B and C are the same for every channel, so a program loads
each (T, N) tile once in a compact layout and stages it through a double-buffered shared tile that every thread reads
row by row as a broadcast (loaded per thread in the state layout they cost one global load per value per thread).
One barrier per chunk; chunk c computes while chunk c + 1's B and C go to shared memory and chunk c + 2's tiles are in
flight.

Why: compiled offline for sm_90 (triton 3.6), the Triton backward's chunk loop takes ~58 SASS instructions per state
element, 25 of them shuffles (the compiler spreads N over 4-16 lanes, converts every per-token tile between its load
layout and the state layout, and lowers the reverse `associative_scan` to shuffles although T is in-thread); this
backward's loop: 4.5 shuffles per element. The Triton forward: 12.8 / 14.2 instructions per element (first / second
pass), this one 10.1 / 12.7 with the MUFU exponentials (one per element) as the floor. Measured (B 128, L 197, bf16):
backward 1.28 / 2.47 ms at E 384 / 768 against 1.60 / 3.13 ms (H200); forward 0.159 / 0.297 ms against 0.208 /
0.403 ms (H100). Gluon is not run by Triton's CPU interpreter: the CPU tests run the Triton kernels and check that these
compile for sm_90 without layout conversions; the GPU tests check both sets against the reference.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# the CTA barrier is `thread_barrier` in triton 3.6 and `barrier` in later releases (Gluon is experimental)
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _softplus(v):
    """torch's softplus, as max(v, 0) + log1p(e^-|v|), and w = e^-|v| (for `_sigmoid_w`). log1p(w), w in (0, 1]: one
    MUFU.LG2 of 1 + w (`gl.log` lowers to a ~20-instruction polynomial, which per (token, channel) costs more than a
    state update), or below w = 1/16, where lg2.approx's absolute error (2^-22.6) would be large relative to the
    result, the series to w^4 (relative error < 3e-6 on both sides). Above v = 20, v + log1p(e^-v) rounds to v, as
    torch's threshold returns."""
    w = gl.exp(-gl.abs(v))
    lg2 = gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + w], dtype=gl.float32, is_pure=True,
                                    pack=1)
    series = w * (1.0 - w * (0.5 - w * (0.3333333333 - w * 0.25)))
    return gl.maximum(v, 0.0) + gl.where(w < 0.0625, series, lg2 * 0.6931471805599453), w


@gluon.jit
def _sigmoid_w(v, w):
    """sigmoid(v) from w = e^-|v| (`_softplus`'s): no second exponential."""
    r = 1.0 / (1.0 + w)
    return gl.where(v >= 0.0, r, w * r)


@gluon.jit
def _sigmoid(v):
    return 1.0 / (1.0 + gl.exp(-v))


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
def _inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl,
            e_te, e_mask_te, n_tn, T: gl.constexpr, LTE: gl.constexpr, LTN: gl.constexpr, REVERSE: gl.constexpr):
    """x, dt (T, BLOCK_E) in LTE and B, C (T, N) in LTN of chunk c, as fp32."""
    t_te, v_te = _rows(c, L, T, gl.SliceLayout(1, LTE), REVERSE)
    t_tn, v_tn = _rows(c, L, T, gl.SliceLayout(1, LTN), REVERSE)
    m_te = v_te[:, None] & e_mask_te[None, :]
    return (_tile(x_ptr, b64 * s_xb, t_te, s_xl, e_te, m_te), _tile(dt_ptr, b64 * s_dtb, t_te, s_dtl, e_te, m_te),
            _tile(b_ptr, b64 * s_bb, t_tn, s_bl, n_tn, v_tn[:, None]),
            _tile(c_ptr, b64 * s_cb, t_tn, s_cl, n_tn, v_tn[:, None]))


@gluon.jit
def _row(rows3, x3, i: gl.constexpr):
    """Row i of a (T, BLOCK_E, N) tile as (BLOCK_E, N). T lives in each thread and `rows3` is a compile-time constant
    per register, so the select and the adds of -0.0 fold away: a register rename, no instruction."""
    return gl.sum(gl.where(rows3 == i, x3, -0.0), axis=0)


@gluon.jit
def _states(x, dt, Bm, bias, A2, m_te, h, rows3, T: gl.constexpr):
    """Δ, e^-|dt + bias| (for its sigmoid), a = exp(Δ A), Δ x, b = Δ x B, the states h_t of one chunk entered with
    state h, and the state leaving it.
    The recurrence runs row by row in registers (one FMA per state element and token)."""
    sp, w = _softplus(dt + bias[None, :])
    delta = gl.where(m_te, sp, 0.0)
    a = gl.exp2(delta[:, :, None] * A2[None, :, :])
    dx_ = delta * x
    bx = dx_[:, :, None] * Bm[:, None, :]
    hs = bx
    for i in gl.static_range(T):
        h = _row(rows3, a, i) * h + _row(rows3, bx, i)
        hs = gl.where(rows3 == i, h[None, :, :], hs)
    return delta, w, a, dx_, bx, hs, h


@gluon.jit
def _advance(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, e_te, e_mask_te,
             n_tn, x, dt, Bm, bias, A2, h, rows3, T: gl.constexpr, L3: gl.constexpr, REVERSE: gl.constexpr):
    """Phases 1 and 2a: the state leaving chunk c (its x, dt, B already loaded) and chunk c + 1's x, dt, B, loaded
    while chunk c computes."""
    t_te, v_te = _rows(c, L, T, gl.SliceLayout(1, gl.SliceLayout(2, L3)), REVERSE)
    m_te = v_te[:, None] & e_mask_te[None, :]
    nx, ndt, nB, nC = _inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c + 1, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb,
                              s_cl, e_te, e_mask_te, n_tn, T, gl.SliceLayout(2, L3), gl.SliceLayout(1, L3), REVERSE)
    delta, w, a, dx_, bx, hs, h = _states(x, dt, Bm, bias, A2, m_te, h, rows3, T)
    return h, nx, ndt, nB


@gluon.jit
def _fwd_pass(x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, z_ptr, out_ptr, pid_b, pid_e, L, E,
              s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol,
              REVERSE: gl.constexpr, FIRST: gl.constexpr, T: gl.constexpr, BLOCK_E: gl.constexpr,
              N: gl.constexpr, L3: gl.constexpr, LBC: gl.constexpr):
    """One direction of the forward: y_t = <h_t, C_t> + D x_t, chunk by chunk and row by row (each thread owns whole
    states: no cross-lane reduction). B and C of a chunk are loaded once per program in the compact layout LBC and
    staged through a double-buffered shared tile, from which every thread reads each row as a broadcast. Loads run
    ahead: chunk c computes while chunk c + 1's B and C go to shared memory and chunk c + 2's tiles are in flight. The first pass stores y; the second reads it back and stores (y_f + y_b) / 2 * SiLU(z)."""
    LTE: gl.constexpr = gl.SliceLayout(2, L3)  # (T, BLOCK_E)
    LEN: gl.constexpr = gl.SliceLayout(0, L3)  # (BLOCK_E, N)
    e_te = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, LTE))
    e_mask_te = e_te < E
    e_en = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, LEN))
    n_en = gl.arange(0, N, layout=gl.SliceLayout(0, LEN))
    n_bc = gl.arange(0, N, layout=gl.SliceLayout(0, LBC))
    rows3 = gl.arange(0, T, layout=gl.SliceLayout(1, LTE))[:, None, None]
    A2 = gl.load(a_ptr + e_en[:, None] * N + n_en[None, :], mask=(e_en < E)[:, None], other=0.0) * 1.4426950408889634
    Dv = gl.load(d_ptr + e_te, mask=e_mask_te, other=0.0)
    bias = gl.load(bias_ptr + e_te, mask=e_mask_te, other=0.0)
    b64 = pid_b.to(gl.int64)
    # (2, T, N): chunk c in buffer c % 2; row i of a buffer is the (1, N) slice every thread loads whole, in LEN
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    b_smem = gl.allocate_shared_memory(gl.float32, [2, T, N], SMEM)
    c_smem = gl.allocate_shared_memory(gl.float32, [2, T, N], SMEM)
    h = gl.zeros((BLOCK_E, N), gl.float32, LEN)
    cx, cdt, cB, cC, cz, cprev = _fwd_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, 0, L, b64, s_xb, s_xl,
                                             s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol, e_te,
                                             e_mask_te, n_bc, T, LTE, LBC, REVERSE, FIRST)
    b_smem.index(0).store(cB)
    c_smem.index(0).store(cC)
    nx, ndt, nB, nC, nz, nprev = _fwd_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, 1, L, b64, s_xb, s_xl,
                                             s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol, e_te,
                                             e_mask_te, n_bc, T, LTE, LBC, REVERSE, FIRST)
    for c in range(0, gl.cdiv(L, T)):
        t_te, v_te = _rows(c, L, T, gl.SliceLayout(1, LTE), REVERSE)
        m_te = v_te[:, None] & e_mask_te[None, :]
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
                                                 e_te, e_mask_te, n_bc, T, LTE, LBC, REVERSE, FIRST)
        delta = gl.where(m_te, _softplus(dt + bias[None, :])[0], 0.0)
        delta3 = delta[:, :, None]  # (T, BLOCK_E, 1)
        dx3 = (delta * x)[:, :, None]
        y3 = (Dv[None, :] * x)[:, :, None]
        for i in gl.static_range(T):
            B_i = b_buf.slice(i, 1).load(LEN)  # (1, N), the same in every thread
            C_i = c_buf.slice(i, 1).load(LEN)
            h = gl.exp2(_row(rows3, delta3, i) * A2) * h + _row(rows3, dx3, i) * B_i
            y3 = gl.where(rows3 == i, y3 + gl.sum(h * C_i, axis=1, keep_dims=True)[None, :, :], y3)
        y = gl.sum(y3, axis=2)  # (T, BLOCK_E); the axis has size 1
        o_ptrs = out_ptr + b64 * s_ob + t_te[:, None] * s_ol + e_te[None, :]
        if FIRST:
            gl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_te)
        else:
            gl.store(o_ptrs, ((prev + y) * 0.5 * (z * _sigmoid(z))).to(out_ptr.dtype.element_ty), mask=m_te)


@gluon.jit
def _fwd_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb,
                s_cl, s_zb, s_zl, s_ob, s_ol, e_te, e_mask_te, n_bc, T: gl.constexpr, LTE: gl.constexpr,
                LBC: gl.constexpr, REVERSE: gl.constexpr, FIRST: gl.constexpr):
    """Chunk c's x, dt (T, BLOCK_E) in LTE and B, C (T, N) in the compact LBC, as fp32; for the second pass also z
    and the first pass's y (written by this program before the barrier between the passes), else x twice (unused)."""
    x, dt, Bm, Cm = _inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl,
                            e_te, e_mask_te, n_bc, T, LTE, LBC, REVERSE)
    if FIRST:
        z = x
        prev = x
    else:
        t_te, v_te = _rows(c, L, T, gl.SliceLayout(1, LTE), REVERSE)
        m_te = v_te[:, None] & e_mask_te[None, :]
        z = _tile(z_ptr, b64 * s_zb, t_te, s_zl, e_te, m_te)
        prev = _tile(out_ptr, b64 * s_ob, t_te, s_ol, e_te, m_te)
    return x, dt, Bm, Cm, z, prev


@gluon.jit
def bimamba_fwd_gluon_kernel(
        xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr,
        xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr,
        z_ptr, out_ptr, L, E,
        s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl,
        s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl,
        s_zb, s_zl, s_ob, s_ol,
        T: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr, E_T: gl.constexpr, NUM_WARPS: gl.constexpr):
    """`bimamba_fwd_kernel`'s contract (arguments, grid (channel blocks, batch)); BLOCK_E = E_T * 32 * NUM_WARPS:
    each thread owns E_T channels' whole states."""
    gl.static_assert(BLOCK_E == E_T * 32 * NUM_WARPS)
    gl.static_assert(N <= 32)
    L3: gl.constexpr = gl.BlockedLayout(size_per_thread=[T, E_T, N], threads_per_warp=[1, 32, 1],
                                        warps_per_cta=[1, NUM_WARPS, 1], order=[2, 1, 0])
    # (T, N) B and C tiles: one element per thread (each loaded once per program, not once per thread)
    LBC: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32 // N, N],
                                         warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    pid_e = gl.program_id(0)
    pid_b = gl.program_id(1)
    _fwd_pass(xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr, z_ptr, out_ptr, pid_b, pid_e, L, E,
              s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl, s_zb, s_zl, s_ob, s_ol,
              False, True, T, BLOCK_E, N, L3, LBC)
    # pass 2 reads what other threads of this program wrote in pass 1 (y), and its first shared-memory stores must not
    # race pass 1's last reads
    _cta_barrier()
    _fwd_pass(xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr, z_ptr, out_ptr, pid_b, pid_e, L, E,
              s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl, s_zb, s_zl, s_ob, s_ol,
              True, False, T, BLOCK_E, N, L3, LBC)


@gluon.jit
def _tiles_2b(x_ptr, dt_ptr, z_ptr, g_ptr, dz_ptr, scr_base, j, c, L, E, b64, s_xb, s_xl, s_dtb, s_dtl, s_zb, s_zl,
              s_gb, s_gl, e_te, e_mask_te, T: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr,
              L3: gl.constexpr, REVERSE: gl.constexpr, FIRST: gl.constexpr):
    """Per-token tiles phase 2b reads for chunk c (x, dt, z, g, the first pass's dz) and its entering state (scratch
    slot j); chunks before the first (j < 0) load nothing."""
    LTE: gl.constexpr = gl.SliceLayout(2, L3)
    t_te, v_te = _rows(c, L, T, gl.SliceLayout(1, LTE), REVERSE)
    m_te = v_te[:, None] & e_mask_te[None, :]
    x = _tile(x_ptr, b64 * s_xb, t_te, s_xl, e_te, m_te)
    dt = _tile(dt_ptr, b64 * s_dtb, t_te, s_dtl, e_te, m_te)
    z = _tile(z_ptr, b64 * s_zb, t_te, s_zl, e_te, m_te)
    g = _tile(g_ptr, b64 * s_gb, t_te, s_gl, e_te, m_te)
    if FIRST:
        prev = gl.zeros((T, BLOCK_E), gl.float32, LTE)
    else:  # written by the first pass of this program (before the barrier between the passes)
        prev = _tile(dz_ptr, b64 * L * E, t_te, E, e_te, m_te)
    LEN: gl.constexpr = gl.SliceLayout(0, L3)
    slot = (gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, LEN))[:, None] * N
            + gl.arange(0, N, layout=gl.SliceLayout(0, LEN))[None, :])
    h0 = gl.load(scr_base + gl.maximum(j, 0) * BLOCK_E * N + slot * 0, mask=(slot * 0 + j) >= 0, other=0.0)
    return x, dt, z, g, prev, h0


@gluon.jit
def _bwd_pass(x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, z_ptr, g_ptr,
              dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, ck_ptr, scr_ptr,
              pid_b, pid_e, B, L, E,
              s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_gb, s_gl,
              REVERSE: gl.constexpr, FIRST: gl.constexpr,
              T: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr, SEG: gl.constexpr, ATOMIC: gl.constexpr,
              L3: gl.constexpr):
    LTE: gl.constexpr = gl.SliceLayout(2, L3)  # (T, BLOCK_E)
    LTN: gl.constexpr = gl.SliceLayout(1, L3)  # (T, N)
    LEN: gl.constexpr = gl.SliceLayout(0, L3)  # (BLOCK_E, N)
    e_te = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, LTE))
    e_mask_te = e_te < E
    n_tn = gl.arange(0, N, layout=gl.SliceLayout(0, LTN))
    e_en = pid_e * BLOCK_E + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, LEN))
    n_en = gl.arange(0, N, layout=gl.SliceLayout(0, LEN))
    en_mask = (e_en < E)[:, None] & (n_en < N)[None, :]
    rows3 = gl.arange(0, T, layout=gl.SliceLayout(1, LTE))[:, None, None]
    A = gl.load(a_ptr + e_en[:, None] * N + n_en[None, :], mask=en_mask, other=0.0)
    A2 = A * 1.4426950408889634
    Dv = gl.load(d_ptr + e_te, mask=e_mask_te, other=0.0)
    bias = gl.load(bias_ptr + e_te, mask=e_mask_te, other=0.0)
    b64 = pid_b.to(gl.int64)
    n_chunks = gl.cdiv(L, T)
    n_seg = gl.cdiv(n_chunks, SEG)
    ck_base = ck_ptr + b64 * n_seg * E * N + e_en[:, None] * N + n_en[None, :]
    n_eb = gl.cdiv(E, BLOCK_E)
    slots = gl.minimum(n_chunks, SEG)
    scr_base = (scr_ptr + (b64 * n_eb + pid_e) * slots * (BLOCK_E * N)
                + gl.arange(0, BLOCK_E, layout=gl.SliceLayout(1, LEN))[:, None] * N + n_en[None, :])
    if ATOMIC:
        part_base = b64 * L * N
    else:
        part_base = (pid_e * B + b64) * L * N

    # ---- phase 1: the state entering every segment ----
    h = gl.zeros((BLOCK_E, N), gl.float32, LEN)
    gl.store(ck_base, h, mask=en_mask)
    nx, ndt, nB, _ = _inputs(x_ptr, dt_ptr, b_ptr, c_ptr, 0, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb,
                              s_cl, e_te, e_mask_te, n_tn, T, gl.SliceLayout(2, L3), gl.SliceLayout(1, L3), REVERSE)
    for s in range(0, n_seg - 1):
        for j in range(0, SEG):
            c = s * SEG + j
            h, nx, ndt, nB = _advance(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl,
                                      s_cb, s_cl, e_te, e_mask_te, n_tn, nx, ndt, nB, bias, A2, h, rows3, T, L3,
                                      REVERSE)
        gl.store(ck_base + (s + 1) * E * N, h, mask=en_mask)

    # ---- phase 2: segments in reverse order ----
    u = gl.zeros((BLOCK_E, N), gl.float32, LEN)  # a_{t+1} dh_{t+1} entering the chunk from the right
    dA_acc = gl.zeros((BLOCK_E, N), gl.float32, LEN)
    dD_acc = gl.zeros((BLOCK_E,), gl.float32, gl.SliceLayout(0, LTE))
    dbias_acc = gl.zeros((BLOCK_E,), gl.float32, gl.SliceLayout(0, LTE))
    for ss in range(0, n_seg):
        s = n_seg - 1 - ss
        c0 = s * SEG
        nj = gl.minimum(n_chunks - c0, SEG)
        _cta_barrier()  # the previous segment's reads of the scratch slots are done
        # 2a: forward through the segment, keeping the state entering each chunk
        h = gl.load(ck_base + s * E * N, mask=en_mask, other=0.0)
        nx, ndt, nB, _ = _inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c0, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl,
                                  s_cb, s_cl, e_te, e_mask_te, n_tn, T, gl.SliceLayout(2, L3), gl.SliceLayout(1, L3), REVERSE)
        for j in range(0, nj - 1):
            gl.store(scr_base + j * BLOCK_E * N, h)
            c = c0 + j
            h, nx, ndt, nB = _advance(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl,
                                      s_cb, s_cl, e_te, e_mask_te, n_tn, nx, ndt, nB, bias, A2, h, rows3, T, L3,
                                      REVERSE)
        gl.store(scr_base + (nj - 1) * BLOCK_E * N, h)
        _cta_barrier()
        # 2b: the segment's chunks in reverse order; the next chunk's per-token tiles and entering state are loaded
        # while this one computes
        px, pdt, pz, pg, pprev, ph0 = _tiles_2b(x_ptr, dt_ptr, z_ptr, g_ptr, dz_ptr, scr_base, nj - 1, c0 + nj - 1,
                                                L, E, b64, s_xb, s_xl, s_dtb, s_dtl, s_zb, s_zl, s_gb, s_gl,
                                                e_te, e_mask_te, T, BLOCK_E, N, L3, REVERSE, FIRST)
        for jj in range(0, nj):
            j = nj - 1 - jj
            c = c0 + j
            t_te, v_te = _rows(c, L, T, gl.SliceLayout(1, LTE), REVERSE)
            t_tn, v_tn = _rows(c, L, T, gl.SliceLayout(1, LTN), REVERSE)
            m_te = v_te[:, None] & e_mask_te[None, :]
            x, dt, z, g, prev, h0 = px, pdt, pz, pg, pprev, ph0
            px, pdt, pz, pg, pprev, ph0 = _tiles_2b(x_ptr, dt_ptr, z_ptr, g_ptr, dz_ptr, scr_base, j - 1, c - 1,
                                                    L, E, b64, s_xb, s_xl, s_dtb, s_dtl, s_zb, s_zl, s_gb, s_gl,
                                                    e_te, e_mask_te, T, BLOCK_E, N, L3, REVERSE, FIRST)
            Bm = _tile(b_ptr, b64 * s_bb, t_tn, s_bl, n_tn, v_tn[:, None])
            Cm = _tile(c_ptr, b64 * s_cb, t_tn, s_cl, n_tn, v_tn[:, None])
            off_o = b64 * L * E + t_te[:, None] * E + e_te[None, :]  # contiguous (B, L, E) gradient buffers
            sz = _sigmoid(z)
            gy = g * (z * sz) * 0.5
            delta, w, a, dx_, bx, hs, h_out = _states(x, dt, Bm, bias, A2, m_te, h0, rows3, T)
            y = gl.sum(hs * Cm[:, None, :], axis=2) + Dv[None, :] * x
            dCo = gl.sum(hs * gy[:, :, None], axis=1)  # (T, N)
            ha = hs - bx  # a_t h_{t-1}
            # adjoint, row by row from the chunk's end: dh_t = gy_t C_t + u, then u = a_t dh_t
            cg = gy[:, :, None] * Cm[:, None, :]
            dh = cg
            for k in gl.static_range(T):
                dh_k = _row(rows3, cg, T - 1 - k) + u
                u = _row(rows3, a, T - 1 - k) * dh_k
                dh = gl.where(rows3 == T - 1 - k, dh_k[None, :, :], dh)
            q = dh * ha
            dA_acc += gl.sum(delta[:, :, None] * q, axis=0)
            s2 = gl.sum(q * A[None, :, :], axis=2)
            s1 = gl.sum(dh * Bm[:, None, :], axis=2)
            dBo = gl.sum(dh * dx_[:, :, None], axis=1)  # (T, N)
            ddelta = x * s1 + s2
            dxo = delta * s1 + gy * Dv[None, :]
            ddt = gl.where(m_te, ddelta * _sigmoid_w(dt + bias[None, :], w), 0.0)
            dbias_acc += gl.sum(ddt, axis=0)
            dD_acc += gl.sum(gy * x, axis=0)
            dzp = g * 0.5 * y * (sz * (1.0 + z * (1.0 - sz)))
            gl.store(dx_ptr + off_o, dxo.to(dx_ptr.dtype.element_ty), mask=m_te)
            gl.store(ddt_ptr + off_o, ddt.to(ddt_ptr.dtype.element_ty), mask=m_te)
            gl.store(dz_ptr + off_o, (prev + dzp).to(dz_ptr.dtype.element_ty), mask=m_te)
            off_bn = part_base + t_tn[:, None] * N + n_tn[None, :]
            if ATOMIC:
                gl.atomic_add(dB_ptr + off_bn, dBo, mask=v_tn[:, None], sem="relaxed")
                gl.atomic_add(dC_ptr + off_bn, dCo, mask=v_tn[:, None], sem="relaxed")
            else:
                gl.store(dB_ptr + off_bn, dBo, mask=v_tn[:, None])
                gl.store(dC_ptr + off_bn, dCo, mask=v_tn[:, None])
    gl.store(dA_ptr + b64 * E * N + e_en[:, None] * N + n_en[None, :], dA_acc, mask=en_mask)
    gl.store(dD_ptr + b64 * E + e_te, dD_acc, mask=e_mask_te)
    gl.store(dbias_ptr + b64 * E + e_te, dbias_acc, mask=e_mask_te)


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
        s_zb, s_zl, s_gb, s_gl,
        T: gl.constexpr, BLOCK_E: gl.constexpr, N: gl.constexpr, SEG: gl.constexpr, ATOMIC: gl.constexpr,
        E_T: gl.constexpr, N_L: gl.constexpr, NUM_WARPS: gl.constexpr):
    """`bimamba_bwd_kernel`'s contract (buffers, grid); BLOCK_E must equal E_T * (32 // N_L) * NUM_WARPS."""
    gl.static_assert(BLOCK_E == E_T * (32 // N_L) * NUM_WARPS)
    L3: gl.constexpr = gl.BlockedLayout(size_per_thread=[T, E_T, N // N_L], threads_per_warp=[1, 32 // N_L, N_L],
                                        warps_per_cta=[1, NUM_WARPS, 1], order=[2, 1, 0])
    if ATOMIC:
        pid_b = gl.program_id(0)
        pid_e = gl.program_id(1)
    else:
        pid_e = gl.program_id(0)
        pid_b = gl.program_id(1)
    _bwd_pass(xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr, z_ptr, g_ptr,
              dxf_ptr, ddtf_ptr, dz_ptr, dBf_ptr, dCf_ptr, dAf_ptr, dDf_ptr, dbiasf_ptr, ck_ptr, scr_ptr,
              pid_b, pid_e, B, L, E,
              s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl, s_zb, s_zl, s_gb, s_gl,
              False, True, T, BLOCK_E, N, SEG, ATOMIC, L3)
    _cta_barrier()
    _bwd_pass(xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr, z_ptr, g_ptr,
              dxb_ptr, ddtb_ptr, dz_ptr, dBb_ptr, dCb_ptr, dAb_ptr, dDb_ptr, dbiasb_ptr, ck_ptr, scr_ptr,
              pid_b, pid_e, B, L, E,
              s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl, s_zb, s_zl, s_gb, s_gl,
              True, False, T, BLOCK_E, N, SEG, ATOMIC, L3)
