"""Exact pure-PyTorch selective scan and causal depthwise conv1d (the `ref` backend).

Same signatures and maths as mamba-ssm's `selective_scan_fn` / causal-conv1d's `causal_conv1d_fn`, so every
backend can be parity-tested against these. They run on any device and dtype; the recurrent state is kept
in fp32 whatever the input dtype (as the CUDA kernel does).

Three formulations live here:
  * `selective_scan_naive`: one step per token, the textbook recurrence. Slow; used as the independent
    oracle in tests.
  * `_scan_chunked`: the same recurrence evaluated `chunk` tokens at a time. Inside a chunk the state
    update is a closed form, h_t = exp(S_t) h_0 + sum_{s<=t} exp(S_t - S_s) dBu_s with S = cumsum(delta*A),
    computed with one masked (T x T) decay matrix; only L/chunk Python iterations remain. Every exponent
    is <= 0 (A < 0, delta >= 0), so nothing overflows.
  * `_scan_steps`: decays precomputed in bulk, then one multiply-add per token; the fastest form on CPUs.
  * `SelectiveScanRef`: an autograd Function around them (chunked on GPU, steps on CPU) that stores only its inputs and
    recomputes the forward under autograd in backward (like mamba's recomputation). It keeps activation
    memory at the input size and appears as a single `prim::PythonOp.SelectiveScanRef` node when fvcore
    traces a model, so FLOPs are counted analytically instead of op by op.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "selective_scan_ref",
    "selective_scan_naive",
    "causal_conv1d_ref",
    "SelectiveScanRef",
]

_MAX_CHUNK = 32
# Upper bound on the elements of one chunk's (b, e, T, T, n) decay tensor: keeps the ref path usable on a GPU
# at training batch sizes (the chunk shrinks instead of the memory growing).
_DECAY_BUDGET = 1 << 25


def _chunk_size(batch: int, dim: int, dstate: int) -> int:
    per_pair = max(1, batch * dim * dstate)
    return int(max(1, min(_MAX_CHUNK, (_DECAY_BUDGET // per_pair) ** 0.5)))


def _compute_dtype(t: Tensor) -> torch.dtype:
    """State precision: fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Cast to the compute dtype and apply the delta bias/softplus.

    Shapes: u, delta, z (B, E, L); A (E, N); B, C (B, N, L) or grouped (B, G, N, L).
    """
    ct = _compute_dtype(u)
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(ct), delta, A.to(ct), B.to(ct), C.to(ct)


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + u * D.to(y.dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _check_shapes(u, A, B, C):
    for name, X in (("B", B), ("C", C)):
        if X.dim() not in (3, 4):
            raise ValueError(f"{name} must be (batch, d_state, L) or grouped (batch, groups, d_state, L); "
                             f"got {tuple(X.shape)}")
        if X.dim() == 4 and u.shape[1] % X.shape[1]:
            raise ValueError(f"{name} has {X.shape[1]} groups, which do not divide the {u.shape[1]} channels of u")
        if X.shape[-2] != A.shape[1]:
            raise ValueError(f"{name} {tuple(X.shape)} does not match A {tuple(A.shape)} (d_state)")
    if A.shape[0] != u.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} does not match u {tuple(u.shape)}")


def _grouped(X: Tensor) -> Tensor:
    """B or C as (batch, groups, N, L). Ungrouped (batch, N, L) is one group shared by every channel; with G groups,
    channel e reads group e // (E / G) (mamba-ssm's convention), so u/delta/states are viewed as (b, G, E/G, ...)."""
    return X.unsqueeze(1) if X.dim() == 3 else X


def _scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=None):
    """Selective scan evaluated chunk by chunk (see module docstring). Returns (B, E, L) in u's dtype."""
    _check_shapes(u, A, B, C)
    out_dtype = u.dtype
    uf, dt, Af, Bf, Cf = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, seqlen = uf.shape
    dstate = Af.shape[1]
    Bg, Cg = _grouped(Bf), _grouped(Cf)  # (b, g, n, L)
    gb, gc = Bg.shape[1], Cg.shape[1]
    chunk = chunk or _chunk_size(batch, dim, dstate)
    h = uf.new_zeros(batch, dim, dstate)  # running state, fp32
    ys = []
    for start in range(0, seqlen, chunk):
        end = min(start + chunk, seqlen)
        T = end - start
        dt_c = dt[:, :, start:end]  # (b, e, T)
        # log-decay of each step and its running sum inside the chunk
        dA = dt_c.unsqueeze(-1) * Af[None, :, None, :]  # (b, e, T, n), <= 0
        S = dA.cumsum(dim=2)  # (b, e, T, n)
        dtu = (dt_c * uf[:, :, start:end]).view(batch, gb, dim // gb, T, 1)
        dBu = (dtu * Bg[:, :, None, :, start:end].transpose(-1, -2)).reshape(batch, dim, T, dstate)  # (b, e, T, n)
        # decay[t, s] = exp(S_t - S_s) for s <= t, 0 otherwise; the mask is applied before exp so no inf appears
        diff = S.unsqueeze(3) - S.unsqueeze(2)  # (b, e, T(t), T(s), n)
        causal = torch.ones(T, T, dtype=torch.bool, device=uf.device).tril()
        decay = torch.where(causal[None, None, :, :, None], diff, diff.new_full((), float("-inf"))).exp()
        hs = torch.einsum("betsn,besn->betn", decay, dBu) + S.exp() * h.unsqueeze(2)  # (b, e, T, n)
        hs_g = hs.reshape(batch, gc, dim // gc, T, dstate)
        ys.append(torch.einsum("bgctn,bgnt->bgct", hs_g, Cg[..., start:end]).reshape(batch, dim, T))
        h = hs[:, :, -1]
    y = torch.cat(ys, dim=2)
    return _finish(y, uf, D, z, out_dtype)


def _scan_steps(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Selective scan with the decays precomputed in bulk and one fused multiply-add per token.

    Fastest form on CPUs (the chunked form does `chunk` times more arithmetic to save launches, which only pays
    on a GPU). Returns (B, E, L) in u's dtype.
    """
    _check_shapes(u, A, B, C)
    out_dtype = u.dtype
    uf, dt, Af, Bf, Cf = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, seqlen = uf.shape
    dstate = Af.shape[1]
    Bg, Cg = _grouped(Bf), _grouped(Cf)  # (b, g, n, L)
    gb, gc = Bg.shape[1], Cg.shape[1]
    dA = torch.exp(dt.unsqueeze(-1) * Af[None, :, None, :])  # (b, e, L, n)
    dtu = (dt * uf).view(batch, gb, dim // gb, seqlen, 1)
    dBu = (dtu * Bg.transpose(-1, -2).unsqueeze(2)).reshape(batch, dim, seqlen, dstate)  # (b, e, L, n)
    h = torch.zeros_like(dA[:, :, 0])
    states = []
    # unbind, not dA[:, :, t]: the backward of one unbind is one stack, while L separate selects would each
    # allocate a full-size zero gradient (quadratic in L).
    for dA_t, dBu_t in zip(dA.unbind(2), dBu.unbind(2)):
        h = torch.addcmul(dBu_t, dA_t, h)
        states.append(h)
    hs = torch.stack(states, dim=2).reshape(batch, gc, dim // gc, seqlen, dstate)  # (b, e, L, n) as (b, g, e/g, L, n)
    y = torch.einsum("bgcln,bgnl->bgcl", hs, Cg).reshape(batch, dim, seqlen)
    return _finish(y, uf, D, z, out_dtype)


def _scan(*args, **kwargs):
    return _scan_chunked(*args, **kwargs) if args[0].is_cuda else _scan_steps(*args, **kwargs)


class SelectiveScanRef(torch.autograd.Function):
    """Reference scan with recomputation in backward (stores inputs only)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        with torch.no_grad():
            return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in saved]
        with torch.enable_grad():
            out = _scan(*inputs, delta_softplus=ctx.delta_softplus)
            wrt = [t for t in inputs if t is not None and t.requires_grad]
            grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True) if wrt else ()
        it = iter(grads)
        result = [next(it) if (t is not None and t.requires_grad) else None for t in inputs]
        return (*result, None)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Selective scan, mamba-ssm semantics.

    Args:
        u: (B, E, L) input.  delta: (B, E, L) step sizes (before bias/softplus).
        A: (E, N) real state matrix (negative).  B, C: (B, N, L) input/output projections shared by all
            channels, or grouped (B, G, N, L) with G dividing E: channel e uses group e // (E / G) (mamba-ssm).
        D: (E,) skip.  z: (B, E, L) gate, output multiplied by SiLU(z).  delta_bias: (E,) fp32.

    Returns:
        (B, E, L) in u's dtype:  y_t = <h_t, C_t> + D u_t, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t.
    """
    return SelectiveScanRef.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One token at a time: the independent oracle the other formulations are tested against."""
    _check_shapes(u, A, B, C)
    out_dtype = u.dtype
    uf, dt, Af, Bf, Cf = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, seqlen = uf.shape
    # per-channel B, C: (b, e, n, L), channel e reading group e // (E / G)
    Be = _grouped(Bf).repeat_interleave(dim // _grouped(Bf).shape[1], dim=1)
    Ce = _grouped(Cf).repeat_interleave(dim // _grouped(Cf).shape[1], dim=1)
    h = uf.new_zeros(batch, dim, Af.shape[1])
    ys = []
    for t in range(seqlen):
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Be[..., t]
        ys.append((h * Ce[..., t]).sum(-1))
    return _finish(torch.stack(ys, dim=2), uf, D, z, out_dtype)


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None):
    """Depthwise causal conv: x (B, E, L), weight (E, W), bias (E,). Left-pads W-1 zeros, keeps L outputs."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation is not None else out
