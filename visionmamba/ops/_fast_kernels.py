"""Triton kernels of the `fast` bidirectional selective scan (see `visionmamba.ops.fast`).

Imported only by `visionmamba.ops.fast` when a kernel is launched, so ``import visionmamba`` never imports triton.

Layout: every per-token tensor is (batch, L, channels) with unit channel stride (the layout the mixer's linear layers
produce), so a (T, BLOCK_E) tile of consecutive tokens is a set of row loads and no transpose or flip is needed; the
reverse direction walks the time axis backwards (row i of chunk c is token L-1-(c*T+i)).

Grid: one program per (block of BLOCK_E channels, batch row); it runs BOTH directions one after the other (so the
output and dz combine the two directions without atomics: pass 2 reads back what pass 1 wrote, after a CTA barrier).
The sequence is processed in chunks of T tokens; inside a chunk the recurrence h_t = a_t h_{t-1} + b_t
(a = exp(Δ A), b = Δ x B, a (T, BLOCK_E, N) register tile) is one `tl.associative_scan` along the chunk axis, and the
(BLOCK_E, N) state is carried in registers from chunk to chunk. State arithmetic is fp32. A is loaded as a
(1, BLOCK_E, N) tile: that load anchors the layout of the 3-D tiles at 4 states per thread, 4 lanes over N, so the
reductions over N take 2 shuffle rounds instead of 4.

Forward: pass 1 writes y_f (pre-gate) to the output, pass 2 writes (y_f + y_b) / 2 * SiLU(z). The next chunk's input
tiles are loaded while the current one computes (PREFETCH).

Backward, per direction, by recomputation (nothing of size (B, L, E, N) is stored):
  phase 1: forward sweep storing the state entering each segment of SEG chunks (skipped when the whole sequence is
           one segment, the default for L <= 256 tokens);
  phase 2: segments in reverse order: (2a) forward through the segment keeping the state entering each chunk in
           a per-program scratch (min(SEG, n_chunks) slots of (BLOCK_E, N) fp32), then (2b) its chunks in reverse
           order: recompute a, b, h inside the chunk from its slot, and the adjoint dh_t = gy_t C_t + a_{t+1} dh_{t+1}
           as one reverse `tl.associative_scan` whose elements carry (first a, exclusive product, sum), so that
           neither a shifted tensor nor a division is needed; the adjoint entering from the right is carried as
           u = a_T dh_T. From h, dh and a_t h_{t-1} = h_t - b_t come dx, dΔ (-> d dt, d dt_bias), dA, dB, dC, dD
           and dz. Inputs of the next chunk are prefetched.
dB and dC reduce over channels: per-channel-block partials summed by the caller (deterministic), or, with many
channel blocks (ATOMIC), relaxed fp32 atomics with a (batch, channel-block) grid so that concurrently running
programs add to different rows. dA, dD, d dt_bias: relaxed fp32 atomics over the batch rows into zeroed buffers (a
per-batch-row partial and a sum launch per parameter cost more than the adds).

Measured (H200, bf16, B 128, L 197; `tests/gpu/test_fast_scan_gpu.py --bench`): forward 0.21 ms (E 384) / 0.41 ms
(E 768), forward+backward 1.80 / 3.52 ms, against mamba-ssm's two `selective_scan_fn` calls 0.79 / 1.55 ms and
3.25 / 6.35 ms (kernels alone; 1.34 / 2.62 and 3.94 / 7.73 ms with the transposes and flips of the stock layout).
The backward is latency-bound (255 registers, one warp per program, ~45 instructions per state element per chunk):
see the notes in `visionmamba.ops.fast`.
"""
from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _lin_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier segment: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adj_combine(f_late, p_late, s_late, f_early, p_early, s_early):
    # Reverse scan: the accumulated (later-in-time) segment comes first. A segment [s..e] of the adjoint recurrence
    # w_t = c_t + a_{t+1} w_{t+1} is (F = a_s, P = a_{s+1}..a_e, S = w_s with w_{e+1} = 0).
    m = p_early * f_late
    return f_early, m * p_late, s_early + m * s_late


@triton.jit
def _softplus(v):
    # torch.nn.functional.softplus (threshold 20) without the cancellation of log(1 + exp(v)) for very negative v
    ev = tl.exp(tl.minimum(v, 20.0))
    return tl.where(v > 20.0, v, tl.where(v < -15.0, ev, tl.log(1.0 + ev)))


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _last_row(t2, x3):
    # row T-1 of a (T, BE, N) tile as (BE, N)
    return tl.sum(tl.where(t2[:, :, None] == (x3.shape[0] - 1), x3, 0.0), axis=0)


@triton.jit
def _time_rows(c, L, T: tl.constexpr, REVERSE: tl.constexpr):
    """Token index of each row of chunk c (reversed time for the reverse direction) and its validity."""
    tau = c * T + tl.arange(0, T)
    valid = (tau < L) & (tau >= 0)
    if REVERSE:
        t = L - 1 - tau
    else:
        t = tau
    return tl.where(valid, t, 0), valid


@triton.jit
def _load_tile(ptr, b_off, t, s_l, cols, mask):
    """(T, X) tile of a (B, L, X) tensor with unit stride along X, as fp32."""
    return tl.load(ptr + b_off + t[:, None] * s_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl,
                  e_offs, e_mask, n_offs, T: tl.constexpr, REVERSE: tl.constexpr):
    t, valid = _time_rows(c, L, T, REVERSE)
    m2 = valid[:, None] & e_mask[None, :]
    x = _load_tile(x_ptr, b64 * s_xb, t, s_xl, e_offs, m2)
    dt = _load_tile(dt_ptr, b64 * s_dtb, t, s_dtl, e_offs, m2)
    Bm = _load_tile(b_ptr, b64 * s_bb, t, s_bl, n_offs, valid[:, None])
    Cm = _load_tile(c_ptr, b64 * s_cb, t, s_cl, n_offs, valid[:, None])
    return x, dt, Bm, Cm


@triton.jit
def _chunk_states(x, dt, Bm, bias, A2, m2, h):
    """Δ, a = exp(Δ A), b = Δ x B and the states h_t of one chunk entered with state h."""
    delta = tl.where(m2, _softplus(dt + bias[None, :]), 0.0)
    a = tl.exp2(delta[:, :, None] * A2)
    bx = (delta * x)[:, :, None] * Bm[:, None, :]
    pa, hl = tl.associative_scan((a, bx), 0, _lin_combine)
    return delta, a, bx, hl + pa * h[None, :, :]


@triton.jit
def _fwd_pass(x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, z_ptr, out_ptr,
              pid_b, L, E,
              s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol,
              e_offs, e_mask,
              REVERSE: tl.constexpr, FIRST: tl.constexpr,
              T: tl.constexpr, BLOCK_E: tl.constexpr, N: tl.constexpr, NUM_STAGES: tl.constexpr,
              PREFETCH: tl.constexpr):
    n_offs = tl.arange(0, N)
    rows2 = tl.broadcast_to(tl.arange(0, T)[:, None], (T, BLOCK_E))
    # loaded as (1, BLOCK_E, N): a 3-D load anchors the layout of the (T, BLOCK_E, N) tiles with several states
    # per thread (the reductions over N then need fewer shuffles)
    A2 = tl.load(a_ptr + e_offs[None, :, None] * N + n_offs[None, None, :], mask=e_mask[None, :, None],
                 other=0.0) * 1.4426950408889634
    Dv = tl.load(d_ptr + e_offs, mask=e_mask, other=0.0)
    bias = tl.load(bias_ptr + e_offs, mask=e_mask, other=0.0)
    b64 = pid_b.to(tl.int64)
    h = tl.zeros((BLOCK_E, N), dtype=tl.float32)
    n_chunks = tl.cdiv(L, T)
    if PREFETCH:
        nx, ndt, nB, nC = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, 0, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                        s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
    for c in tl.range(0, n_chunks, num_stages=NUM_STAGES):
        t, valid = _time_rows(c, L, T, REVERSE)
        m2 = valid[:, None] & e_mask[None, :]
        if PREFETCH:
            x, dt, Bm, Cm = nx, ndt, nB, nC
            # the next chunk's tiles are in flight while this chunk computes (past the end: fully masked)
            nx, ndt, nB, nC = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c + 1, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                            s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
        else:
            x, dt, Bm, Cm = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                          s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
        delta, a, bx, hs = _chunk_states(x, dt, Bm, bias, A2, m2, h)
        y = tl.sum(hs * Cm[:, None, :], axis=2) + Dv[None, :] * x
        h = _last_row(rows2, hs)
        o_ptrs = out_ptr + b64 * s_ob + t[:, None] * s_ol + e_offs[None, :]
        if FIRST:
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m2)
        else:
            z = _load_tile(z_ptr, b64 * s_zb, t, s_zl, e_offs, m2)
            prev = tl.load(o_ptrs, mask=m2, other=0.0).to(tl.float32)
            res = (prev + y) * 0.5 * (z * _sigmoid(z))
            tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def bimamba_fwd_kernel(
        xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr,
        xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr,
        z_ptr, out_ptr, L, E,
        s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl,
        s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl,
        s_zb, s_zl, s_ob, s_ol,
        T: tl.constexpr, BLOCK_E: tl.constexpr, N: tl.constexpr, NUM_STAGES: tl.constexpr,
        PREFETCH: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1)
    e_offs = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < E
    _fwd_pass(xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr, z_ptr, out_ptr, pid_b, L, E,
              s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl, s_zb, s_zl, s_ob, s_ol,
              e_offs, e_mask, False, True, T, BLOCK_E, N, NUM_STAGES, PREFETCH)
    # pass 2 reads what other threads of this program wrote in pass 1
    tl.debug_barrier()
    _fwd_pass(xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr, z_ptr, out_ptr, pid_b, L, E,
              s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl, s_zb, s_zl, s_ob, s_ol,
              e_offs, e_mask, True, False, T, BLOCK_E, N, NUM_STAGES, PREFETCH)


@triton.jit
def _bwd_chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, g_ptr, dz_ptr, scr_base, j, c, L, E, b64,
                      s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_gb, s_gl,
                      e_offs, e_mask, n_offs, T: tl.constexpr, BLOCK_E: tl.constexpr, N: tl.constexpr,
                      REVERSE: tl.constexpr, FIRST: tl.constexpr):
    """Everything phase 2 reads for chunk c (slot j of the segment scratch); j < 0 loads nothing."""
    t, valid = _time_rows(c, L, T, REVERSE)
    m2 = valid[:, None] & e_mask[None, :]
    x, dt, Bm, Cm = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                  s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
    z = _load_tile(z_ptr, b64 * s_zb, t, s_zl, e_offs, m2)
    g = _load_tile(g_ptr, b64 * s_gb, t, s_gl, e_offs, m2)
    jmask = (tl.zeros((BLOCK_E, N), tl.int32) + j) >= 0
    h0 = tl.load(scr_base + tl.maximum(j, 0) * BLOCK_E * N, mask=jmask, other=0.0)
    if FIRST:
        prev = tl.zeros((T, BLOCK_E), tl.float32)
    else:  # written by the first pass of this program (before the barrier between the passes)
        prev = _load_tile(dz_ptr, b64 * L * E, t, E, e_offs, m2)
    return x, dt, Bm, Cm, z, g, h0, prev


@triton.jit
def _bwd_pass(x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, z_ptr, g_ptr,
              dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, ck_ptr, scr_ptr,
              pid_b, pid_e, B, L, E,
              s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_gb, s_gl,
              e_offs, e_mask,
              REVERSE: tl.constexpr, FIRST: tl.constexpr,
              T: tl.constexpr, BLOCK_E: tl.constexpr, N: tl.constexpr, NUM_STAGES: tl.constexpr,
              SEG: tl.constexpr, ATOMIC: tl.constexpr):
    n_offs = tl.arange(0, N)
    rows2 = tl.broadcast_to(tl.arange(0, T)[:, None], (T, BLOCK_E))
    en_mask = e_mask[:, None]
    # (1, BLOCK_E, N): see _fwd_pass
    A = tl.load(a_ptr + e_offs[None, :, None] * N + n_offs[None, None, :], mask=e_mask[None, :, None], other=0.0)
    A2 = A * 1.4426950408889634
    Dv = tl.load(d_ptr + e_offs, mask=e_mask, other=0.0)
    bias = tl.load(bias_ptr + e_offs, mask=e_mask, other=0.0)
    b64 = pid_b.to(tl.int64)
    n_chunks = tl.cdiv(L, T)
    n_seg = tl.cdiv(n_chunks, SEG)
    # segment checkpoints ck (B, n_seg, E, N); chunk-start states of the current segment in this program's scratch
    # slots scr[(b, e-block)][min(SEG, n_chunks), BLOCK_E, N] (rewritten every segment)
    ck_base = ck_ptr + b64 * n_seg * E * N + e_offs[:, None] * N + n_offs[None, :]
    n_eb = tl.cdiv(E, BLOCK_E)
    slots = tl.minimum(SEG, n_chunks)  # the scratch holds min(SEG, n_chunks) slots per program
    scr_base = (scr_ptr + (b64 * n_eb + pid_e) * slots * (BLOCK_E * N)
                + tl.arange(0, BLOCK_E)[:, None] * N + n_offs[None, :])
    if ATOMIC:  # dB / dC: fp32 (B, L, N), zero-initialised, relaxed atomics over the channel blocks
        part_base = b64 * L * N
    else:  # per-channel-block partials (n_eblocks, B, L, N), summed by the caller
        part_base = (pid_e * B + b64) * L * N

    # ---- phase 1: the state entering every segment (next chunk's tiles prefetched) ----
    h = tl.zeros((BLOCK_E, N), dtype=tl.float32)
    tl.store(ck_base, h, mask=en_mask)
    nx, ndt, nB, nC = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, 0, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                    s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
    for s in tl.range(0, n_seg - 1):
        for j in tl.range(0, SEG, num_stages=NUM_STAGES):
            c = s * SEG + j
            t, valid = _time_rows(c, L, T, REVERSE)
            m2 = valid[:, None] & e_mask[None, :]
            x, dt, Bm = nx, ndt, nB
            nx, ndt, nB, nC = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c + 1, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                            s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
            delta, a, bx, hs = _chunk_states(x, dt, Bm, bias, A2, m2, h)
            h = _last_row(rows2, hs)
        tl.store(ck_base + (s + 1) * E * N, h, mask=en_mask)

    # ---- phase 2: segments in reverse order ----
    u = tl.zeros((BLOCK_E, N), dtype=tl.float32)  # a_{t+1} dh_{t+1} entering the chunk from the right
    dA_acc = tl.zeros((BLOCK_E, N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for ss in tl.range(0, n_seg):
        s = n_seg - 1 - ss
        c0 = s * SEG
        nj = tl.minimum(n_chunks - c0, SEG)
        tl.debug_barrier()  # the previous segment's reads of the scratch slots are done
        # 2a: forward through the segment, keeping the state entering each chunk
        h = tl.load(ck_base + s * E * N, mask=en_mask, other=0.0)
        nx, ndt, nB, nC = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c0, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                        s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
        for j in tl.range(0, nj - 1, num_stages=NUM_STAGES):
            tl.store(scr_base + j * BLOCK_E * N, h)
            c = c0 + j
            t, valid = _time_rows(c, L, T, REVERSE)
            m2 = valid[:, None] & e_mask[None, :]
            x, dt, Bm = nx, ndt, nB
            nx, ndt, nB, nC = _chunk_inputs(x_ptr, dt_ptr, b_ptr, c_ptr, c + 1, L, b64, s_xb, s_xl, s_dtb, s_dtl,
                                            s_bb, s_bl, s_cb, s_cl, e_offs, e_mask, n_offs, T, REVERSE)
            delta, a, bx, hs = _chunk_states(x, dt, Bm, bias, A2, m2, h)
            h = _last_row(rows2, hs)
        tl.store(scr_base + (nj - 1) * BLOCK_E * N, h)
        tl.debug_barrier()
        # 2b: the segment's chunks in reverse order, the next one's inputs in flight
        px, pdt, pB, pC, pz, pg, ph0, pprev = _bwd_chunk_inputs(
            x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, g_ptr, dz_ptr, scr_base, nj - 1, c0 + nj - 1, L, E, b64,
            s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_gb, s_gl,
            e_offs, e_mask, n_offs, T, BLOCK_E, N, REVERSE, FIRST)
        for jj in tl.range(0, nj, num_stages=NUM_STAGES):
            j = nj - 1 - jj
            c = c0 + j
            t, valid = _time_rows(c, L, T, REVERSE)
            m2 = valid[:, None] & e_mask[None, :]
            x, dt, Bm, Cm, z, g, h0, prev = px, pdt, pB, pC, pz, pg, ph0, pprev
            px, pdt, pB, pC, pz, pg, ph0, pprev = _bwd_chunk_inputs(
                x_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, g_ptr, dz_ptr, scr_base, j - 1, c - 1, L, E, b64,
                s_xb, s_xl, s_dtb, s_dtl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_gb, s_gl,
                e_offs, e_mask, n_offs, T, BLOCK_E, N, REVERSE, FIRST)
            off_o = b64 * L * E + t[:, None] * E + e_offs[None, :]  # the (B, L, E) contiguous gradient buffers
            v = dt + bias[None, :]
            sz = _sigmoid(z)
            gy = g * (z * sz) * 0.5
            # forward recomputation inside the chunk; what needs h is consumed at once (short live ranges)
            delta, a, bx, hs = _chunk_states(x, dt, Bm, bias, A2, m2, h0)
            dx_ = delta * x
            y = tl.sum(hs * Cm[:, None, :], axis=2) + Dv[None, :] * x
            dCo = tl.sum(hs * gy[:, :, None], axis=1)  # (T, N)
            ha = hs - bx  # a_t h_{t-1}
            # adjoint: dh_t = gy_t C_t + a_{t+1} dh_{t+1}
            cg = gy[:, :, None] * Cm[:, None, :]
            _f, pe, se = tl.associative_scan((a, tl.full(a.shape, 1.0, tl.float32), cg), 0, _adj_combine,
                                             reverse=True)
            dh = se + pe * u[None, :, :]
            u = tl.sum(tl.where(rows2[:, :, None] == 0, _f * dh, 0.0), axis=0)  # _f == a: [t..] starts with a_t
            q = dh * ha
            dA_acc += tl.sum(delta[:, :, None] * q, axis=0)
            s2 = tl.sum(q * A, axis=2)
            s1 = tl.sum(dh * Bm[:, None, :], axis=2)
            dBo = tl.sum(dh * dx_[:, :, None], axis=1)  # (T, N)
            ddelta = x * s1 + s2
            dxo = delta * s1 + gy * Dv[None, :]
            ddt = tl.where(m2, ddelta * _sigmoid(v), 0.0)
            dbias_acc += tl.sum(ddt, axis=0)
            dD_acc += tl.sum(gy * x, axis=0)
            dzp = g * 0.5 * y * (sz * (1.0 + z * (1.0 - sz)))
            tl.store(dx_ptr + off_o, dxo.to(dx_ptr.dtype.element_ty), mask=m2)
            tl.store(ddt_ptr + off_o, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
            tl.store(dz_ptr + off_o, (prev + dzp).to(dz_ptr.dtype.element_ty), mask=m2)
            off_bn = part_base + t[:, None] * N + n_offs[None, :]
            if ATOMIC:
                tl.atomic_add(dB_ptr + off_bn, dBo, mask=valid[:, None], sem="relaxed")
                tl.atomic_add(dC_ptr + off_bn, dCo, mask=valid[:, None], sem="relaxed")
            else:
                tl.store(dB_ptr + off_bn, dBo, mask=valid[:, None])
                tl.store(dC_ptr + off_bn, dCo, mask=valid[:, None])
    # sums over the batch rows: relaxed fp32 atomics into zeroed (E, N) / (E,) buffers (no partials, no reduce launch)
    tl.atomic_add(dA_ptr + e_offs[:, None] * N + n_offs[None, :], dA_acc, mask=en_mask, sem="relaxed")
    tl.atomic_add(dD_ptr + e_offs, dD_acc, mask=e_mask, sem="relaxed")
    tl.atomic_add(dbias_ptr + e_offs, dbias_acc, mask=e_mask, sem="relaxed")


@triton.jit
def bimamba_bwd_kernel(
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
        T: tl.constexpr, BLOCK_E: tl.constexpr, N: tl.constexpr, NUM_STAGES: tl.constexpr, SEG: tl.constexpr,
        ATOMIC: tl.constexpr):
    """Gradient buffers: dx*, ddt*, dz (B, L, E) contiguous; dB*, dC* (n_eblocks, B, L, N) fp32 per-channel-block
    partials; dA* (E, N), dD*, dbias* (E,) fp32, zeroed (added to); ck (B, n_segments, E, N) fp32
    segment checkpoints; scr (B * n_eblocks, min(SEG, n_chunks), BLOCK_E, N) fp32 scratch."""
    if ATOMIC:
        pid_b = tl.program_id(0)
        pid_e = tl.program_id(1)
    else:
        pid_e = tl.program_id(0)
        pid_b = tl.program_id(1)
    e_offs = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < E
    _bwd_pass(xf_ptr, dtf_ptr, Bf_ptr, Cf_ptr, Af_ptr, Df_ptr, biasf_ptr, z_ptr, g_ptr,
              dxf_ptr, ddtf_ptr, dz_ptr, dBf_ptr, dCf_ptr, dAf_ptr, dDf_ptr, dbiasf_ptr, ck_ptr, scr_ptr,
              pid_b, pid_e, B, L, E,
              s_xfb, s_xfl, s_dtfb, s_dtfl, s_Bfb, s_Bfl, s_Cfb, s_Cfl, s_zb, s_zl, s_gb, s_gl,
              e_offs, e_mask, False, True, T, BLOCK_E, N, NUM_STAGES, SEG, ATOMIC)
    tl.debug_barrier()
    _bwd_pass(xb_ptr, dtb_ptr, Bb_ptr, Cb_ptr, Ab_ptr, Db_ptr, biasb_ptr, z_ptr, g_ptr,
              dxb_ptr, ddtb_ptr, dz_ptr, dBb_ptr, dCb_ptr, dAb_ptr, dDb_ptr, dbiasb_ptr, ck_ptr, scr_ptr,
              pid_b, pid_e, B, L, E,
              s_xbb, s_xbl, s_dtbb, s_dtbl, s_Bbb, s_Bbl, s_Cbb, s_Cbl, s_zb, s_zl, s_gb, s_gl,
              e_offs, e_mask, True, False, T, BLOCK_E, N, NUM_STAGES, SEG, ATOMIC)


# ------------------------------------------------------------------------------------------------------------------
# Bidirectional depthwise causal conv + SiLU in the (B, L, E) layout (`visionmamba.ops.fast.bimamba_conv`)
#
#   x_f[t] = SiLU(b_f + sum_k w_f[k] x[t - (W-1) + k])      (the official causal conv1d)
#   x_b[t] = SiLU(b_b + sum_k w_b[k] x[t + (W-1) - k])      (conv1d_b on the flipped sequence, seen unflipped)
#
# Grid: (row tiles of BLOCK_T tokens, channel blocks, batch). Neighbouring rows are re-read with shifted loads (L1/L2
# hits), so neither a padded copy nor a transpose is made. Backward recomputes the pre-activations it needs.
# ------------------------------------------------------------------------------------------------------------------

@triton.jit
def _row_tile(L, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's tile on a (row tiles, channel blocks, batch) grid: batch row (int64), token rows, channels,
    channel mask, and the (rows, channels) mask of valid elements."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_offs = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < E
    return tl.program_id(2).to(tl.int64), rows, e_offs, e_mask, (rows < L)[:, None] & e_mask[None, :]


@triton.jit
def _shifted_rows(ptr, b_off, rows, shift, s_l, e_offs, e_mask, L):
    """x[rows + shift] as fp32, zero outside [0, L) (the conv's zero padding)."""
    r = rows + shift
    m = ((r >= 0) & (r < L))[:, None] & e_mask[None, :]
    return tl.load(ptr + b_off + r[:, None] * s_l + e_offs[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _conv_pre(x_ptr, b_off, rows, s_xl, e_offs, e_mask, L, w_ptr, bias, W: tl.constexpr, REVERSE: tl.constexpr):
    """Pre-activation of one direction at `rows`: bias + sum_k w[k] x[rows -/+ (W-1-k)]."""
    acc = tl.zeros((rows.shape[0], e_offs.shape[0]), tl.float32) + bias[None, :]
    for k in tl.static_range(W):
        w = tl.load(w_ptr + e_offs * W + k, mask=e_mask, other=0.0)
        if REVERSE:
            shift = (W - 1) - k
        else:
            shift = k - (W - 1)
        acc += w[None, :] * _shifted_rows(x_ptr, b_off, rows, shift, s_xl, e_offs, e_mask, L)
    return acc


@triton.jit
def bimamba_conv_fwd_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, of_ptr, ob_ptr, L, E, s_xb, s_xl,
                            W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    b64, rows, e_offs, e_mask, m2 = _row_tile(L, E, BLOCK_T, BLOCK_E)
    x_off = b64 * s_xb
    o_offs = b64 * L * E + rows[:, None] * E + e_offs[None, :]  # outputs are contiguous (B, L, E)
    bias_f = tl.load(bf_ptr + e_offs, mask=e_mask, other=0.0)
    bias_b = tl.load(bb_ptr + e_offs, mask=e_mask, other=0.0)
    pf = _conv_pre(x_ptr, x_off, rows, s_xl, e_offs, e_mask, L, wf_ptr, bias_f, W, False)
    tl.store(of_ptr + o_offs, (pf * _sigmoid(pf)).to(of_ptr.dtype.element_ty), mask=m2)
    pb = _conv_pre(x_ptr, x_off, rows, s_xl, e_offs, e_mask, L, wb_ptr, bias_b, W, True)
    tl.store(ob_ptr + o_offs, (pb * _sigmoid(pb)).to(ob_ptr.dtype.element_ty), mask=m2)


@triton.jit
def bimamba_conv_bwd_gp_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, gf_ptr, gb_ptr, gp_ptr, dpar_ptr,
                               L, E, s_xb, s_xl,
                               W: tl.constexpr, W_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Backward, step 1: the gradients at the two pre-activations, gp = g * SiLU'(pre), into gp (2, B, L, E) (fp32, or
    the inputs' 16-bit dtype: one more rounding, like dx's own, for half the traffic of the largest buffer), and the
    weight/bias gradients (from the unrounded gp) added with relaxed fp32 atomics to the zeroed dpar (2, E * W + E) =
    [dw (E, W) | db (E,)] per direction.

    Grid (channel blocks, batch): each program walks all row tiles of its batch row, accumulating gp * x per tap
    elementwise in registers, and reduces over rows once at the end (a cross-thread reduction per tile would cost
    more than the tile's arithmetic). Conv widths up to 4 (the models' d_conv)."""
    pid_e = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    B = tl.num_programs(1)
    e_offs = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < E
    x_off = b64 * s_xb
    taps = tl.arange(0, W_P2)
    w_offs = e_offs[None, :] * W + taps[:, None]  # dw (E, W), as conv1d.weight[:, 0]
    wm = (taps < W)[:, None] & e_mask[None, :]
    for d in tl.static_range(2):  # 0: forward (causal) conv, 1: backward-branch (anti-causal) conv
        if d == 0:
            w_ptr, bias_ptr, g_ptr = wf_ptr, bf_ptr, gf_ptr
        else:
            w_ptr, bias_ptr, g_ptr = wb_ptr, bb_ptr, gb_ptr
        bias = tl.load(bias_ptr + e_offs, mask=e_mask, other=0.0)
        db_acc = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        # one elementwise accumulator per tap (W <= 4, checked by the caller)
        acc0 = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        acc1 = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        acc2 = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        acc3 = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        for t0 in tl.range(0, L, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            m2 = (rows < L)[:, None] & e_mask[None, :]
            offs = b64 * L * E + rows[:, None] * E + e_offs[None, :]
            pre = _conv_pre(x_ptr, x_off, rows, s_xl, e_offs, e_mask, L, w_ptr, bias, W, d == 1)
            s = _sigmoid(pre)
            g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)  # rows >= L: g = 0, so gp = 0
            gp = g * s * (1.0 + pre * (1.0 - s))
            tl.store(gp_ptr + d * B * L * E + offs, gp.to(gp_ptr.dtype.element_ty), mask=m2)
            db_acc += gp
            for k in tl.static_range(W):
                if d == 0:
                    shift = k - (W - 1)
                else:
                    shift = (W - 1) - k
                xk = _shifted_rows(x_ptr, x_off, rows, shift, s_xl, e_offs, e_mask, L)
                if k == 0:
                    acc0 += gp * xk
                elif k == 1:
                    acc1 += gp * xk
                elif k == 2:
                    acc2 += gp * xk
                else:
                    acc3 += gp * xk
        dw = (tl.where(taps[:, None] == 0, tl.sum(acc0, axis=0)[None, :], 0.0)
              + tl.where(taps[:, None] == 1, tl.sum(acc1, axis=0)[None, :], 0.0)
              + tl.where(taps[:, None] == 2, tl.sum(acc2, axis=0)[None, :], 0.0)
              + tl.where(taps[:, None] == 3, tl.sum(acc3, axis=0)[None, :], 0.0))
        tl.atomic_add(dpar_ptr + d * (E * W + E) + w_offs, dw, mask=wm, sem="relaxed")
        tl.atomic_add(dpar_ptr + d * (E * W + E) + E * W + e_offs, tl.sum(db_acc, axis=0), mask=e_mask, sem="relaxed")


@triton.jit
def bimamba_conv_bwd_dx_kernel(gp_ptr, wf_ptr, wb_ptr, dx_ptr, B, L, E,
                               W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Backward, step 2: dx[t] = sum_j w_f[W-1-j] gp_f[t+j] + w_b[W-1-j] gp_b[t-j]; dx contiguous (B, L, E)."""
    b64, rows, e_offs, e_mask, m2 = _row_tile(L, E, BLOCK_T, BLOCK_E)
    dx = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for j in tl.static_range(W):
        wf = tl.load(wf_ptr + e_offs * W + (W - 1 - j), mask=e_mask, other=0.0)
        wb = tl.load(wb_ptr + e_offs * W + (W - 1 - j), mask=e_mask, other=0.0)
        dx += wf[None, :] * _shifted_rows(gp_ptr, b64 * L * E, rows, j, E, e_offs, e_mask, L)
        dx += wb[None, :] * _shifted_rows(gp_ptr, (B + b64) * L * E, rows, -j, E, e_offs, e_mask, L)
    tl.store(dx_ptr + b64 * L * E + rows[:, None] * E + e_offs[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------------------------------------
# dt_proj, the low-rank (R <= 64) projection dt = dt_low W^T of both directions, and its backward in one pass over ddt
#
# cuBLAS runs these (B L, R) x (R, E) products, with R = 16 (Vim-T, padded from 12), as general GEMMs at about half the
# bandwidth of their one large operand (dt, or ddt), and the backward as two GEMMs (d dt_low = ddt W and the split-K
# dW = ddt^T dt_low, plus its reduce kernel) that each read ddt. Here one launch covers both directions (grid axis 2):
# the forward writes a (BM, BE) tile of dt per program from a (BM, R) row tile and the (R, BE) weight tile, the
# backward reads each (BM, BE) tile of ddt once for both products, d dt_low accumulated over the channel tiles in
# registers and dW added with fp32 atomics into a zeroed (2, E, R) buffer.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _dt_proj_fwd_tile(a_ptr, w_ptr, o_ptr, M, E, R, s_am, s_om, pid_m, pid_e,
                      RW: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr):
    m = pid_m * BM + tl.arange(0, BM)
    e = pid_e * BE + tl.arange(0, BE)
    r = tl.arange(0, RP)
    a = tl.load(a_ptr + m[:, None].to(tl.int64) * s_am + r[None, :], mask=(m < M)[:, None] & (r < R)[None, :],
                other=0.0)  # (BM, RP)
    wt = tl.load(w_ptr + e[None, :] * RW + r[:, None], mask=(e < E)[None, :] & (r < RW)[:, None],
                 other=0.0)  # (RP, BE) = W^T
    acc = tl.dot(a, wt.to(a.dtype), input_precision="ieee")
    tl.store(o_ptr + m[:, None].to(tl.int64) * s_om + e[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(m < M)[:, None] & (e < E)[None, :])


@triton.jit
def dt_proj_fwd_kernel(af_ptr, wf_ptr, of_ptr, ab_ptr, wb_ptr, ob_ptr, M, E, R, s_afm, s_abm, s_om,
                       RW: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr):
    """out_d (M, E) = a_d (M, R) @ w_d (E, RW)^T for d = f, b (grid axis 2), RW <= R: a's columns past RW (zeros:
    x_proj's padding, which keeps R a multiple of 8 so a's tiles load as vectors) meet zero weights. a rows s_*m apart
    with unit stride along R, w contiguous, outputs contiguous. RP: R rounded up to a power of two >= 16. RW is a
    compile-time constant: with it the weight's rows (RW fp32, 48 bytes for Vim-T) are known 16-byte aligned and its
    mask uniform per 4 columns, so the weight loads as vectors (a runtime RW of 12 made them scalar: +0.17 ms per
    Vim-T training step)."""
    pid_m, pid_e = tl.program_id(0), tl.program_id(1)
    if tl.program_id(2) == 0:
        _dt_proj_fwd_tile(af_ptr, wf_ptr, of_ptr, M, E, R, s_afm, s_om, pid_m, pid_e, RW, RP, BM, BE)
    else:
        _dt_proj_fwd_tile(ab_ptr, wb_ptr, ob_ptr, M, E, R, s_abm, s_om, pid_m, pid_e, RW, RP, BM, BE)


@triton.jit
def _dt_proj_bwd_rows(g_ptr, a_ptr, w_ptr, da_ptr, dw_ptr, bc_ptr, M, E, R, s_gm, s_am, s_dam, pid_m,
                      RW: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, N: tl.constexpr):
    m = pid_m * BM + tl.arange(0, BM)
    r = tl.arange(0, RP)
    m_mask = (m < M)[:, None]
    r_mask = (r < R)[None, :]
    m64 = m[:, None].to(tl.int64)
    a = tl.load(a_ptr + m64 * s_am + r[None, :], mask=m_mask & r_mask, other=0.0)  # (BM, RP) dt_low rows
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for e0 in range(0, E, BE):
        e = e0 + tl.arange(0, BE)
        e_mask = (e < E)[None, :]
        g = tl.load(g_ptr + m64 * s_gm + e[None, :], mask=m_mask & e_mask, other=0.0)  # (BM, BE) of ddt
        w = tl.load(w_ptr + e[:, None] * RW + r[None, :], mask=(e < E)[:, None] & (r < RW)[None, :],
                    other=0.0)
        acc += tl.dot(g, w.to(g.dtype), input_precision="ieee")  # d dt_low += ddt W
        dw = tl.dot(tl.trans(g), a, input_precision="ieee")  # (BE, RP): this row tile's share of ddt^T dt_low
        tl.atomic_add(dw_ptr + e[:, None] * RW + r[None, :], dw, mask=(e < E)[:, None] & (r < RW)[None, :],
                      sem="relaxed")
    tl.store(da_ptr + m64 * s_dam + r[None, :], acc.to(da_ptr.dtype.element_ty), mask=m_mask & r_mask)
    if N > 0:
        # the rest of the row of d x_dbl = [d dt_low | dB | dC]: this row tile of the scan backward's fp32 channel
        # sums dB, dC (bc_ptr: dB's (M, N), dC's M * N elements after it), cast, so no separate cat builds the
        # x_proj GEMMs' operand
        n2 = tl.arange(0, 2 * N)
        col = tl.where(n2 < N, n2, n2 - N + M * N).to(tl.int64)  # dC's rows start M * N elements after dB's
        bc = tl.load(bc_ptr + m64 * N + col[None, :], mask=m_mask)  # (BM, 2N)
        tl.store(da_ptr + m64 * s_dam + R + n2[None, :], bc.to(da_ptr.dtype.element_ty), mask=m_mask)


@triton.jit
def dt_proj_bwd_kernel(gf_ptr, af_ptr, wf_ptr, daf_ptr, gb_ptr, ab_ptr, wb_ptr, dab_ptr, dw_ptr, bc_ptr, M, E, R,
                       s_gm, s_afm, s_abm, s_dam,
                       RW: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, N: tl.constexpr):
    """For d = f, b (grid axis 1): da_d (M, R) = g_d (M, E) @ w_d (E, RW) (zero past RW) and dw[d] (E, RW) += g_d^T @
    a_d, reading each g_d tile once. g_d rows s_gm apart (unit stride along E), a_d rows s_*m apart, da_d rows s_dam
    apart, w contiguous (RW a compile-time constant, as in `dt_proj_fwd_kernel`), dw a zeroed contiguous fp32 (2, E,
    RW). With N > 0, bc_ptr is the scan backward's dBC (4, M, N) fp32 = dB_f, dC_f, dB_b, dC_b, and each da_d row goes
    on past its R columns with d's dB and dC (2N columns, cast to da's dtype)."""
    pid_m = tl.program_id(0)
    if tl.program_id(1) == 0:
        _dt_proj_bwd_rows(gf_ptr, af_ptr, wf_ptr, daf_ptr, dw_ptr, bc_ptr, M, E, R, s_gm, s_afm, s_dam, pid_m, RW, RP,
                          BM, BE, N)
    else:
        _dt_proj_bwd_rows(gb_ptr, ab_ptr, wb_ptr, dab_ptr, dw_ptr + E * RW, bc_ptr + 2 * M * N, M, E, R, s_gm, s_abm,
                          s_dam, pid_m, RW, RP, BM, BE, N)
