"""CUDA backend: mamba-ssm's selective scan and causal-conv1d, imported lazily.

Only `visionmamba.ops` imports this module, and only when a CUDA path is requested, so CPU machines never
touch mamba_ssm/causal_conv1d/triton.
"""
from __future__ import annotations

import torch.nn.functional as F
import torch
from einops import rearrange

_kernels = None


def load_kernels():
    """Import the kernels once; raises ImportError (with the original reason) when they are missing."""
    global _kernels
    if _kernels is None:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        _kernels = {"selective_scan_fn": selective_scan_fn, "causal_conv1d_fn": causal_conv1d_fn}
    return _kernels


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    k = load_kernels()
    # The kernel requires delta in u's dtype and contiguous last dims.
    return k["selective_scan_fn"](u.contiguous(), delta.to(u.dtype).contiguous(), A.float(), B.contiguous(),
                                  C.contiguous(), None if D is None else D.float(),
                                  None if z is None else z.contiguous(),
                                  None if delta_bias is None else delta_bias.float(), delta_softplus)


def causal_conv1d(x, weight, bias=None, activation=None):
    k = load_kernels()
    return k["causal_conv1d_fn"](x.contiguous(), weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                 activation=activation)


def mamba_inner_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias):
    """Composition of the two kernels (same maths as `ops._mamba_inner_ref`)."""
    seqlen = xz.shape[-1]
    dt_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d(x, conv1d_weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(rearrange(x, "b e l -> (b l) e"), x_proj_weight)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    delta = rearrange(F.linear(dt, delta_proj_weight), "(b l) e -> b e l", l=seqlen)
    B = rearrange(B, "(b l) n -> b n l", l=seqlen).contiguous()
    C = rearrange(C, "(b l) n -> b n l", l=seqlen).contiguous()
    return selective_scan(x, delta, A, B, C, D, z, delta_bias, True)
