"""SS2D: VMamba's 2-D selective-scan token mixer (MzeroMiko/VMamba ``classification/models/vmamba.py``).

The feature map is unrolled into K sequences ("directions"), every direction gets its own x_proj / dt_proj /
A / D, and all K sequences go through ONE `visionmamba.ops.selective_scan` call: the directions are stacked
along the channel axis (u: (B, K*E, L)) and B/C use the grouped layout (B, K, N, L), so channel block k reads
direction k's B_k/C_k — exactly how the official ``forward_corev2`` calls its kernel. The K outputs are folded
back onto the grid and summed ("cross-merge").

The default scan is VMamba's cross-scan: row-major, column-major, and both reversed. `SS2D` exposes the
scan/merge as two methods so LocalMamba's windowed directions (`visionmamba.layers.local_scan`) reuse
everything else. Parameter names follow the official code (``in_proj``, ``conv2d``, ``x_proj_weight``,
``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``, ``Ds``, ``out_norm``, ``out_proj``) so official
checkpoints load unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

__all__ = [
    "LayerNorm2d",
    "Linear2d",
    "Permute",
    "SS2D",
    "cross_merge",
    "cross_scan",
    "directional_selective_scan",
    "init_A_logs",
    "init_Ds",
    "init_dt_projs",
]


# ---------------------------------------------------------------------- channels-first helpers
class Linear2d(nn.Linear):
    """Linear layer applied over the channels of a (B, C, H, W) map (a 1x1 conv). The weight keeps nn.Linear's
    (out, in) shape, so checkpoints store it like a Linear; conv-shaped (out, in, 1, 1) weights load too."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].reshape(self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (VMamba's ``ln2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (keeps the official nn.Sequential indices of the stems)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


# ---------------------------------------------------------------------- cross-scan / cross-merge
def cross_scan(x: Tensor) -> Tensor:
    """VMamba's four directions. (B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    xs = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)  # (B, 2, C, L)
    return torch.cat([xs, xs.flip(-1)], dim=1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `cross_scan`, summing the directions. (B, 4, C, H*W) -> (B, C, H*W) in row-major order."""
    batch, _, channels, length = ys.shape
    y = ys[:, 0:2] + ys[:, 2:4].flip(-1)  # undo the reversals: (B, 2, C, L)
    # direction 1 is column-major: (C, W, H) -> (C, H, W)
    col = y[:, 1].reshape(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, length)
    return y[:, 0] + col


# ---------------------------------------------------------------------- parameter init (official ``mamba_init``)
def init_dt_projs(k: int, d_inner: int, dt_rank: int, dt_scale: float = 1.0, dt_min: float = 0.001,
                  dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> tuple[nn.Parameter, nn.Parameter]:
    """K stacked dt projections: weight (K, E, R) ~ U(±R^-0.5·scale) (preserves variance), bias (K, E) =
    softplus^-1 of a log-uniform step in [dt_min, dt_max] (pytorch/pytorch#72759 for the inverse)."""
    std = dt_rank ** -0.5 * dt_scale
    weight = torch.empty(k, d_inner, dt_rank).uniform_(-std, std)
    dt = torch.exp(torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    bias = dt + torch.log(-torch.expm1(-dt))
    return nn.Parameter(weight), nn.Parameter(bias)


def init_A_logs(k: int, d_inner: int, d_state: int) -> nn.Parameter:
    """S4D-real ``A_logs`` = log(1..N) for every channel of every direction, (K*E, N), fp32, no weight decay."""
    A_logs = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1)
    A_logs = nn.Parameter(A_logs)
    A_logs._no_weight_decay = True
    return A_logs


def init_Ds(k: int, d_inner: int) -> nn.Parameter:
    """Skip ``Ds`` = 1 for every channel of every direction, (K*E,), no weight decay."""
    Ds = nn.Parameter(torch.ones(k * d_inner))
    Ds._no_weight_decay = True
    return Ds


# ---------------------------------------------------------------------- the one-call multi-direction scan
def directional_selective_scan(xs: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
                               A_logs: Tensor, Ds: Tensor, z: Optional[Tensor] = None,
                               backend: Optional[str] = None) -> Tensor:
    """Selective scan of K directions with per-direction projections, in one `ops.selective_scan` call.

    Args:
        xs: (B, K, E, L) the K unrolled sequences.  x_proj_weight: (K, R + 2N, E).  dt_projs_weight: (K, E, R).
        dt_projs_bias: (K, E).  A_logs: (K*E, N).  Ds: (K*E,).  z: optional (B, K, E, L) gate (y * SiLU(z)).

    Returns:
        (B, K, E, L).
    """
    batch, k, d_inner, length = xs.shape
    dt_rank = dt_projs_weight.shape[-1]
    d_state = A_logs.shape[-1]
    u = xs.reshape(batch, k * d_inner, length)
    # Per-direction projections as grouped 1x1 convs (the official "no_einsum" v05 path): same maths as K
    # separate Linears, one kernel launch, and fvcore counts them as convolutions.
    x_dbl = F.conv1d(u, x_proj_weight.reshape(-1, d_inner, 1), groups=k)  # (B, K*(R+2N), L)
    dts, Bs, Cs = x_dbl.view(batch, k, -1, length).split([dt_rank, d_state, d_state], dim=2)
    dts = F.conv1d(dts.reshape(batch, k * dt_rank, length), dt_projs_weight.reshape(k * d_inner, dt_rank, 1),
                   groups=k)  # (B, K*E, L)
    ys = ops.selective_scan(
        u, dts, -torch.exp(A_logs.float()), Bs.contiguous(), Cs.contiguous(), Ds.float(),
        z=None if z is None else z.reshape(batch, k * d_inner, length),
        delta_bias=dt_projs_bias.reshape(-1).float(), delta_softplus=True, backend=backend,
    )  # grouped B/C (B, K, N, L): channel block k uses direction k's B_k, C_k
    return ys.view(batch, k, d_inner, length)


# ---------------------------------------------------------------------- SS2D
class SS2D(nn.Module):
    """2-D selective-scan mixer (VMamba SS2D, forward types ``v05`` / ``v05_noz``).

    in_proj -> (z gate) -> depthwise conv -> SiLU -> K-direction scan -> merge -> out_norm -> (* z) -> out_proj.

    Args:
        d_model: channels C.  d_state: N.  ssm_ratio: E = ssm_ratio * C.  dt_rank: "auto" = ceil(C / 16).
        d_conv: depthwise conv kernel (< 2: no conv).  conv_bias: bias of that conv.
        use_z: multiply by the SiLU gate z (``v05``); False is VMamba-v2's ``_noz`` (in_proj gives E channels).
        channel_first: inputs/outputs are (B, C, H, W) (``ln2d`` models) instead of (B, H, W, C).
        num_directions: K (4 for the cross-scan; subclasses with other scans pass theirs).
        dropout: after out_proj.  kernel_backend: ``auto|cuda|ref`` for the scan.
    """

    def __init__(self, d_model: int = 96, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank="auto",
                 d_conv: int = 3, conv_bias: bool = True, use_z: bool = True, channel_first: bool = False,
                 num_directions: int = 4, dropout: float = 0.0, bias: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 kernel_backend: str = "auto"):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.k_group = num_directions
        self.use_z = use_z
        self.channel_first = channel_first
        self.kernel_backend = kernel_backend
        E, R, N, K = self.d_inner, self.dt_rank, d_state, num_directions
        Linear = Linear2d if channel_first else nn.Linear

        self.in_proj = Linear(d_model, 2 * E if use_z else E, bias=bias)
        self.act = nn.SiLU()
        self.conv2d = (nn.Conv2d(E, E, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=E, bias=conv_bias)
                       if d_conv > 1 else None)
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, E))
        for w in self.x_proj_weight:  # nn.Linear's default init, direction by direction
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.dt_projs_weight, self.dt_projs_bias = init_dt_projs(K, E, R, dt_scale, dt_min, dt_max, dt_init_floor)
        self.A_logs = init_A_logs(K, E, N)
        self.Ds = init_Ds(K, E)
        self.out_norm = LayerNorm2d(E) if channel_first else nn.LayerNorm(E)
        self.out_proj = Linear(E, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # Scan order hooks: subclasses (LocalMamba) replace these two.
    def scan(self, x: Tensor) -> Tensor:
        """(B, E, H, W) -> (B, K, E, L') sequences to scan."""
        return cross_scan(x)

    def merge(self, ys: Tensor, height: int, width: int) -> Tensor:
        """(B, K, E, L') scan outputs -> (B, E, H*W) row-major."""
        return cross_merge(ys, height, width)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) if channel_first else (B, H, W, C) -> same layout."""
        x = self.in_proj(x)
        z = None
        if self.use_z:
            x, z = x.chunk(2, dim=1 if self.channel_first else -1)
            z = self.act(z)
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)  # (B, E, H, W)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = self.act(x)
        batch, _, height, width = x.shape
        ys = directional_selective_scan(self.scan(x), self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                        self.A_logs, self.Ds, backend=self.kernel_backend)  # (B, K, E, L')
        y = self.merge(ys, height, width)  # (B, E, H*W)
        if self.channel_first:
            y = y.reshape(batch, -1, height, width)
        else:
            y = y.transpose(1, 2).reshape(batch, height, width, -1)
        y = self.out_norm(y).to(x.dtype)
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))
