"""CUDA backend: mamba-ssm's selective-scan kernel and causal-conv1d, imported lazily.

Only `visionmamba.ops` imports this module, and only when a CUDA path is requested, so CPU machines never touch
mamba_ssm / causal_conv1d / triton. Importing this module itself imports nothing compiled: `load_kernels()` does.

Compiled entry points used (mamba-ssm 2.x and causal-conv1d >= 1.5; checked against mamba-ssm 2.3.2.post1 and
causal-conv1d 1.7.0 as shipped in their wheels):

* ``selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> [out, x, (out_z)]``
  u, delta, z: (b, e, l) in the input dtype (fp32/fp16/bf16), last stride 1; A: (e, n) fp32; B, C: (b, g, n, l) in the
  input dtype (channel c reads group c // (e / g)); D, delta_bias: (e,) fp32. ``x`` holds the per-2048-token-chunk states (b, e, n_chunks, 2n) fp32;
  ``out`` is the ungated y (laid out like delta) and ``out_z = out * silu(z)`` is returned when z is given.
* ``selective_scan_cuda.bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z)
  -> [du, ddelta, dA, dB, dC, dD, ddelta_bias, (dz), (out_z)]``; dz may be a preallocated (b, e, l) view to fill.
* ``causal_conv1d.cpp_functions.causal_conv1d_fwd_function(x, weight, bias, seq_idx, initial_states,
  final_states_out, silu_activation) -> out`` and ``causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx,
  initial_states, dfinal_states, dx, return_dinitial_states, silu_activation) -> (dx, dweight, dbias, dinit)``;
  x: (b, e, l) with stride(2) == 1 (a channel view of xz is fine), weight (e, w) and bias (e,) of one dtype that may
  differ from x's (fp32 weights with bf16 activations under autocast, as mamba does).

Three entry points mirror `visionmamba.ops`: `selective_scan`, `causal_conv1d`, `mamba_inner_no_out_proj`. The last
one is the fused per-direction `MambaInnerNoOutProjFn` (mamba's `MambaInnerFn` minus out_proj, checkpoint_lvl=1);
only when causal-conv1d lacks the ``cpp_functions`` fwd/bwd API is it replaced by a composition of the two public
autograd ops (same maths, more activation memory), and that choice is logged at WARNING level.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "MambaInnerNoOutProjFn",
    "SelectiveScanCudaFn",
    "causal_conv1d",
    "inner_impl",
    "load_kernels",
    "mamba_inner_no_out_proj",
    "mamba_inner_no_out_proj_composed",
    "mamba_inner_no_out_proj_fused",
    "selective_scan",
]

log = logging.getLogger(__name__)

_kernels: Optional[SimpleNamespace] = None
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _version(module_name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module_name)
    except metadata.PackageNotFoundError:
        return "unknown"


def load_kernels() -> SimpleNamespace:
    """Import the compiled kernels once and decide which mamba-inner implementation runs.

    Returns a namespace with ``scan`` (the `selective_scan_cuda` module), ``conv_fn`` (causal-conv1d's autograd
    ``causal_conv1d_fn``), ``conv_fwd``/``conv_bwd`` (the cpp_functions, or None), ``inner`` ("fused" | "composed")
    and ``versions``. Raises ImportError naming the missing piece and the original error.
    """
    global _kernels
    if _kernels is not None:
        return _kernels
    try:
        # The bare extension module, not `mamba_ssm`: importing the package would also import its Triton and
        # Mamba-2/3 modules, none of which this backend needs.
        import selective_scan_cuda
    except (ImportError, OSError) as exc:  # OSError: undefined symbols / wrong CUDA runtime in the .so
        raise ImportError(f"mamba-ssm's compiled selective scan `selective_scan_cuda` does not import "
                          f"({type(exc).__name__}: {exc})") from exc
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError) as exc:
        raise ImportError(f"causal-conv1d does not import ({type(exc).__name__}: {exc})") from exc
    conv_fwd = conv_bwd = None
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

        conv_fwd, conv_bwd = causal_conv1d_fwd_function, causal_conv1d_bwd_function
        inner, why = "fused", "MambaInnerNoOutProjFn over selective_scan_cuda + causal_conv1d.cpp_functions"
    except ImportError as exc:
        # Older causal-conv1d (< 1.5) exposes the raw `causal_conv1d_cuda` ops with version-specific argument
        # lists; rather than guess them, compose the two public autograd ops (identical maths).
        inner, why = "composed", f"causal_conv1d.cpp_functions unavailable ({exc}); composing the autograd ops"
    versions = {"mamba_ssm": _version("mamba_ssm"), "causal_conv1d": _version("causal_conv1d")}
    log.log(logging.INFO if inner == "fused" else logging.WARNING,
            "CUDA kernels loaded (mamba-ssm %s, causal-conv1d %s); mamba_inner_no_out_proj: %s path, %s",
            versions["mamba_ssm"], versions["causal_conv1d"], inner, why)
    _kernels = SimpleNamespace(scan=selective_scan_cuda, conv_fn=causal_conv1d_fn, conv_fwd=conv_fwd,
                               conv_bwd=conv_bwd, inner=inner, versions=versions)
    return _kernels


def inner_impl() -> str:
    """``fused`` or ``composed``: which implementation `mamba_inner_no_out_proj` runs here."""
    return load_kernels().inner


def _check_dtype(t: Tensor, what: str) -> None:
    if t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the CUDA kernels take fp32/fp16/bf16 {what}, got {t.dtype}; use kernel_backend=ref "
                        "for other dtypes (e.g. float64 gradcheck)")


def _last_contig(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels read any batch/channel strides but need a unit stride along L."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


# ----------------------------------------------------------------------------------------------- selective scan
class SelectiveScanCudaFn(torch.autograd.Function):
    """mamba-ssm's selective scan as an autograd Function over the bare `selective_scan_cuda` fwd/bwd.

    Same contract as ``mamba_ssm.selective_scan_fn`` with variable B and C, either (b, n, l) or grouped (b, g, n, l):
    saves its inputs, the chunk states ``x`` and (with z) the ungated output, and calls the fused backward kernel.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        k = load_kernels()
        u, delta, z = _last_contig(u), _last_contig(delta), _last_contig(z)
        ctx.squeeze_B, ctx.squeeze_C = B.dim() == 3, C.dim() == 3
        B = _last_contig(B.unsqueeze(1) if ctx.squeeze_B else B)  # (b, g, n, l); ungrouped = one group
        C = _last_contig(C.unsqueeze(1) if ctx.squeeze_C else C)
        D = D.contiguous() if D is not None else None
        out, x, *rest = k.scan.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.has_z = z is not None
        # `out` (ungated y) is only needed by the backward when there is a gate.
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out if ctx.has_z else None)
        return rest[0] if ctx.has_z else out

    @staticmethod
    def backward(ctx, dout):
        k = load_kernels()
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = k.scan.bwd(
            u, delta, A, B, C, D, z, delta_bias, _last_contig(dout), x, out, None, ctx.delta_softplus, False)
        return (du, ddelta, dA, dB.squeeze(1) if ctx.squeeze_B else dB, dC.squeeze(1) if ctx.squeeze_C else dC,
                dD if D is not None else None,
                rest[0] if ctx.has_z else None,
                ddelta_bias if delta_bias is not None else None,
                None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """`visionmamba.ops.selective_scan` on the CUDA kernel. u, delta, z: (b, e, l); A: (e, n); B, C: (b, n, l) or
    grouped (b, g, n, l) with e divisible by g (channel c reads group c // (e / g))."""
    _check_dtype(u, "scan inputs")
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (3, 4) or (t.dim() == 4 and u.shape[1] % t.shape[1]):
            raise ValueError(f"{name} must be (batch, d_state, L) or (batch, groups, d_state, L) with groups "
                             f"dividing {u.shape[1]} channels; got {tuple(t.shape)}")
    dtype = u.dtype
    # The kernel takes delta, B, C and z in u's dtype and A, D, delta_bias in fp32 (its state precision); the casts
    # are no-ops for the mixer's tensors and keep autograd intact otherwise.
    return SelectiveScanCudaFn.apply(
        u, delta.to(dtype), A.float(), B.to(dtype), C.to(dtype), None if D is None else D.float(),
        None if z is None else z.to(dtype), None if delta_bias is None else delta_bias.float(), delta_softplus)


# ------------------------------------------------------------------------------------------------ causal conv1d
def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal conv1d through causal-conv1d's autograd op. x: (b, e, l); weight: (e, w); bias: (e,)."""
    _check_dtype(x, "conv inputs")
    k = load_kernels()
    # The kernel accepts a weight dtype different from x's (fp32 weights, bf16 activations), but the bias must
    # match the weight's dtype.
    return k.conv_fn(_last_contig(x), weight.contiguous(),
                     None if bias is None else bias.to(weight.dtype).contiguous(), activation=activation)


# ------------------------------------------------------------------------------------------------- mamba inner
def _autocast_dtype() -> Optional[torch.dtype]:
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


class MambaInnerNoOutProjFn(torch.autograd.Function):
    """One direction of the bimamba mixer, fused: conv1d+SiLU -> x_proj -> dt_proj -> selective scan with gate.

    Follows mamba-ssm's ``MambaInnerFn`` (checkpoint_lvl=1) without the output projection: the forward keeps xz,
    x_dbl, B, C, the scan's chunk states and its ungated output; the backward recomputes the conv output and delta
    (two cheap ops) instead of storing them, runs the scan backward (which also writes dz straight into dxz), the
    projection backwards by hand and the conv backward (which writes dx into the other half of dxz).

    Shapes: xz (b, 2e, l); conv1d_weight (e, w); conv1d_bias (e,); x_proj_weight (r + 2n, e);
    delta_proj_weight (e, r); A (e, n) fp32; D, delta_bias (e,) fp32. Returns y * silu(z): (b, e, l).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias):
        k = load_kernels()
        seqlen = xz.shape[-1]
        dt_rank = delta_proj_weight.shape[1]
        d_state = A.shape[-1]
        amp_dtype = _autocast_dtype()
        if amp_dtype is not None:
            # As mamba: the projections run in the autocast dtype; A, D and delta_bias stay fp32 (the kernel's
            # weight type) and the conv weight keeps its own dtype (the conv kernel mixes types itself).
            x_proj_weight = x_proj_weight.to(amp_dtype)
            delta_proj_weight = delta_proj_weight.to(amp_dtype)
        xz = _last_contig(xz)
        x, z = xz.chunk(2, dim=1)  # (b, e, l) views, stride(-1) == 1
        conv1d_bias = conv1d_bias.contiguous() if conv1d_bias is not None else None
        conv1d_out = k.conv_fwd(x, conv1d_weight, conv1d_bias, None, None, None, True)  # (b, e, l), SiLU applied
        x_dbl = F.linear(rearrange(conv1d_out, "b e l -> (b l) e"), x_proj_weight)  # (b*l, r + 2n)
        # (e, r) @ (r, b*l) viewed as (b, e, l): L stays the fastest-moving dimension, which is what the scan reads,
        # so no transpose copy is needed.
        delta = rearrange(delta_proj_weight @ x_dbl[:, :dt_rank].t(), "e (b l) -> b e l", l=seqlen)
        B = rearrange(x_dbl[:, dt_rank:dt_rank + d_state], "(b l) n -> b 1 n l", l=seqlen).contiguous()
        C = rearrange(x_dbl[:, -d_state:], "(b l) n -> b 1 n l", l=seqlen).contiguous()
        D = D.contiguous() if D is not None else None
        out, scan_states, out_z = k.scan.fwd(conv1d_out, delta, A, B, C, D, z, delta_bias, True)
        # checkpoint_lvl=1: conv1d_out and delta are recomputed in backward, not saved.
        ctx.save_for_backward(xz, conv1d_weight, conv1d_bias, x_dbl, x_proj_weight, delta_proj_weight,
                              A, B, C, D, delta_bias, scan_states, out)
        return out_z

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        k = load_kernels()
        (xz, conv1d_weight, conv1d_bias, x_dbl, x_proj_weight, delta_proj_weight,
         A, B, C, D, delta_bias, scan_states, out) = ctx.saved_tensors
        seqlen = xz.shape[-1]
        dt_rank = delta_proj_weight.shape[1]
        d_state = A.shape[-1]
        x, z = xz.chunk(2, dim=1)
        conv1d_out = k.conv_fwd(x, conv1d_weight, conv1d_bias, None, None, None, True)
        delta = rearrange(delta_proj_weight @ x_dbl[:, :dt_rank].t(), "e (b l) -> b e l", l=seqlen)
        dxz = torch.empty_like(xz)  # (b, 2e, l): both kernels write their half in place
        dx, dz = dxz.chunk(2, dim=1)
        dconv1d_out, ddelta, dA, dB, dC, dD, ddelta_bias, dz = k.scan.bwd(
            conv1d_out, delta, A, B, C, D, z, delta_bias, _last_contig(dout), scan_states, out, dz,
            True, False)  # delta_softplus, no out_z recompute (there is no out_proj to feed)
        dx_dbl = torch.empty_like(x_dbl)  # (b*l, r + 2n)
        dx_dbl[:, dt_rank:dt_rank + d_state] = rearrange(dB, "b 1 n l -> (b l) n")
        dx_dbl[:, -d_state:] = rearrange(dC, "b 1 n l -> (b l) n")
        ddelta = rearrange(ddelta, "b e l -> e (b l)")
        ddelta_proj_weight = torch.einsum("eB,Br->er", ddelta, x_dbl[:, :dt_rank])
        dx_dbl[:, :dt_rank] = torch.einsum("eB,er->Br", ddelta, delta_proj_weight)
        dx_proj_weight = torch.einsum("Br,Bd->rd", dx_dbl, rearrange(conv1d_out, "b e l -> (b l) e"))
        # d(conv1d_out) = scan's du + x_proj^T · dx_dbl, accumulated into one (e, b*l) buffer.
        dconv1d_out = rearrange(dconv1d_out, "b e l -> e (b l)")
        dconv1d_out = torch.addmm(dconv1d_out, x_proj_weight.t(), dx_dbl.t(), out=dconv1d_out)
        dconv1d_out = rearrange(dconv1d_out, "e (b l) -> b e l", b=xz.shape[0], l=seqlen)
        dx, dconv1d_weight, dconv1d_bias, _ = k.conv_bwd(x, conv1d_weight, conv1d_bias, dconv1d_out, None, None,
                                                         None, dx, False, True)
        return (dxz, dconv1d_weight, dconv1d_bias if conv1d_bias is not None else None, dx_proj_weight,
                ddelta_proj_weight, dA, dD if D is not None else None,
                ddelta_bias if delta_bias is not None else None)


def _inner_args(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias):
    _check_dtype(xz, "activations")
    if conv1d_weight.dim() != 2:
        raise ValueError(f"conv1d_weight must be (E, W), got {tuple(conv1d_weight.shape)}")
    if conv1d_bias is not None and conv1d_bias.dtype != conv1d_weight.dtype:
        conv1d_bias = conv1d_bias.to(conv1d_weight.dtype)  # the conv kernel requires bias dtype == weight dtype
    return (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A.float(),
            None if D is None else D.float(), None if delta_bias is None else delta_bias.float())


def mamba_inner_no_out_proj_fused(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D,
                                  delta_bias):
    """The fused Function; raises if causal-conv1d lacks the cpp_functions API it needs."""
    if load_kernels().conv_fwd is None:
        raise ImportError("the fused mamba-inner path needs causal_conv1d.cpp_functions (causal-conv1d >= 1.5)")
    return MambaInnerNoOutProjFn.apply(*_inner_args(xz, conv1d_weight, conv1d_bias, x_proj_weight,
                                                    delta_proj_weight, A, D, delta_bias))


def mamba_inner_no_out_proj_composed(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D,
                                     delta_bias):
    """The same maths from the two autograd ops (stores conv output, delta, B, C: more activation memory)."""
    xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias = _inner_args(
        xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias)
    seqlen = xz.shape[-1]
    dt_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)  # (b, e, l) each
    x = causal_conv1d(x, conv1d_weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(rearrange(x, "b e l -> (b l) e"), x_proj_weight)  # (b*l, r + 2n); autocast casts here
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    delta = rearrange(F.linear(dt, delta_proj_weight), "(b l) e -> b e l", l=seqlen)
    B = rearrange(B, "(b l) n -> b n l", l=seqlen)
    C = rearrange(C, "(b l) n -> b n l", l=seqlen)
    return selective_scan(x, delta, A, B, C, D, z, delta_bias, True)


def mamba_inner_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias):
    """One mixer direction (see `visionmamba.ops.mamba_inner_no_out_proj`) on the implementation chosen at load."""
    if load_kernels().inner == "fused":
        return mamba_inner_no_out_proj_fused(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                             A, D, delta_bias)
    return mamba_inner_no_out_proj_composed(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                            A, D, delta_bias)
