"""`fast` backend: both directions of the bidirectional (Vim "v2") selective scan in one Triton launch.

    y = bimamba_scan(x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z)

x_*, dt_*, z: (B, L, E) in any float dtype (fp32, bf16, fp16), unit stride along E (other strides free, e.g. channel
views of one (B, L, 2E) projection); B_*, C_*: (B, L, N) with unit stride along N; A_*: (E, N) fp32 (already
``-exp(A_log)``); D_*, dt_bias_*: (E,) fp32. Returns (B, L, E) in x_f's dtype:

    y = (scan_fwd(x_f, ...) + scan_rev(x_b, ...)) / 2 * SiLU(z)

where scan_fwd runs t = 0..L-1 and scan_rev runs t = L-1..0, each with Δ = softplus(dt + dt_bias),
h_t = exp(Δ_t A) h_{t∓1} + Δ_t B_t x_t, y_t = <h_t, C_t> + D x_t, the state in fp32. When x_b, dt_b, B_b, C_b are the
backward branch's tensors on the *unflipped* time axis, scan_rev equals flip(scan(flip(.))) of the official Vim
backward branch, so the mixer needs no flips and no (B, E, L) transposes around the kernel.

The op is `torch.ops.visionmamba.bimamba_scan` (a `torch.library.custom_op` with autograd and a fake/meta kernel, so
`torch.compile` keeps it as one node); its backward is `torch.ops.visionmamba.bimamba_scan_bwd`, one more Triton launch
that recomputes instead of storing intermediates (kernel design: `visionmamba/ops/_fast_kernels.py`).

The mixer's training path uses `bimamba_inner` instead: the convs (`bimamba_conv`), both directions' x_proj / dt_proj
and the scan as one autograd node from in_proj's output xz (B, L, 2E) to y, whose hand-written backward lets the
x_proj dgrad GEMM accumulate into the scan's dx and has the scan and conv backward kernels write dz and dx into the
two halves of one d_xz buffer (no add and no cat kernels).

Where it runs: CUDA tensors -> Triton kernels; CPU tensors with ``TRITON_INTERPRET=1`` -> the same Triton kernels in
Triton's interpreter (tests); other CPU tensors -> `bimamba_scan_reference` (pure PyTorch). Triton is imported only
when a kernel is launched, never by ``import visionmamba``.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ref import _scan as _scan_plain  # chunked on GPUs, stepwise on CPUs; plain differentiable torch ops
from .ref import causal_conv1d_ref, selective_scan_ref

__all__ = [
    "CONFIG",
    "bimamba_conv",
    "bimamba_conv_reference",
    "bimamba_inner",
    "bimamba_scan",
    "bimamba_scan_into_x",
    "bimamba_scan_reference",
    "bwd_triton",
    "fwd_triton",
    "uses_triton",
]

# Launch configuration: chunk length T (tokens per associative scan), channels per program, warps per program;
# forward: prefetch of the next chunk; backward: chunks per checkpoint segment (``seg``; the whole sequence is one
# segment when L <= seg * T, which skips one recomputation sweep), optional ``atomic`` (default: atomics for dB/dC when
# there are more than 16 channel blocks, per-block partials otherwise); both scans: optional ``maxnreg`` (a register cap
# per thread, for occupancy). The first entry whose ``max_e`` >= E applies.
# Chosen from sweeps on an H200 (bf16, B 128, L 197, E 384 / 768): forward T 8 / BLOCK_E 32 / 2 warps with prefetch
# (0.21 / 0.40 ms; T 4 / 32 / 1 warp 0.29 / 0.44, T 16 / 32 / 4 warps 0.23 / 0.45, no prefetch 0.34 / 0.67);
# backward T 4 / BLOCK_E 16 / 1 warp / seg 64 (1.60 / 3.12 ms; T 2 / 16: 1.74 / 3.32, T 8 / 8: 1.84 / 3.80,
# T 8 / 16 / 2 warps: 2.22 / 4.36; partials instead of atomics: 1.67 / 3.27; re-swept in a later session: T 4 / 8:
# 1.92 / 3.70, T 2 / 16 / seg 128: 1.74 / 3.32, T 4 / 32 / 2 warps: 1.85 / 3.56, num_stages 2: slower; a
# token-sequential design (one token per iteration, no associative scan) measured 0.53 ms forward and 2.5 ms backward
# and was dropped). Convs: forward 0.06 / 0.11 ms, forward+backward 0.67 / 0.84 ms against 1.33 / 2.50 ms for the
# F.conv1d path with its transposes and pads. Gluon backward (H200, E 384 / 768 / B 32 x L 6085 x E 384), T 2, 1 warp,
# seg 128, split directions: N_L 2 with maxnreg 168 0.92 / 1.72 / 7.6 ms, N_L 1 0.96 / 1.65 / 9.8 ms (N_L 2: no register
# cap 1.09 / 2.08, maxnreg 128 0.95 / 1.77, 2 warps 1.12 / 1.92, T 4 1.36 / 2.66, seg 64 1.02 / 1.92, seg 32 1.04 /
# 1.99, not split 0.92 / 1.74; N_L 1 not split 1.09 / 1.65 / 15.1, seg 64 1.07 / 1.83, maxnreg 168 1.20 / 2.21, T 4
# 1.37 / 1.97); the previous Gluon backward (4 lanes per state, 2 channels per thread) 1.17 / 2.26 / 13.6. Split at
# batch 128 raised shufflemamba_tiny's training peak above the stock path's (4.54 vs 4.32 GiB of activations; small
# 8.93 vs 8.41), hence split_below. Gluon forward (H100, E 384 / 768): T 4 / E_T 1 / 1-2 warps 0.159-0.163 / 0.297-0.314
# ms against the Triton forward's 0.208 / 0.403 (T 2: 0.175 / 0.331, T 8: 0.165 / 0.321, E_T 2: 0.232 / 0.312); at
# B 64 0.116 vs 0.109 ms and at B 32, L 6085 3.5 vs 2.4 ms (too few programs; the Gluon forward now spreads states
# over lanes there, see "fwd_gluon"). ``min_programs`` (Triton forward): it halves BLOCK_E (down to 8) until batch *
# channel blocks reaches it (high resolution, small batches). Edit this dict or set VISIONMAMBA_FAST_CONFIG to override.
CONFIG = {
    "fwd": [dict(max_e=1 << 30, T=8, BLOCK_E=32, num_warps=2, prefetch=True, min_programs=1024)],
    "bwd": [dict(max_e=1 << 30, T=4, BLOCK_E=16, num_warps=1, seg=64)],
    # the Gluon backward (explicit layouts; `_fast_gluon`), used on CUDA unless this list is empty (then, and in
    # the CPU interpreter, which cannot run Gluon, or for d_state > 32, "bwd" applies): N_L lanes over the state
    # (BLOCK_E = 32 // N_L * num_warps); the two directions run in separate programs when batch * channel blocks is
    # below split_below (or as ``split`` says): twice the programs for small batches, but twice the scratch (the
    # states entering each chunk: B * E * L / T * N fp32 per direction in flight), which at batch 128 would put the
    # training step's peak memory above the stock path's. ``walk_k`` (default 4; divides seg): chunks per step of the
    # two forward walks (H200, B 128, L 197, E 384 / 768, N_L 2, maxnreg 168, backward launch: walk_k 4 0.78-0.79 /
    # 1.53-1.56 ms, 2 0.81 / 1.57, 8 0.81 / 1.57-1.63, one chunk per step (before) 0.92 / 1.72; at E 768 N_L 1
    # with walk_k 4 1.54; an L1 prefetch of the walk's rows 1-3 steps ahead changed nothing, nor did fetching the
    # 2b entering states two chunks ahead). ``red_k`` (default 1; programs with one direction (split) always use 1):
    # chunks whose dB / dC channel sums 2b takes together, one barrier, shared-memory pass and set of atomics per
    # group (H200, backward kernel: B 128, L 197, E 384 / 768: red_k 2 0.745 / 1.473 ms, 1 0.775 / 1.494; B 32, L
    # 6085, E 384, split: 2 8.96, 1 8.62 ms; red_k 4: 0.83 / 1.81; red_k 2 with maxnreg 160: 0.745, 176: 0.813 at E 384;
    # dropping the channel sums altogether: 0.70 ms at E 384, so they cost ~10 %). With each lane doing the per-token
    # work of its own rows (N_L 2): 0.733 ms at E 384, 6.86 at B 32, L 6085 (8.10 before); maxnreg 160 0.778, 176
    # 0.844, 192 0.856 (docs/results/fast_scan_gluon_bwd_lanes_h200.txt)
    "bwd_gluon": [dict(max_e=512, T=2, N_L=2, num_warps=1, seg=128, split_below=2048, maxnreg=168, walk_k=4, red_k=2),
                  dict(max_e=1 << 30, T=2, N_L=1, num_warps=1, seg=128, split_below=2048, walk_k=4, red_k=2)],
    # the Gluon forward (`_fast_gluon`): each thread owns E_T channels' whole states (BLOCK_E = E_T * 32 * num_warps),
    # or, where a batch gives fewer than min_warps_per_sm warps per SM, spreads each state over N_L = 2, 4 lanes
    # (lane_block_e channels per program, T = lane_rows * N_L; `_gluon_fwd_config`); used on CUDA unless this list is
    # empty. H200, bf16, forward launch in CUDA graphs (ms), whole states (T 4, 1 / 2 warps) / 2 lanes (T 8, 1 / 2
    # warps) / 4 lanes (T 8, 2 / 4 warps) / the Triton forward:
    #   B 128, L 197, E 384:  0.149 0.144 / 0.158 0.153 / 0.195 0.189 / 0.205
    #   B 128, L 197, E 768:  0.277 0.271 / 0.309 0.299 / 0.382 0.369 / 0.402
    #   B  96, L 197, E 384:  0.147 0.142 / 0.133 0.129 / 0.147 0.142 / 0.179
    #   B  64, L 197, E 384:  0.101 0.100 / 0.082 0.079 / 0.111 0.105 / 0.130
    #   B  64, L 197, E 768:  0.150 0.144 / 0.158 0.154 / 0.196 0.189 / 0.205
    #   B  32, L 197, E 384:  0.069 0.066 / 0.058 0.055 / 0.052 0.050 / 0.080
    #   B  32, L 197, E 768:  0.101 0.100 / 0.082 0.079 / 0.111 0.105 / 0.130
    #   B  32, L 785, E 384:  0.288 0.276 / 0.223 0.212 / 0.201 0.198 / 0.324
    #   B  32, L 6085, E 384: 2.234 2.133 / 1.688 1.603 / 1.533 1.498 / 2.438   (1248 px)
    # i.e. the fewest lanes that give ~1536 warps (11.6 per SM); N_L 8 measured 2.57-2.81 ms at 1248 px (more shuffles
    # per element than the extra warps recover). Rows per chunk: 4 lanes with T 16 / 4 warps 1.441 ms at 1248 px
    # (0.192 at L 785, 11.0 SASS instructions per element and token against 12.2 at T 8), 2 warps 1.456; 2 lanes with
    # T 16: 1.91-1.97 (224 registers), i.e. 4 rows per lane and 32 channels per program. The two directions in
    # separate programs meeting per group of tiles (atomic counters) were tried and dropped: 1.41-1.46 ms at 1248 px,
    # 2.77 against 2.29 at B 64 (README "Performance"; docs/results/fwd_split_directions_attempt.patch)
    # The two directions at once, in two warp groups of each program (`bimamba_fwd_dirs_gluon_kernel`): twice the
    # warps at the same cost per chunk; a rung between dirs_lanes lanes per state and twice as many (H200, bf16,
    # forward launch, ms; 2 lanes: T 8, 2 warps per direction; 4 lanes: T 16, 4 warps):
    #   B 32, L 6085, E 384 (1248 px):  4 lanes 1.441  / 2 lanes + dirs 1.313 / 4 lanes + dirs 1.74 (T 8), 1.89
    #   B 32, L 1601, E 384 (640 px):   4 lanes 0.388  / 2 lanes + dirs 0.355
    #   B 64, L 6085, E 384:            2 lanes 2.302  / 2 lanes + dirs 2.47, whole states + dirs 2.33-2.47
    #   B 128, L 197, E 384 (224 px):   whole   0.147  / whole + dirs 0.150-0.157 (E 768: 0.273 / 0.283-0.294)
    # With 4 lanes it does not pay at B 32: the cross-lane work costs more than the extra warps recover, at any
    # register cap; ncu at B 32, L 6085: 2 lanes + dirs 61 % of issue slots busy with 2.7 warps per scheduler and
    # 1.59 M instructions each, against 59 % / 2.8 for 4 lanes (docs/results/fwd_dirs_h200.json)
    "fwd_gluon": [dict(max_e=1 << 30, T=4, E_T=1, num_warps=2, min_warps_per_sm=11, max_lanes=4, lane_block_e=32,
                       lane_rows=4, dirs_lanes=2)],
    # bidirectional depthwise conv + SiLU: rows x channels per program
    "conv_fwd": [dict(max_e=1 << 30, BLOCK_T=32, BLOCK_E=64, num_warps=4)],
    # backward step 1 (gp, dw, db): one program per (channel block, batch row) looping over row tiles; step 2 (dx)
    # uses the forward's tiling
    "conv_bwd": [dict(max_e=1 << 30, BLOCK_T=16, BLOCK_E=64, num_warps=2)],
    # the Gluon convs (`_fast_gluon`; the backward in one launch), used on CUDA unless the list is empty: VE channels
    # per thread (BLOCK_E = VE * 32 * num_warps), tiles of BLOCK_T rows; a batch row's rows are split over programs
    # (at least min_rows each) until there are min_programs
    # (H200, bf16, one-launch CUDA-graph timing, B 128 x L 197 / B 32 x L 6085, E 384: min_programs 4096 24.1 / 138.9
    # us, 2048 23.9 / 164.3, 8192 23.8 / 140.3 at BLOCK_T 4; BLOCK_T 8 23.0 / 150.0; VE 1 and maxnreg 48 slower;
    # docs/results/conv_sweep_h200.json; the backward: its defaults best at 224 px, and register caps of 96 / 80 / 72
    # (more resident warps) slower)
    "conv_fwd_gluon": [dict(max_e=1 << 30, BLOCK_T=4, VE=2, num_warps=1, min_programs=4096, min_rows=48)],
    # (H200, bf16, backward launch at B 128, L 197, E 384 / 768, and B 32, L 6085, E 384: BLOCK_T 8 / VE 1 0.056 /
    # 0.090 / 0.345 ms, BLOCK_T 8 / VE 2 0.073 / 0.087 / 0.245, BLOCK_T 4 / VE 2 0.084 / 0.093 / 0.273, unsplit
    # 0.070 / 0.086 / 1.28; the two Triton kernels 0.187 / 0.306 / 2.00)
    "conv_bwd_gluon": [dict(max_e=512, BLOCK_T=8, VE=1, num_warps=1, min_programs=2048, min_rows=48),
                       dict(max_e=1 << 30, BLOCK_T=8, VE=2, num_warps=1, min_programs=2048, min_rows=48)],
    # dt_proj (`dt_proj_fwd_triton` / `dt_proj_bwd_triton`): rows x channels per program
    # (BM_fp32: the row tile for fp32 inputs, whose dot operands take twice the shared memory)
    "dt_proj_fwd": [dict(max_e=1 << 30, BM=64, BE=128, num_warps=4, BM_fp32=32)],
    # (H200, Vim-T B 128, both directions in CUDA graphs: forward 16.1 us at BM 64 / BE 128 (BM 128 / BE 64 16.5,
    # 128 / 128 18.2, 64 / 256 17.6) against 22.3 for two cuBLAS products with their weight casts; backward 20.4 us at
    # BM 256 / BE 64 / 8 warps (128 / 128 20.9, 128 / 64 21.2, 64 / 64 27.6) against 41.8 for dgrad + split-K wgrad)
    "dt_proj_bwd": [dict(max_e=1 << 30, BM=256, BE=64, num_warps=8, BM_fp32=64)],
}


def _apply_config_override(text: Optional[str]) -> None:
    """``VISIONMAMBA_FAST_CONFIG='{"bwd": {"T": 4, "BLOCK_E": 16, "num_warps": 1, "seg": 64}}'``: replace the
    launch configuration of the named kernels (one dict, or a list of dicts with ``max_e``), for tuning sweeps."""
    if not text:
        return
    import json

    try:
        override = json.loads(text)
        for kind, cfgs in override.items():
            if kind not in CONFIG:
                raise KeyError(f"unknown kernel {kind!r} (known: {sorted(CONFIG)})")
            cfgs = [cfgs] if isinstance(cfgs, dict) else list(cfgs)
            CONFIG[kind] = [dict({"max_e": 1 << 30}, **c) for c in cfgs]
            logging.getLogger(__name__).warning("fast kernels: %s launch configuration from VISIONMAMBA_FAST_CONFIG: %s",
                                                kind, CONFIG[kind])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"VISIONMAMBA_FAST_CONFIG is not a valid override: {exc}") from exc


_apply_config_override(os.environ.get("VISIONMAMBA_FAST_CONFIG"))

_INPUT_NAMES = ("x_f", "dt_f", "A_f", "B_f", "C_f", "D_f", "dt_bias_f",
                "x_b", "dt_b", "A_b", "B_b", "C_b", "D_b", "dt_bias_b", "z")


def _config(kind: str, E: int) -> dict:
    for cfg in CONFIG[kind]:
        if E <= cfg["max_e"]:
            return cfg
    return CONFIG[kind][-1]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_triton(device: torch.device | str) -> bool:
    """Whether `bimamba_scan` on tensors of this device runs the Triton kernels (else the PyTorch reference)."""
    return torch.device(device).type == "cuda" or _interpreting()


def _check(inputs: Sequence[Tensor]) -> None:
    x_f, dt_f, A_f, B_f, C_f, D_f, bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z = inputs
    if x_f.dim() != 3:
        raise ValueError(f"x_f must be (batch, L, E), got {tuple(x_f.shape)}")
    b, L, E = x_f.shape
    for name, t in (("dt_f", dt_f), ("x_b", x_b), ("dt_b", dt_b), ("z", z)):
        if tuple(t.shape) != (b, L, E):
            raise ValueError(f"{name} {tuple(t.shape)} does not match x_f {(b, L, E)}")
    N = A_f.shape[-1]
    for name, t, shape in (("A_f", A_f, (E, N)), ("A_b", A_b, (E, N)), ("B_f", B_f, (b, L, N)),
                           ("C_f", C_f, (b, L, N)), ("B_b", B_b, (b, L, N)), ("C_b", C_b, (b, L, N)),
                           ("D_f", D_f, (E,)), ("D_b", D_b, (E,)), ("dt_bias_f", bias_f, (E,)),
                           ("dt_bias_b", bias_b, (E,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if N & (N - 1) or N > 64:
        raise ValueError(f"the fast scan needs d_state to be a power of two <= 64, got {N}")


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _param(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def _prepare(inputs: Sequence[Tensor]):
    x_f, dt_f, A_f, B_f, C_f, D_f, bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, bias_b, z = inputs
    seq = [_unit_last(t) for t in (x_f, dt_f, B_f, C_f, x_b, dt_b, B_b, C_b, z)]
    par = [_param(t) for t in (A_f, D_f, bias_f, A_b, D_b, bias_b)]
    return seq, par


def _strides(*ts: Tensor) -> list[int]:
    out: list[int] = []
    for t in ts:
        out += [t.stride(0), t.stride(1)]
    return out


def fwd_triton(*inputs: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Forward Triton launch (no autograd). Inputs in `bimamba_scan` order; ``out``: optional contiguous (B, L, E)
    buffer of x_f's dtype to write into. With ``out`` x_f itself (`bimamba_scan_into_x`), x_b is overwritten too
    (with the Gluon forward that runs the directions at once, the reverse direction's y goes there first)."""
    from . import _fast_kernels as K

    _check(inputs)
    (x_f, dt_f, B_f, C_f, x_b, dt_b, B_b, C_b, z), (A_f, D_f, bias_f, A_b, D_b, bias_b) = _prepare(inputs)
    b, L, E = x_f.shape
    N = A_f.shape[1]
    if out is None:
        out = torch.empty((b, L, E), dtype=x_f.dtype, device=x_f.device)
    elif out.shape != (b, L, E) or out.dtype != x_f.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous (B, L, E) tensor of x_f's dtype")
    if out.numel() == 0:
        return out
    args = (x_f, dt_f, B_f, C_f, A_f, D_f, bias_f, x_b, dt_b, B_b, C_b, A_b, D_b, bias_b, z, out, L, E,
            *_strides(x_f, dt_f, B_f, C_f, x_b, dt_b, B_b, C_b, z, out))
    gcfg = _gluon_fwd_config(x_f.device, b, E, N)
    if gcfg is not None:
        from . import _fast_gluon as G

        consts = dict(T=gcfg["T"], BLOCK_E=gcfg["block_e"], N=N, E_T=gcfg["E_T"], NUM_WARPS=gcfg["num_warps"],
                      N_L=gcfg["N_L"], num_warps=gcfg["num_warps"], **_register_cap(gcfg))
        grid = (triton_cdiv(E, gcfg["block_e"]), b)
        if gcfg.get("dirs"):
            # the reverse direction's y before the two meet: in out, or over x_b when out is x_f (see the kernel)
            y_b = out
            if out.data_ptr() == x_f.data_ptr():
                y_b = x_b if x_b.dtype == out.dtype else torch.empty_like(out)
            G.bimamba_fwd_dirs_gluon_kernel[grid](*args, y_b, *_strides(y_b), **consts)
        else:
            G.bimamba_fwd_gluon_kernel[grid](*args, **consts)
        return out
    cfg = _config("fwd", E)
    block_e = cfg["BLOCK_E"]
    # Each program walks the whole sequence, so a small batch of long sequences (high resolution) would leave most
    # SMs idle: narrow the channel block until there are enough programs to fill the GPU.
    while block_e > 8 and b * triton_cdiv(E, block_e) < cfg.get("min_programs", 0):
        block_e //= 2
    K.bimamba_fwd_kernel[(triton_cdiv(E, block_e), b)](
        *args, T=cfg["T"], BLOCK_E=block_e, N=N, NUM_STAGES=cfg.get("num_stages", 1),
        PREFETCH=bool(cfg.get("prefetch", False)), num_warps=cfg["num_warps"], **_register_cap(cfg))
    return out


def _gluon_conv_config(kind: str, device: torch.device, E: int, W: int) -> Optional[dict]:
    """The Gluon conv kernels' launch configuration (``kind``: conv_fwd_gluon / conv_bwd_gluon), or None where the
    Triton conv kernels run instead: off CUDA (the CPU interpreter cannot run Gluon), for conv widths above 4, or with
    that ``CONFIG`` list empty."""
    if not CONFIG.get(kind) or device.type != "cuda" or _interpreting() or W > 4:
        return None
    return _config(kind, E)


def _gluon_conv_grid(cfg: dict, b: int, L: int, E: int) -> tuple[tuple[int, int, int], int]:
    """Grid (channel blocks, batch, row splits) and rows per program of the Gluon conv kernels: a batch row's rows are
    split over programs (at least min_rows each: every program starts with a few warm-up rows) until there are
    min_programs."""
    n_eb = triton_cdiv(E, cfg["VE"] * 32 * cfg["num_warps"])
    n_split = max(1, min(triton_cdiv(L, cfg["min_rows"]), triton_cdiv(cfg["min_programs"], b * n_eb)))
    rows = triton_cdiv(L, n_split)
    return (n_eb, b, triton_cdiv(L, rows)), rows


@functools.lru_cache(maxsize=None)
def _sm_count(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gluon_fwd_config(device: torch.device, b: int, E: int, N: int) -> Optional[dict]:
    """The Gluon forward's launch configuration, or None where the Triton forward runs instead: off CUDA (the CPU
    interpreter cannot run Gluon), with d_state > 32, or with ``CONFIG["fwd_gluon"]`` empty. Each (channel, lane) is a
    thread walking the whole sequence, so a small batch leaves SMs idle: while there are fewer than
    ``min_warps_per_sm`` warps per SM, E_T halves, then each state spreads over N_L = 2, 4, ... lanes (up to
    ``max_lanes``; programs of ``lane_block_e`` channels, chunks of ``lane_rows`` rows per lane)."""
    if not CONFIG.get("fwd_gluon") or device.type != "cuda" or _interpreting() or N > 32:
        return None
    cfg = dict(_config("fwd_gluon", E))
    cfg["N_L"] = cfg.get("N_L", 1)
    cfg["dirs"] = bool(cfg.get("dirs"))
    need = cfg.get("min_warps_per_sm", 0) * _sm_count(device.index)
    groups = lambda: 2 if cfg["dirs"] else 1  # noqa: E731  (warp groups per program)
    while b * E * cfg["N_L"] * groups() < need * 32 * cfg["E_T"]:  # threads = b * E * N_L * groups / E_T
        if cfg["E_T"] > 1:
            cfg["E_T"] //= 2
        elif cfg["N_L"] == cfg.get("dirs_lanes") and not cfg["dirs"]:
            cfg["dirs"] = True  # a rung between dirs_lanes lanes and twice as many
            cfg["num_warps"] *= 2
        elif 2 * cfg["N_L"] <= min(cfg.get("max_lanes", 1), N):
            cfg["N_L"] *= 2
            cfg["dirs"] = False
            cfg["num_warps"] = max(cfg.get("lane_block_e", 32) * cfg["N_L"] // 32, 1)
            cfg["T"] = cfg.get("lane_rows", 1) * cfg["N_L"]
        else:
            break
    cfg["block_e"] = cfg["E_T"] * (32 // cfg["N_L"]) * cfg["num_warps"] // groups()
    return cfg


def bwd_triton(grad: Tensor, *inputs: Tensor) -> list[Tensor]:
    """Backward Triton launch: the 15 input gradients, in `bimamba_scan` order, each in its input's dtype."""
    return _unpack_grads(_bwd_launch(grad, *inputs), inputs)


# The backward op's outputs, packed: dx_f, ddt_f, dx_b, ddt_b, dz (B, L, E) in their inputs' dtypes; dBC (4, B, L, N)
# fp32 = dB_f, dC_f, dB_b, dC_b; dpar (2, E * N + 2 E) fp32 = [dA | dD | d dt_bias] per direction. Two buffers for the
# eleven fp32 sums (a custom op's outputs must not alias one another): one zero fill each, and the slicing and the
# casts to the inputs' dtypes happen outside the op, where torch.compile fuses them into the gradients' consumers.
def _pack_grads(grads: Sequence[Tensor]) -> list[Tensor]:
    """15 gradients in `bimamba_scan` order -> the packed layout (the CPU reference path's)."""
    dx_f, ddt_f, dA_f, dB_f, dC_f, dD_f, dbias_f, dx_b, ddt_b, dA_b, dB_b, dC_b, dD_b, dbias_b, dz = grads
    dBC = torch.stack([dB_f, dC_f, dB_b, dC_b]).float()
    dpar = torch.stack([torch.cat([dA_f.flatten(), dD_f, dbias_f]), torch.cat([dA_b.flatten(), dD_b, dbias_b])])
    return [dx_f, ddt_f, dx_b, ddt_b, dz, dBC, dpar.float()]


def _param_grads(dpar: Tensor, d: int, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Direction d's [dA, dD, d dt_bias] from the packed fp32 dpar, in their inputs' dtypes (views where they are)."""
    A, D, bias = (inputs[7 * d + i] for i in (2, 5, 6))
    E, N = A.shape
    dA, dD, dbias = dpar[d].split([E * N, E, E])
    return [dA.view(E, N).to(A.dtype), dD.to(D.dtype), dbias.to(bias.dtype)]


def _unpack_grads(packed: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """The packed layout -> 15 gradients in `bimamba_scan` order, each in its input's dtype (views where it is)."""
    dx_f, ddt_f, dx_b, ddt_b, dz, dBC, dpar = packed
    out = []
    for d, (dx, ddt) in enumerate(((dx_f, ddt_f), (dx_b, ddt_b))):
        B, C = inputs[7 * d + 3], inputs[7 * d + 4]
        dA, dD, dbias = _param_grads(dpar, d, inputs)
        out += [dx, ddt, dA, dBC[2 * d].to(B.dtype), dBC[2 * d + 1].to(C.dtype), dD, dbias]
    return out + [dz]


def _bwd_launch(grad: Tensor, *inputs: Tensor, dz_out: Optional[Tensor] = None) -> list[Tensor]:
    """Backward Triton launch: the gradients in the packed layout (`_pack_grads`). dz_out: a (B, L, E) view with unit
    stride along E (the z half of d_xz, `bimamba_inner`) that dz is written into and returned as."""
    from . import _fast_kernels as K

    _check(inputs)
    (x_f, dt_f, B_f, C_f, x_b, dt_b, B_b, C_b, z), (A_f, D_f, bias_f, A_b, D_b, bias_b) = _prepare(inputs)
    g = _unit_last(grad)
    b, L, E = x_f.shape
    N = A_f.shape[1]
    dev = x_f.device
    use_gluon = (bool(CONFIG.get("bwd_gluon")) and dev.type == "cuda" and not _interpreting() and N <= 32
                 and N % _config("bwd_gluon", E)["N_L"] == 0)
    if use_gluon:
        from . import _fast_gluon as G

        cfg = _config("bwd_gluon", E)
        BE = (32 // cfg["N_L"]) * cfg["num_warps"]
        kernel = G.bimamba_bwd_gluon_kernel
        split = bool(cfg["split"]) if "split" in cfg else b * triton_cdiv(E, BE) < cfg.get("split_below", 0)
        red_k = 1 if split else cfg.get("red_k", 1)
        variant = dict(N_L=cfg["N_L"], NUM_WARPS=cfg["num_warps"], SPLIT=split, WALK_K=cfg.get("walk_k", 4),
                       RED_K=red_k, RL=G.reduce_layout(cfg["T"], N, BE, cfg["num_warps"], red_k))
    else:
        cfg = _config("bwd", E)
        BE = cfg["BLOCK_E"]
        kernel = K.bimamba_bwd_kernel
        variant = dict(NUM_STAGES=cfg.get("num_stages", 1))
        split = False
    T, SEG = cfg["T"], cfg.get("seg", 16)
    n_chunks = triton_cdiv(L, T)
    n_seg = max(triton_cdiv(n_chunks, SEG), 1)
    n_eb = triton_cdiv(E, BE)
    dx_f, ddt_f, dx_b, ddt_b = (torch.empty((b, L, E), dtype=t.dtype, device=dev) for t in (x_f, dt_f, x_b, dt_b))
    if dz_out is not None and use_gluon and dz_out.stride(2) == 1 and dz_out.stride(0) == L * dz_out.stride(1):
        dz = dz_out  # the Gluon backward writes dz rows dz.stride(1) apart
    else:  # contiguous (the Triton backward's layout), copied into dz_out below if there is one
        dz = torch.empty((b, L, E), dtype=z.dtype, device=dev)
    s_dzl = dz.stride(1)
    # dB / dC reduce over channels: relaxed fp32 atomics into dBC when there are many channel blocks, else
    # per-channel-block partials summed into it below (deterministic); dA, dD, d dt_bias: atomics into dpar
    atomic = bool(cfg.get("atomic", n_eb > 16))
    dBC = (torch.zeros if atomic else torch.empty)((4, b, L, N), dtype=torch.float32, device=dev)
    dpar = torch.zeros((2, E * N + 2 * E), dtype=torch.float32, device=dev)
    bc = dBC if atomic else torch.empty((4, n_eb, b, L, N), dtype=torch.float32, device=dev)
    if b * L * E == 0:
        for t in (dx_f, ddt_f, dx_b, ddt_b, dz, dBC):
            t.zero_()
        return [dx_f, ddt_f, dx_b, ddt_b, dz if dz_out is None else dz_out, dBC, dpar]  # nothing to copy
    # with split directions (separate programs) each direction has its own checkpoints and scratch, and the
    # reverse one its own dz terms, added below
    n_dir = 2 if split else 1
    ck = torch.empty((n_dir * b, n_seg, E, N), dtype=torch.float32, device=dev)  # state entering each segment
    # states entering the chunks of one segment: B * E * min(SEG, n_chunks) * N fp32, i.e. 1/T of the
    # (B, L, E, N) state tensor when the whole sequence is one segment (L <= SEG * T)
    scr = torch.empty((n_dir * b * n_eb, min(SEG, n_chunks), BE, N), dtype=torch.float32, device=dev)
    # (dzb: dz's strides, so one row stride serves both)
    extra = {"dzb_ptr": torch.empty_strided(dz.shape, dz.stride(), dtype=dz.dtype, device=dev) if split else dz,
             "s_dzl": s_dzl} if use_gluon else {}
    grid = (b, n_eb) if atomic else (n_eb, b)
    par = [t.view(-1) for d in range(2) for t in dpar[d].split([E * N, E, E])]  # dA, dD, dbias per direction
    kernel[grid + ((2,) if split else ())](
        x_f, dt_f, B_f, C_f, A_f, D_f, bias_f, x_b, dt_b, B_b, C_b, A_b, D_b, bias_b, z, g,
        dx_f, ddt_f, dx_b, ddt_b, dz, *bc, *par, ck, scr,
        b, L, E, *_strides(x_f, dt_f, B_f, C_f, x_b, dt_b, B_b, C_b, z, g), T=T, BLOCK_E=BE, N=N,
        SEG=SEG, ATOMIC=atomic, num_warps=cfg["num_warps"], **extra, **variant, **_register_cap(cfg))
    if split:
        dz += extra["dzb_ptr"]
    if not atomic:
        torch.sum(bc, dim=1, out=dBC)
    if dz_out is not None and dz is not dz_out:
        dz = dz_out.copy_(dz)
    return [dx_f, ddt_f, dx_b, ddt_b, dz, dBC, dpar]


def _register_cap(cfg: dict) -> dict:
    """Optional ``maxnreg`` (registers per thread): trades spills for occupancy in register-bound kernels."""
    return {"maxnreg": int(cfg["maxnreg"])} if cfg.get("maxnreg") else {}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------
# Pure-PyTorch reference (same signature)
# ----------------------------------------------------------------------------------------------------------------

def bimamba_scan_reference(x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Tensor,
                           dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
                           D_b: Tensor, dt_bias_b: Tensor, z: Tensor, scan=None) -> Tensor:
    """`bimamba_scan` from `visionmamba.ops.ref` scans with the transposes and flips the (B, E, L) layout needs.

    ``scan`` defaults to `selective_scan_ref` (autograd, recomputing); `selective_scan_naive` gives the one-token-
    at-a-time oracle. Each direction is gated and computed in fp32 and the two are averaged in fp32, then cast to
    x_f's dtype (the official path rounds each gated direction to the input dtype first; in fp32 they agree).
    """
    scan = scan or selective_scan_ref
    tr = lambda t: t.transpose(1, 2)  # noqa: E731  (B, L, X) -> (B, X, L)
    fl = lambda t: tr(t).flip(-1)  # noqa: E731
    f32 = lambda t: t.float()  # noqa: E731
    y_f = scan(tr(f32(x_f)), tr(f32(dt_f)), A_f.float(), tr(f32(B_f)), tr(f32(C_f)), D_f.float(), tr(f32(z)),
               dt_bias_f.float(), True)
    y_b = scan(fl(f32(x_b)), fl(f32(dt_b)), A_b.float(), fl(f32(B_b)), fl(f32(C_b)), D_b.float(), fl(f32(z)),
               dt_bias_b.float(), True).flip(-1)
    return tr((y_f + y_b) * 0.5).to(x_f.dtype)


def _vjp_reference(fn, cotangent, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of the pure-PyTorch ``fn`` at ``inputs``, each in its input's dtype, for the custom ops' CPU path.

    torch.func.vjp, not torch.autograd.grad (and plain-op scans, not the autograd.Function `selective_scan_ref`):
    inside a custom op's implementation the Autograd dispatch keys are excluded, so plain autograd would record
    nothing; functorch's grad transform re-enables them for its scope."""
    _, vjp = torch.func.vjp(fn, *[t.detach() for t in inputs])
    return [gr.to(t.dtype).contiguous() for gr, t in zip(vjp(cotangent), inputs)]


def _reference_backward(grad: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    return _vjp_reference(lambda *a: bimamba_scan_reference(*a, scan=_scan_plain), grad, inputs)


# ----------------------------------------------------------------------------------------------------------------
# Bidirectional depthwise conv + SiLU (the convs in front of the two scans)
# ----------------------------------------------------------------------------------------------------------------

def bimamba_conv_reference(x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor) -> tuple[Tensor, Tensor]:
    """`bimamba_conv` in pure PyTorch, by its official definition: `causal_conv1d_ref` + SiLU of x, and of the flipped
    sequence with conv1d_b's kernel, flipped back."""
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 maths for bf16/fp16 inputs, as the kernel does
    x_t = x.transpose(1, 2).to(acc)  # (B, E, L)
    x_f = causal_conv1d_ref(x_t, w_f.to(acc), b_f.to(acc), activation="silu")
    x_b = causal_conv1d_ref(x_t.flip(-1), w_b.to(acc), b_b.to(acc), activation="silu").flip(-1)
    return x_f.transpose(1, 2).to(x.dtype).contiguous(), x_b.transpose(1, 2).to(x.dtype).contiguous()


def _check_conv(x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, L, E), got {tuple(x.shape)}")
    E = x.shape[-1]
    for name, t, shape in (("w_f", w_f, (E, w_f.shape[-1])), ("w_b", w_b, (E, w_f.shape[-1])), ("b_f", b_f, (E,)),
                           ("b_b", b_b, (E,))):
        if t.dim() != len(shape) or tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if not 1 <= w_f.shape[-1] <= 4:
        raise ValueError(f"the fast conv kernels support widths 1..4 (d_conv), got {w_f.shape[-1]}")


def conv_fwd_triton(x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor) -> tuple[Tensor, Tensor]:
    """Forward Triton launch of `bimamba_conv` (no autograd)."""
    from . import _fast_kernels as K

    _check_conv(x, w_f, b_f, w_b, b_b)
    x = _unit_last(x)
    b, L, E = x.shape
    W = w_f.shape[1]
    out_f, out_b = (torch.empty((b, L, E), dtype=x.dtype, device=x.device) for _ in range(2))
    if out_f.numel() == 0:
        return out_f, out_b
    W = w_f.shape[1]
    gcfg = _gluon_conv_config("conv_fwd_gluon", x.device, E, W)
    if gcfg is not None:
        from . import _fast_gluon as G

        grid, rows = _gluon_conv_grid(gcfg, b, L, E)
        G.bimamba_conv_fwd_gluon_kernel[grid](
            x, _param(w_f), _param(b_f), _param(w_b), _param(b_b), out_f, out_b, L, E, x.stride(0), x.stride(1),
            rows, W=W, BLOCK_T=gcfg["BLOCK_T"], VE=gcfg["VE"], NUM_WARPS=gcfg["num_warps"],
            num_warps=gcfg["num_warps"], **_register_cap(gcfg))
        return out_f, out_b
    cfg = _config("conv_fwd", E)
    grid = (triton_cdiv(L, cfg["BLOCK_T"]), triton_cdiv(E, cfg["BLOCK_E"]), b)
    K.bimamba_conv_fwd_kernel[grid](x, _param(w_f), _param(b_f), _param(w_b), _param(b_b), out_f, out_b, L, E,
                                    x.stride(0), x.stride(1), W=W, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"],
                                    num_warps=cfg["num_warps"])
    return out_f, out_b


def conv_bwd_triton(g_f: Tensor, g_b: Tensor, x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor,
                    b_b: Tensor) -> list[Tensor]:
    """Backward Triton launch of `bimamba_conv`: [dx, dw_f, db_f, dw_b, db_b], each in its input's dtype."""
    return _unpack_conv_grads(_conv_bwd_launch(g_f, g_b, x, w_f, b_f, w_b, b_b), (w_f, b_f, w_b, b_b))


# The conv backward op's outputs, packed: dx (B, L, E) in x's dtype and dpar (2, E * W + E) fp32 = [dw (E, W) | db]
# per direction (one buffer, one zero fill; slices and casts outside the op, as for the scan's `_pack_grads`).
def _pack_conv_grads(grads: Sequence[Tensor]) -> list[Tensor]:
    dx, dw_f, db_f, dw_b, db_b = grads
    return [dx, torch.stack([torch.cat([dw_f.flatten(), db_f]), torch.cat([dw_b.flatten(), db_b])]).float()]


def _unpack_conv_grads(packed: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    dx, dpar = packed
    E, W = params[0].shape
    out = [dx]
    for d in range(2):
        dw, db = dpar[d].split([E * W, E])
        out += [dw.view(E, W).to(params[2 * d].dtype), db.to(params[2 * d + 1].dtype)]
    return out


def _conv_bwd_launch(g_f: Tensor, g_b: Tensor, x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor,
                     b_b: Tensor, dx_out: Optional[Tensor] = None) -> list[Tensor]:
    """Backward Triton launch of `bimamba_conv`: the packed [dx, dpar] (`_pack_conv_grads`). dx_out: a (B, L, E) view
    with unit stride along E (the x half of d_xz, `bimamba_inner`) that dx is written into and returned as."""
    from . import _fast_kernels as K

    _check_conv(x, w_f, b_f, w_b, b_b)
    x = _unit_last(x)
    g_f, g_b = g_f.contiguous(), g_b.contiguous()
    b, L, E = x.shape
    W = w_f.shape[1]
    dpar = torch.zeros((2, E * W + E), dtype=torch.float32, device=x.device)
    gcfg = _gluon_conv_config("conv_bwd_gluon", x.device, E, W)
    if (dx_out is not None and gcfg is not None and dx_out.stride(2) == 1
            and dx_out.stride(0) == L * dx_out.stride(1)):
        dx = dx_out  # the Gluon backward writes dx rows dx.stride(1) apart
    else:
        dx = torch.empty((b, L, E), dtype=x.dtype, device=x.device)
    if gcfg is not None and dx.numel() > 0:
        from . import _fast_gluon as G

        grid, rows = _gluon_conv_grid(gcfg, b, L, E)
        G.bimamba_conv_bwd_gluon_kernel[grid](
            x, _param(w_f), _param(b_f), _param(w_b), _param(b_b), g_f, g_b, dx, dpar, L, E, x.stride(0),
            x.stride(1), dx.stride(1), rows, W=W, BLOCK_T=gcfg["BLOCK_T"], VE=gcfg["VE"],
            NUM_WARPS=gcfg["num_warps"], num_warps=gcfg["num_warps"], **_register_cap(gcfg))
    elif dx.numel() > 0:
        # two launches: gp = g * SiLU'(pre) of both directions (with dw/db), then dx from shifted gp rows
        gp_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        gp = torch.empty((2, b, L, E), dtype=gp_dtype, device=x.device)
        w_f32, w_b32 = _param(w_f), _param(w_b)
        cfg = _config("conv_bwd", E)
        W_P2 = 1 << max(W - 1, 0).bit_length()
        K.bimamba_conv_bwd_gp_kernel[(triton_cdiv(E, cfg["BLOCK_E"]), b)](
            x, w_f32, _param(b_f), w_b32, _param(b_b), g_f, g_b, gp, dpar, L, E, x.stride(0), x.stride(1),
            W=W, W_P2=W_P2, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"], num_warps=cfg["num_warps"])
        dcfg = _config("conv_fwd", E)
        K.bimamba_conv_bwd_dx_kernel[(triton_cdiv(L, dcfg["BLOCK_T"]), triton_cdiv(E, dcfg["BLOCK_E"]), b)](
            gp, w_f32, w_b32, dx, b, L, E, W=W, BLOCK_T=dcfg["BLOCK_T"], BLOCK_E=dcfg["BLOCK_E"],
            num_warps=dcfg["num_warps"])
    if dx_out is not None and dx is not dx_out:
        dx = dx_out.copy_(dx)
    return [dx, dpar]



def _rows2d(t: Tensor) -> Tensor:
    """(..., X) with unit stride along X as (rows, X), a view (copied only where the leading dims do not merge)."""
    t = _unit_last(t)
    return t.reshape(-1, t.shape[-1])


def _pow2_at_least_16(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _dt_proj_rows(cfg: dict, t: Tensor, rp: int) -> int:
    """Row tile of the dt_proj kernels: ``BM``, or ``BM_fp32`` for fp32 inputs, halved for every doubling of the
    padded rank past 32 (the tiles' shared memory grows with it: Vim-B's R = 48 runs with RP = 64)."""
    bm = cfg["BM"] if t.element_size() <= 2 else cfg.get("BM_fp32", cfg["BM"])
    while rp > 32 and bm > 16:
        bm, rp = bm // 2, rp // 2
    return bm


def dt_proj_fwd_triton(a_f: Tensor, w_f: Tensor, a_b: Tensor, w_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both directions' dt = dt_low @ W^T in one launch (`dt_proj_fwd_kernel`): a_* (..., R) with unit stride along R
    (the dt_low columns of x_proj's output), w_* (E, R_w) (made contiguous: a parameter is), cast to a's dtype as
    F.linear under autocast does; R_w <= R, a's columns past R_w being x_proj's zero padding. Returns dt_f, dt_b (...,
    E), contiguous, in a's dtype."""
    from visionmamba.ops import _fast_kernels as K

    lead, R, E = a_f.shape[:-1], a_f.shape[-1], w_f.shape[0]
    assert w_f.shape[1] <= R and w_b.shape == w_f.shape
    af, ab = _rows2d(a_f), _rows2d(a_b)
    M = af.shape[0]
    of = torch.empty((M, E), dtype=af.dtype, device=af.device)
    ob = torch.empty_like(of)
    cfg, RP = _config("dt_proj_fwd", E), _pow2_at_least_16(R)
    BM = _dt_proj_rows(cfg, af, RP)
    grid = (triton_cdiv(M, BM), triton_cdiv(E, cfg["BE"]), 2)
    # w is converted to a's dtype tile by tile in the kernel (no cast launch); parameters are contiguous already
    K.dt_proj_fwd_kernel[grid](af, w_f.contiguous(), of, ab, w_b.contiguous(), ob, M, E, R, af.stride(0), ab.stride(0),
                               E, RW=w_f.shape[1], RP=RP, BM=BM, BE=cfg["BE"], num_warps=cfg["num_warps"])
    return of.view(*lead, E), ob.view(*lead, E)


def dt_proj_bwd_triton(g_f: Tensor, a_f: Tensor, w_f: Tensor, g_b: Tensor, a_b: Tensor, w_b: Tensor,
                       da_f: Tensor, da_b: Tensor, dBC: Optional[Tensor] = None) -> Tensor:
    """Backward of `dt_proj_fwd_triton` in one launch (`dt_proj_bwd_kernel`), each ddt tile read once for both
    products: writes d dt_low = g_* @ w_* into da_* ((rows, R), any row stride, unit stride along R; zero past w's
    R_w columns) and returns dW = g^T @ a[:, :R_w], fp32 (2, E, R_w). With dBC (the scan backward's (4, ..., N) fp32
    dB_f, dC_f, dB_b, dC_b), da_* are (rows, R + 2N) and get [d dt_low | dB | dC]: the whole gradient of x_proj's
    output."""
    from visionmamba.ops import _fast_kernels as K

    R, E, RW = a_f.shape[-1], w_f.shape[0], w_f.shape[1]
    gf, gb, af, ab = _rows2d(g_f), _rows2d(g_b), _rows2d(a_f), _rows2d(a_b)
    assert gf.stride(0) == gb.stride(0) and da_f.stride(0) == da_b.stride(0) and da_f.stride(1) == 1
    M = gf.shape[0]
    N = 0 if dBC is None else dBC.shape[-1]
    assert da_f.shape == (M, R + 2 * N) and (dBC is None or (dBC.is_contiguous() and dBC.numel() == 4 * M * N))
    dw = torch.zeros((2, E, RW), dtype=torch.float32, device=gf.device)
    cfg, RP = _config("dt_proj_bwd", E), _pow2_at_least_16(R)
    BM = _dt_proj_rows(cfg, gf, RP)
    K.dt_proj_bwd_kernel[(triton_cdiv(M, BM), 2)](
        gf, af, w_f.contiguous(), da_f, gb, ab, w_b.contiguous(), da_b, dw, dw if dBC is None else dBC, M, E, R,
        gf.stride(0), af.stride(0), ab.stride(0), da_f.stride(0), RW=RW, RP=RP, BM=BM, BE=cfg["BE"], N=N,
        num_warps=cfg["num_warps"])
    return dw


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("visionmamba::bimamba_scan", mutates_args=())
def _bimamba_scan_op(x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Tensor,
                     dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
                     D_b: Tensor, dt_bias_b: Tensor, z: Tensor) -> Tensor:
    inputs = (x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z)
    if uses_triton(x_f.device):
        return fwd_triton(*inputs)
    with torch.no_grad():
        return bimamba_scan_reference(*inputs).contiguous()


@_bimamba_scan_op.register_fake
def _(x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z):
    return x_f.new_empty(x_f.shape)


@torch.library.custom_op("visionmamba::bimamba_scan_bwd", mutates_args=())
def _bimamba_scan_bwd_op(grad: Tensor, x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor,
                         D_f: Tensor, dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor,
                         C_b: Tensor, D_b: Tensor, dt_bias_b: Tensor, z: Tensor) -> list[Tensor]:
    inputs = (x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z)
    if uses_triton(x_f.device):
        return _bwd_launch(grad, *inputs)
    return _pack_grads(_reference_backward(grad, inputs))


@_bimamba_scan_bwd_op.register_fake
def _(grad, x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z):
    (b, L, _), (E, N) = x_f.shape, A_f.shape
    like = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (x_f, dt_f, x_b, dt_b, z)]
    return like + [x_f.new_empty((4, b, L, N), dtype=torch.float32),
                   x_f.new_empty((2, E * N + 2 * E), dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    inputs = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros(inputs[0].shape, dtype=inputs[0].dtype, device=inputs[0].device)
    grads = _unpack_grads(torch.ops.visionmamba.bimamba_scan_bwd(grad, *inputs), inputs)
    return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad))


_bimamba_scan_op.register_autograd(_backward, setup_context=_setup_context)


def bimamba_scan(x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Tensor, dt_bias_f: Tensor,
                 x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Tensor, dt_bias_b: Tensor,
                 z: Tensor) -> Tensor:
    """Both scan directions, gated and averaged: (scan_fwd + scan_rev) / 2 * SiLU(z); see the module docstring."""
    return torch.ops.visionmamba.bimamba_scan(x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b,
                                              D_b, dt_bias_b, z)


@torch.library.custom_op("visionmamba::bimamba_scan_into_x", mutates_args=("x_f", "x_b"))
def _bimamba_scan_into_x_op(x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Tensor,
                            dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
                            D_b: Tensor, dt_bias_b: Tensor, z: Tensor) -> None:
    inputs = (x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z)
    N = A_f.shape[-1]
    # The Gluon forward reads each (token, channel) of x_f in the thread that later writes y there, chunk c + 2's
    # rows in flight while chunk c's are stored, and never reads x_f in the reverse pass: it can write over it (and
    # over x_b, where the kernel that runs both directions at once keeps the reverse direction's y until they meet).
    if x_f.is_contiguous() and _gluon_fwd_config(x_f.device, x_f.shape[0], x_f.shape[2], N) is not None:
        fwd_triton(*inputs, out=x_f)
    else:
        x_f.copy_(_bimamba_scan_op(*inputs))


def bimamba_scan_into_x(x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Tensor,
                        dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
                        D_b: Tensor, dt_bias_b: Tensor, z: Tensor) -> Tensor:
    """`bimamba_scan` for inference (no autograd): y is written over x_f (a (B, L, E) buffer the caller no longer
    needs), which is returned, so the forward allocates no output: one (B, L, E) activation less at the peak. x_b
    (also no longer needed) may be overwritten too."""
    torch.ops.visionmamba.bimamba_scan_into_x(x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b,
                                              D_b, dt_bias_b, z)
    return x_f


@torch.library.custom_op("visionmamba::bimamba_conv", mutates_args=())
def _bimamba_conv_op(x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor) -> tuple[Tensor, Tensor]:
    if uses_triton(x.device):
        return conv_fwd_triton(x, w_f, b_f, w_b, b_b)
    with torch.no_grad():
        return bimamba_conv_reference(x, w_f, b_f, w_b, b_b)


@_bimamba_conv_op.register_fake
def _(x, w_f, b_f, w_b, b_b):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("visionmamba::bimamba_conv_bwd", mutates_args=())
def _bimamba_conv_bwd_op(g_f: Tensor, g_b: Tensor, x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor,
                         b_b: Tensor) -> list[Tensor]:
    if uses_triton(x.device):
        return _conv_bwd_launch(g_f, g_b, x, w_f, b_f, w_b, b_b)
    return _pack_conv_grads(_vjp_reference(bimamba_conv_reference, (g_f, g_b), (x, w_f, b_f, w_b, b_b)))


@_bimamba_conv_bwd_op.register_fake
def _(g_f, g_b, x, w_f, b_f, w_b, b_b):
    E, W = w_f.shape
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty((2, E * W + E), dtype=torch.float32)]


def _conv_backward(ctx, g_f, g_b):
    x, w_f, b_f, w_b, b_b = ctx.saved_tensors
    g_f = torch.zeros_like(x) if g_f is None else g_f
    g_b = torch.zeros_like(x) if g_b is None else g_b
    grads = _unpack_conv_grads(torch.ops.visionmamba.bimamba_conv_bwd(g_f, g_b, x, w_f, b_f, w_b, b_b),
                               (w_f, b_f, w_b, b_b))
    return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad))


_bimamba_conv_op.register_autograd(_conv_backward, setup_context=_setup_context)


def bimamba_conv(x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both directions' depthwise conv + SiLU in the (B, L, E) layout: (x_f, x_b), contiguous, x's dtype.

    x: (B, L, E) with unit stride along E (e.g. the x half of the in_proj output); w_*: (E, W) (conv1d.weight
    squeezed); b_*: (E,). x_f is the official causal conv1d of x; x_b is conv1d_b applied to the flipped sequence,
    flipped back — so the backward scan reads it in reverse and no flip is ever materialised.
    """
    return torch.ops.visionmamba.bimamba_conv(x, w_f, b_f, w_b, b_b)


# ----------------------------------------------------------------------------------------------------------------
# The mixer between in_proj and out_proj in one autograd node (`bimamba_inner`)
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("visionmamba::bimamba_scan_bwd_xz", mutates_args=("d_xz",))
def _bimamba_scan_bwd_xz_op(grad: Tensor, x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor,
                            D_f: Tensor, dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor,
                            C_b: Tensor, D_b: Tensor, dt_bias_b: Tensor, z: Tensor,
                            d_xz: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`bimamba_scan_bwd` writing dz into d_xz[..., E:] (B, L, 2E) instead of returning it: [dx_f, ddt_f, dx_b,
    ddt_b, dBC, dpar]."""
    inputs = (x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z)
    dz_out = d_xz[..., x_f.shape[-1]:]
    if uses_triton(x_f.device):
        packed = _bwd_launch(grad, *inputs, dz_out=dz_out)
    else:
        packed = _pack_grads(_reference_backward(grad, inputs))
        dz_out.copy_(packed[4])
    return tuple(packed[:4] + packed[5:])  # a tuple: functionalization rejects a mutating op returning Tensor[]


@_bimamba_scan_bwd_xz_op.register_fake
def _(grad, x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z, d_xz):
    (b, L, _), (E, N) = x_f.shape, A_f.shape
    like = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (x_f, dt_f, x_b, dt_b)]
    return tuple(like + [x_f.new_empty((4, b, L, N), dtype=torch.float32),
                         x_f.new_empty((2, E * N + 2 * E), dtype=torch.float32)])


@torch.library.custom_op("visionmamba::bimamba_conv_bwd_xz", mutates_args=("d_xz",))
def _bimamba_conv_bwd_xz_op(g_f: Tensor, g_b: Tensor, x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor,
                            b_b: Tensor, d_xz: Tensor) -> Tensor:
    """`bimamba_conv_bwd` writing dx into d_xz[..., :E] (B, L, 2E) instead of returning it: dpar."""
    dx_out = d_xz[..., :x.shape[-1]]
    if uses_triton(x.device):
        return _conv_bwd_launch(g_f, g_b, x, w_f, b_f, w_b, b_b, dx_out=dx_out)[1]
    dx, dpar = _pack_conv_grads(_vjp_reference(bimamba_conv_reference, (g_f, g_b), (x, w_f, b_f, w_b, b_b)))
    dx_out.copy_(dx)
    return dpar


@_bimamba_conv_bwd_xz_op.register_fake
def _(g_f, g_b, x, w_f, b_f, w_b, b_b, d_xz):
    E, W = w_f.shape
    return x.new_empty((2, E * W + E), dtype=torch.float32)


@torch.library.custom_op("visionmamba::addmm_into", mutates_args=("acc",))
def _addmm_into_op(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (..., n) += a (m, k) @ b (k, n) with m = acc.numel() / n, in place: cuBLAS accumulates into acc (beta 1). A
    functional addmm first copies acc into its output (a (B L, E) memcpy per direction and layer); an opaque in-place
    op, which torch.compile reinplaces, does not."""
    acc.view(-1, acc.shape[-1]).addmm_(a, b)


@_addmm_into_op.register_fake
def _(acc, a, b):
    return None


@torch.library.custom_op("visionmamba::dt_proj", mutates_args=())
def _dt_proj_op(a_f: Tensor, w_f: Tensor, a_b: Tensor, w_b: Tensor) -> tuple[Tensor, Tensor]:
    return dt_proj_fwd_triton(a_f, w_f, a_b, w_b)


@_dt_proj_op.register_fake
def _(a_f, w_f, a_b, w_b):
    shape = (*a_f.shape[:-1], w_f.shape[0])
    return a_f.new_empty(shape), a_b.new_empty(shape)


def _d_dbl_shape(g_f: Tensor, a_f: Tensor, dBC: Optional[Tensor]) -> tuple[int, int]:
    """(rows, R [+ 2N]) of `dt_proj_bwd`'s first two outputs."""
    return g_f.numel() // g_f.shape[-1], a_f.shape[-1] + (0 if dBC is None else 2 * dBC.shape[-1])


@torch.library.custom_op("visionmamba::dt_proj_bwd", mutates_args=())
def _dt_proj_bwd_op(g_f: Tensor, a_f: Tensor, w_f: Tensor, g_b: Tensor, a_b: Tensor,
                    w_b: Tensor, dBC: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    da_f = g_f.new_empty(_d_dbl_shape(g_f, a_f, dBC))
    da_b = torch.empty_like(da_f)
    return da_f, da_b, dt_proj_bwd_triton(g_f, a_f, w_f, g_b, a_b, w_b, da_f, da_b, dBC)


@_dt_proj_bwd_op.register_fake
def _(g_f, a_f, w_f, g_b, a_b, w_b, dBC=None):
    shape = _d_dbl_shape(g_f, a_f, dBC)
    return g_f.new_empty(shape), g_f.new_empty(shape), g_f.new_empty((2, *w_f.shape), dtype=torch.float32)


def dt_proj(a_f: Tensor, w_f: Tensor, a_b: Tensor, w_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both directions' dt = F.linear(dt_low, W) (no autograd; the mixer's `_BiMambaInner` and inference path): one
    Triton launch on CUDA (`dt_proj_fwd_triton`), two F.linear elsewhere. a_*: (..., R) in the matmuls' dtype (x_proj's
    output), w_*: (E, R_w), R_w <= R (a's columns past R_w: x_proj's zero padding, ignored); the result is in a's
    dtype, as F.linear under autocast."""
    if a_f.is_cuda:
        return torch.ops.visionmamba.dt_proj(a_f, w_f, a_b, w_b)
    rw = w_f.shape[1]
    return F.linear(a_f[..., :rw], w_f.to(a_f.dtype)), F.linear(a_b[..., :rw], w_b.to(a_b.dtype))


def _dt_proj_backward(g_f: Tensor, a_f: Tensor, w_f: Tensor, g_b: Tensor, a_b: Tensor, w_b: Tensor,
                      dBC: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `dt_proj` from g_* = ddt (rows, E) in a's dtype: d dt_low (rows, R) per direction, in a's dtype
    (zero past w's R_w columns), and dW (E, R_w) per direction, in w's dtype. With dBC ((4, ..., N) fp32: dB_f, dC_f,
    dB_b, dC_b) the first two are instead the rows of d x_dbl = [d dt_low | dB | dC] (rows, R + 2N), in a's dtype.
    On CUDA one launch reads each ddt tile once for both products (dW summed in fp32) and writes the dB / dC columns;
    elsewhere the matmuls autograd would run, and a cat."""
    R, rw = a_f.shape[-1], w_f.shape[1]
    if g_f.is_cuda:
        da_f, da_b, dw = torch.ops.visionmamba.dt_proj_bwd(g_f, a_f, w_f, g_b, a_b, w_b, dBC)
        return da_f, da_b, dw[0].to(w_f.dtype), dw[1].to(w_b.dtype)
    cdt = a_f.dtype
    da = [F.pad(g @ w.to(cdt), (0, R - rw)) for g, w in ((g_f, w_f), (g_b, w_b))]
    if dBC is not None:
        N = dBC.shape[-1]
        da = [torch.cat([d, dBC[2 * i].reshape(-1, N).to(cdt), dBC[2 * i + 1].reshape(-1, N).to(cdt)], dim=1)
              for i, d in enumerate(da)]
    return (*da, (g_f.t() @ a_f.reshape(-1, R)[:, :rw]).to(w_f.dtype),
            (g_b.t() @ a_b.reshape(-1, R)[:, :rw]).to(w_b.dtype))


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place: through the opaque op when torch.compile traces (where a plain ``addmm_`` would be
    functionalized into addmm + copy), directly otherwise (the custom op's dispatch costs ~30 us of CPU per call, which
    an eager, launch-bound step would pay twice per layer)."""
    if torch.compiler.is_compiling():
        torch.ops.visionmamba.addmm_into(acc, a, b)
    else:
        acc.view(-1, acc.shape[-1]).addmm_(a, b)


def _inner_scan_inputs(R: int, N: int, z: Tensor, x_f: Tensor, dt_f: Tensor, x_dbl_f: Tensor, A_f: Tensor,
                       D_f: Tensor, dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, x_dbl_b: Tensor, A_b: Tensor,
                       D_b: Tensor, dt_bias_b: Tensor) -> tuple[Tensor, ...]:
    """`bimamba_scan`'s 15 inputs in `_BiMambaInner`: B and C are column slices of x_dbl = [dt_low | B | C], B
    starting at column R."""
    return (x_f, dt_f, A_f, x_dbl_f[..., R:R + N], x_dbl_f[..., R + N:], D_f, dt_bias_f,
            x_b, dt_b, A_b, x_dbl_b[..., R:R + N], x_dbl_b[..., R + N:], D_b, dt_bias_b, z)


class _BiMambaInner(torch.autograd.Function):
    """xz -> y through both convs, both directions' x_proj / dt_proj and the scan, with a hand-written backward.

    Left to autograd, two sums cost a (B, L, E) or (B, L, 2E) pass each per layer: x_f (and x_b) feed both x_proj and
    the scan, so their gradients were added by a separate kernel, and x and z are halves of in_proj's output, so their
    gradients were concatenated (together 1.1 ms, 3.5 % of Vim-T's H200 training step). Here the x_proj dgrad GEMM
    accumulates into the scan's dx (`_addmm_into`), and the scan and conv backward kernels write dz and dx straight
    into the two halves of one d_xz buffer. Same saved tensors as autograd's graph (xz, x_f, x_b, x_proj and dt_proj
    outputs), the same maths; the x gradient is rounded once instead of twice in bf16."""

    @staticmethod
    def forward(ctx, xz, conv_w_f, conv_b_f, conv_w_b, conv_b_b, x_proj_w_f, dt_proj_w_f, A_f, D_f, dt_bias_f,
                x_proj_w_b, dt_proj_w_b, A_b, D_b, dt_bias_b):
        E, N = xz.shape[-1] // 2, A_f.shape[1]
        # B starts after R_pad >= R columns of x_dbl (R: dt_proj's rank; zero rows of x_proj past it)
        R_pad = x_proj_w_f.shape[0] - 2 * N
        x, z = xz[..., :E], xz[..., E:]  # (B, L, E) views, unit stride along E
        x_f, x_b = torch.ops.visionmamba.bimamba_conv(x, conv_w_f, conv_b_f, conv_w_b, conv_b_b)
        # the x_proj weights cast to x's dtype here, as F.linear under autocast would, and saved cast: the backward's
        # x_proj dgrad uses them as they are, with no cast of its own
        ctx.x_proj_dtype = x_proj_w_f.dtype
        x_proj_w_f, x_proj_w_b = x_proj_w_f.to(x_f.dtype), x_proj_w_b.to(x_b.dtype)
        # x_dbl (B, L, R_pad + 2N) = [dt_low | 0 | B | C], dt (B, L, E), as in the unfused mixer
        x_dbl_f, x_dbl_b = F.linear(x_f, x_proj_w_f), F.linear(x_b, x_proj_w_b)
        # dt_low with x_proj's zero padding: R_pad columns, a multiple of 8 (16-byte rows of bf16), load as vectors
        dt_f, dt_b = dt_proj(x_dbl_f[..., :R_pad], dt_proj_w_f, x_dbl_b[..., :R_pad], dt_proj_w_b)
        y = torch.ops.visionmamba.bimamba_scan(*_inner_scan_inputs(R_pad, N, z, x_f, dt_f, x_dbl_f, A_f, D_f,
                                                                   dt_bias_f, x_b, dt_b, x_dbl_b, A_b, D_b,
                                                                   dt_bias_b))
        ctx.save_for_backward(xz, x_f, x_b, x_dbl_f, x_dbl_b, dt_f, dt_b, conv_w_f, conv_b_f, conv_w_b, conv_b_b,
                              x_proj_w_f, dt_proj_w_f, A_f, D_f, dt_bias_f, x_proj_w_b, dt_proj_w_b, A_b, D_b,
                              dt_bias_b)
        return y

    @staticmethod
    def backward(ctx, grad):
        (xz, x_f, x_b, x_dbl_f, x_dbl_b, dt_f, dt_b, conv_w_f, conv_b_f, conv_w_b, conv_b_b,
         x_proj_w_f, dt_proj_w_f, A_f, D_f, dt_bias_f, x_proj_w_b, dt_proj_w_b, A_b, D_b, dt_bias_b) = ctx.saved_tensors
        E, N = xz.shape[-1] // 2, A_f.shape[1]
        R_pad = x_proj_w_f.shape[0] - 2 * N
        need = ctx.needs_input_grad
        scan_inputs = _inner_scan_inputs(R_pad, N, xz[..., E:], x_f, dt_f, x_dbl_f, A_f, D_f, dt_bias_f,
                                         x_b, dt_b, x_dbl_b, A_b, D_b, dt_bias_b)
        d_xz = torch.empty(xz.shape, dtype=xz.dtype, device=xz.device)  # (B, L, 2E) = [dx | dz]
        # dx_*, ddt_* (B, L, E) in the inputs' dtypes (dz is already in d_xz); dBC, dpar fp32 (`_pack_grads`)
        dx_f, ddt_f, dx_b, ddt_b, dBC, dpar = torch.ops.visionmamba.bimamba_scan_bwd_xz(
            grad.contiguous(), *scan_inputs, d_xz)
        out = [None] * 15
        cdt = x_dbl_f.dtype  # the matmuls' dtype in the forward (bf16 under autocast; also dt's, so ddt's)
        # d x_dbl (B L, R_pad + 2N) = [d dt_low | dB | dC] per direction (d dt_low zero past R: the zero rows of
        # x_proj) from one dt_proj backward launch, which also writes dB / dC there; and dt_proj's dW
        d_dbl_f, d_dbl_b, out[6], out[11] = _dt_proj_backward(ddt_f.reshape(-1, E).to(cdt), x_dbl_f[..., :R_pad],
                                                              dt_proj_w_f, ddt_b.reshape(-1, E).to(cdt),
                                                              x_dbl_b[..., :R_pad], dt_proj_w_b, dBC)
        for d, (x_d, x_proj_w, d_dbl, dx) in enumerate(((x_f, x_proj_w_f, d_dbl_f, dx_f),
                                                       (x_b, x_proj_w_b, d_dbl_b, dx_b))):
            # x_proj's dgrad added to the scan's dx by the GEMM: (B L, E)
            _addmm_into(dx, d_dbl, x_proj_w)
            base = 5 + 5 * d  # x_proj_w, dt_proj_w, A, D, dt_bias of this direction
            if need[base]:
                out[base] = (d_dbl.t() @ x_d.reshape(-1, E).to(cdt)).to(ctx.x_proj_dtype)  # (R_pad + 2N, E)
            out[base + 2:base + 5] = _param_grads(dpar, d, scan_inputs)  # dA, dD, d dt_bias
        dconv = torch.ops.visionmamba.bimamba_conv_bwd_xz(dx_f, dx_b, xz[..., :E], conv_w_f, conv_b_f,
                                                          conv_w_b, conv_b_b, d_xz)
        out[:5] = [d_xz] + _unpack_conv_grads([None, dconv], (conv_w_f, conv_b_f, conv_w_b, conv_b_b))[1:]
        return tuple(g if need[i] else None for i, g in enumerate(out))


def bimamba_inner(xz: Tensor, conv_w_f: Tensor, conv_b_f: Tensor, conv_w_b: Tensor, conv_b_b: Tensor,
                  x_proj_w_f: Tensor, dt_proj_w_f: Tensor, A_f: Tensor, D_f: Tensor, dt_bias_f: Tensor,
                  x_proj_w_b: Tensor, dt_proj_w_b: Tensor, A_b: Tensor, D_b: Tensor, dt_bias_b: Tensor) -> Tensor:
    """The bidirectional mixer from in_proj's output to out_proj's input, one autograd node (`_BiMambaInner`).

    xz: (B, L, 2E) = [x | z], unit stride along the last dim. conv_w_*: (E, W), conv_b_*: (E,); x_proj_w_*:
    (R_pad + 2N, E) producing [dt_low (R) | zeros (R_pad - R, zero rows of the weight) | B | C]; dt_proj_w_*: (E, R)
    (no bias: dt_bias_* is added in the scan);
    A_*: (E, N) fp32 (-exp(A_log)); D_*, dt_bias_*: (E,) fp32. Returns y (B, L, E): both scans averaged and gated,
    as `bimamba_scan` of `bimamba_conv`'s outputs."""
    return _BiMambaInner.apply(xz, conv_w_f, conv_b_f, conv_w_b, conv_b_b, x_proj_w_f, dt_proj_w_f, A_f, D_f,
                               dt_bias_f, x_proj_w_b, dt_proj_w_b, A_b, D_b, dt_bias_b)
