"""Bidirectional Mamba mixer ("bimamba v2"), parameter for parameter as in Vim / ShuffleMamba / Mamba-Reg.

One shared ``in_proj`` produces x and the gate z; each direction has its own conv1d, x_proj, dt_proj, A and D
(the backward ones suffixed ``_b``). The backward branch runs on the flipped sequence — x *and* z — and the
two outputs are averaged before the single bias-free ``out_proj``:  out = out_proj((y_f + flip(y_b)) / 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .. import ops


def _s4d_real_log(d_inner: int, d_state: int) -> Tensor:
    """A_log = log(1..N) per channel (S4D-real), kept in fp32."""
    A = repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=d_inner).contiguous()
    return torch.log(A)


class BiMambaMixer(nn.Module):
    """Bidirectional selective-SSM token mixer. (B, L, D) -> (B, L, D).

    Args:
        d_model: token width D.  d_state: N (16).  d_conv: causal conv width (4).  expand: E = expand * D.
        dt_rank: "auto" = ceil(D / 16).  dt_min/dt_max/dt_init_floor: range of the initial step size.
        kernel_backend: ``auto|cuda|ref`` (see `visionmamba.ops`).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, kernel_backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.kernel_backend = kernel_backend
        E, R, N = self.d_inner, self.dt_rank, d_state

        # Registration order reproduces the official state_dict order (own parameters first, then modules).
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)

        # dt_proj weight ~ U(±R^-0.5) preserves variance; its bias is softplus^-1 of a log-uniform dt in
        # [dt_min, dt_max] and is marked _no_reinit so the model-level init keeps it.
        dt_std = R ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse softplus, pytorch/pytorch#72759
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        self.A_log = nn.Parameter(_s4d_real_log(E, N))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True

        # Backward direction. As in the official code, dt_proj_b keeps PyTorch's default init and its bias is
        # NOT marked _no_reinit, so the model init zeroes it (Δ_b starts at softplus(0) = 0.693).
        self.A_b_log = nn.Parameter(_s4d_real_log(E, N))
        self.A_b_log._no_weight_decay = True
        self.conv1d_b = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj_b = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj_b = nn.Linear(R, E, bias=True)
        self.D_b = nn.Parameter(torch.ones(E))
        self.D_b._no_weight_decay = True

        self.out_proj = nn.Linear(E, d_model, bias=bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if ops.resolve_backend(self.kernel_backend, hidden_states.device) == "fast":
            return self.forward_fast(hidden_states)
        seqlen = hidden_states.shape[1]
        # One matmul that also transposes to the (B, 2E, L) layout the scan wants.
        xz = rearrange(self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l",
                       l=seqlen)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        A = -torch.exp(self.A_log.float())  # (E, N)
        A_b = -torch.exp(self.A_b_log.float())
        y_f = ops.mamba_inner_no_out_proj(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                          self.dt_proj.weight, A, self.D.float(), self.dt_proj.bias.float(),
                                          backend=self.kernel_backend)
        y_b = ops.mamba_inner_no_out_proj(xz.flip([-1]), self.conv1d_b.weight, self.conv1d_b.bias,
                                          self.x_proj_b.weight, self.dt_proj_b.weight, A_b, self.D_b.float(),
                                          self.dt_proj_b.bias.float(), backend=self.kernel_backend)
        y = rearrange(y_f + y_b.flip([-1]), "b e l -> b l e") / 2  # (B, L, E)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)

    @staticmethod
    def _conv_bias(conv: nn.Conv1d) -> Tensor:
        if conv.bias is not None:
            return conv.bias
        return conv.weight.new_zeros(conv.weight.shape[0])

    def _padded_x_proj_weight(self, x_proj_weight: Tensor) -> Tensor:
        """x_proj's rows [dt (R) | B (N) | C (N)] become [dt (R) | zeros | B | C], so x_proj's output has R_pad = R
        rounded up to a multiple of 8 columns before B. In bf16 every slice of it then starts on a 16-byte boundary
        with a 16-byte row stride, and cuBLAS runs its vectorised kernels: with Vim-T's R = 12 (row stride 44) all six
        x_proj / dt_proj matmuls of a direction ran `align2` kernels, 4.3 ms (12 %) of the H200 training step. The
        zero rows add exact zeros and the padded weight is built from the parameter, so outputs and gradients are
        unchanged. dt_proj reads all R_pad columns (16-byte rows) with its unpadded (E, R) weight: its kernels mask the
        weight's rank, so no padded copy of it is built per step.
        Returns the x_proj weight (R_pad + 2N, E).
        """
        R = self.dt_rank
        R_pad = -(-R // 8) * 8
        if R_pad == R:
            return x_proj_weight
        return torch.cat([x_proj_weight[:R], x_proj_weight.new_zeros(R_pad - R, x_proj_weight.shape[1]),
                          x_proj_weight[R:]])  # (R_pad + 2N, E)

    def forward_fast(self, hidden_states: Tensor) -> Tensor:
        """Same maths in the (B, L, E) layout with both scans in one kernel (`ops.bimamba_scan`): no flips.

        The official backward branch runs a causal conv on the flipped sequence; on the unflipped time axis that is
        an anti-causal conv with the kernel reversed, so x_b, dt_b, B_b, C_b are produced without flipping, and the
        kernel scans them from the end.

        With autograd (training) everything between in_proj and out_proj is one autograd node (`ops.bimamba_inner`),
        whose backward adds and concatenates the x / z gradients inside the GEMM and kernels that produce them.
        Without autograd (inference) fewer (B, L, E) activations are held at the scan (the peak): x and z come from
        two matmuls (in_proj's row halves: the same products) so x is freed once the convs have read it, and the scan
        writes y over x_f (`ops.bimamba_scan_into_x`; x_b may hold scratch). At 1248 px that is 2 x 150 MB of Vim-T's
        peak.
        """
        E, N = self.d_inner, self.d_state
        w, bias = self.in_proj.weight, self.in_proj.bias
        # (E, W), (E,) per direction; flatten, not [:, 0]: a view's gradient is a view (select's backward would
        # build a zeroed (E, 1, W) tensor and copy into it, a kernel per weight and step)
        conv = (self.conv1d.weight.flatten(1), self._conv_bias(self.conv1d), self.conv1d_b.weight.flatten(1),
                self._conv_bias(self.conv1d_b))
        xw_f, xw_b = self._padded_x_proj_weight(self.x_proj.weight), self._padded_x_proj_weight(self.x_proj_b.weight)
        dtw_f, dtw_b = self.dt_proj.weight, self.dt_proj_b.weight  # (E, R)
        # A = -exp(A_log) of both directions at once: under torch.compile one kernel each way (forward, and dA_log =
        # dA * A in the backward) instead of one per direction
        A_f, A_b = (-torch.exp(torch.stack([self.A_log, self.A_b_log]).float())).unbind(0)  # (E, N) each
        ssm_f = (A_f, self.D.float(), self.dt_proj.bias.float())  # A, D, dt_bias
        ssm_b = (A_b, self.D_b.float(), self.dt_proj_b.bias.float())
        if torch.is_grad_enabled():
            xz = F.linear(hidden_states, w, bias)  # (B, L, 2E) = [x | z]
            y = ops.bimamba_inner(xz, *conv, xw_f, dtw_f, *ssm_f, xw_b, dtw_b, *ssm_b)  # (B, L, E)
            return F.linear(y, self.out_proj.weight, self.out_proj.bias)
        x = F.linear(hidden_states, w[:E], None if bias is None else bias[:E])  # (B, L, E)
        z = F.linear(hidden_states, w[E:], None if bias is None else bias[E:])  # (B, L, E)
        # both depthwise convs + SiLU in one kernel: (B, L, E) x_f, x_b, contiguous
        x_f, x_b = ops.bimamba_conv(x, *conv)
        del x  # the last reference: freed before the scan
        R_pad = xw_f.shape[0] - 2 * N
        dt_f, B_f, C_f = F.linear(x_f, xw_f).split([R_pad, N, N], dim=-1)  # (B, L, R_pad), (B, L, N) x2
        dt_b, B_b, C_b = F.linear(x_b, xw_b).split([R_pad, N, N], dim=-1)
        A_f, D_f, dt_bias_f = ssm_f
        A_b, D_b, dt_bias_b = ssm_b
        dt_f, dt_b = ops.dt_proj(dt_f, dtw_f, dt_b, dtw_b)  # (B, L, E) each, one launch on CUDA
        y = ops.bimamba_scan_into_x(x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b,
                                    z)  # (B, L, E), averaged and gated, in x_f's buffer
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)
