"""Selective-scan and causal-conv1d ops behind one dispatch point.

Backends:
  * ``ref``  — exact pure PyTorch (`visionmamba.ops.ref`), any device/dtype, state in fp32.
  * ``cuda`` — mamba-ssm / causal-conv1d CUDA kernels (`visionmamba.ops.cuda`, imported lazily; install with
    ``pip install -r requirements-cuda.txt --no-build-isolation``).
  * ``fast`` — our Triton kernel for the bidirectional mixer (`visionmamba.ops.fast`: both directions in one launch,
    (B, L, E) layout, recomputing backward); single-direction scans (VMamba, LocalMamba) use ``cuda`` under it.
  * ``auto`` — ``cuda`` when the inputs live on a GPU and the kernels import, otherwise ``ref``.

Nothing falls back silently: the first time a (requested, device) pair resolves, the chosen path is logged,
at WARNING level when a GPU run ends up on the slow reference. Asking for ``cuda`` without the kernels is an
error that names the install command. ``import visionmamba`` never imports mamba_ssm, causal_conv1d or triton.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .ref import causal_conv1d_ref, selective_scan_naive, selective_scan_ref

__all__ = [
    "BACKENDS",
    "KernelUnavailableError",
    "bimamba_conv",
    "bimamba_inner",
    "bimamba_scan",
    "bimamba_scan_into_x",
    "causal_conv1d",
    "cuda_kernels_available",
    "dt_proj",
    "get_default_backend",
    "mamba_inner_no_out_proj",
    "resolve_backend",
    "selective_scan",
    "selective_scan_naive",
    "selective_scan_ref",
    "causal_conv1d_ref",
    "set_default_backend",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "fast", "ref")
CUDA_INSTALL_HINT = (
    "install the kernels with `pip install -r requirements-cuda.txt --no-build-isolation` "
    "(offline: prefix MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE), or use kernel_backend=ref"
)


class KernelUnavailableError(RuntimeError):
    """Raised when a backend was explicitly requested but cannot run here."""


_default_backend = os.environ.get("VISIONMAMBA_KERNEL_BACKEND", "auto")
_cuda_status: Optional[tuple[bool, str]] = None
_announced: set = set()


def set_default_backend(name: str) -> None:
    """Backend used when an op or model passes ``backend=None``/``"default"``."""
    global _default_backend
    _validate(name)
    _default_backend = name


def get_default_backend() -> str:
    return _default_backend


def _validate(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")


def cuda_kernels_available() -> tuple[bool, str]:
    """(available, reason). Tries the lazy import once and caches the answer."""
    global _cuda_status
    if _cuda_status is None:
        if not torch.cuda.is_available():
            _cuda_status = (False, "no CUDA device is visible to torch")
        else:
            try:
                from . import cuda as _cuda  # noqa: F401  (imports mamba_ssm / causal_conv1d)

                _cuda.load_kernels()
                _cuda_status = (True, "mamba-ssm selective_scan + causal-conv1d kernels imported")
            except Exception as exc:  # ImportError, undefined symbols, ABI mismatches...
                _cuda_status = (False, f"{type(exc).__name__}: {exc}")
    return _cuda_status


def resolve_backend(requested: Optional[str], device: torch.device | str) -> str:
    """Map a requested backend (``auto|cuda|ref|None``) and a device to the path that will run."""
    requested = _default_backend if requested in (None, "default") else requested
    _validate(requested)
    device = torch.device(device)
    if requested == "ref":
        resolved, why = "ref", "requested"
    elif requested == "fast":
        if device.type != "cuda":
            raise KernelUnavailableError(f"kernel_backend=fast runs Triton kernels on a CUDA device, got {device}")
        try:
            import triton  # noqa: F401  (lazy: only when the fast path is requested)
        except ImportError as exc:
            raise KernelUnavailableError(f"kernel_backend=fast needs triton ({exc}); pip install triton") from exc
        resolved, why = "fast", "requested (Triton bidirectional scan)"
    elif requested == "cuda":
        if device.type != "cuda":
            raise KernelUnavailableError(f"kernel_backend=cuda needs inputs on a CUDA device, got {device}")
        ok, why = cuda_kernels_available()
        if not ok:
            raise KernelUnavailableError(f"kernel_backend=cuda but the CUDA kernels are unavailable ({why}); "
                                         + CUDA_INSTALL_HINT)
        resolved = "cuda"
    else:  # auto
        if device.type == "cuda":
            ok, why = cuda_kernels_available()
            resolved = "cuda" if ok else "ref"
        else:
            resolved, why = "ref", f"inputs on {device.type}"
    key = (requested, device.type, resolved)
    if key not in _announced and not torch.compiler.is_compiling():  # a logging call would break a traced graph
        _announced.add(key)
        slow_gpu_path = resolved == "ref" and device.type == "cuda"
        log.log(logging.WARNING if slow_gpu_path else logging.INFO,
                "selective-scan kernels: %s path (requested %s on %s; %s)%s", resolved, requested, device.type, why,
                "; this is the slow pure-PyTorch reference: " + CUDA_INSTALL_HINT if slow_gpu_path else "")
    return resolved


def _single_direction(backend: Optional[str], device) -> str:
    """Backend for one-direction ops: the ``fast`` kernel is bidirectional, so they use ``cuda`` (or ``ref``)."""
    resolved = resolve_backend(backend, device)
    if resolved == "fast":
        return "cuda" if cuda_kernels_available()[0] else resolve_backend("ref", device)
    return resolved


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   backend: Optional[str] = None) -> Tensor:
    """Selective scan (mamba-ssm ``selective_scan_fn`` semantics). u, delta, z: (B, E, L); A: (E, N);
    B, C: (B, N, L), or grouped (B, G, N, L) where channel e uses group e // (E / G) (several independent scans in
    one call, e.g. VMamba's 4 directions stacked along E); D, delta_bias: (E,). Returns (B, E, L)."""
    if _single_direction(backend, u.device) == "cuda":
        from . import cuda

        return cuda.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
                  backend: Optional[str] = None) -> Tensor:
    """Depthwise causal conv1d. x: (B, E, L); weight: (E, W); bias: (E,). Returns (B, E, L)."""
    if _single_direction(backend, x.device) == "cuda":
        from . import cuda

        return cuda.causal_conv1d(x, weight, bias, activation)
    return causal_conv1d_ref(x, weight, bias, activation)


def mamba_inner_no_out_proj(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], x_proj_weight: Tensor,
                            delta_proj_weight: Tensor, A: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
                            backend: Optional[str] = None) -> Tensor:
    """One direction of the (bi)Mamba mixer, without out_proj (Vim's ``mamba_inner_fn_no_out_proj``).

    xz: (B, 2E, L), split into x (conv → SiLU → scan input) and the gate z. conv1d_weight: (E, W) or (E, 1, W);
    x_proj_weight: (R + 2N, E); delta_proj_weight: (E, R); A: (E, N) (already ``-exp(A_log)``); D, delta_bias: (E,).
    Returns the gated scan output y ⊙ SiLU(z), (B, E, L).
    """
    if conv1d_weight.dim() == 3:
        conv1d_weight = rearrange(conv1d_weight, "e 1 w -> e w")
    if _single_direction(backend, xz.device) == "cuda":
        from . import cuda

        return cuda.mamba_inner_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                            A, D, delta_bias)
    return _mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias)


def bimamba_scan(x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Tensor, dt_bias_f: Tensor,
                 x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Tensor, dt_bias_b: Tensor,
                 z: Tensor) -> Tensor:
    """Both scan directions of the bidirectional mixer in the (B, L, E) layout (see `visionmamba.ops.fast`):
    (scan_fwd(x_f, ...) + scan_rev(x_b, ...)) / 2 * SiLU(z). Triton on CUDA tensors, the PyTorch reference on CPU."""
    from . import fast

    return fast.bimamba_scan(x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b, dt_bias_b, z)


def bimamba_scan_into_x(x_f: Tensor, dt_f: Tensor, A_f: Tensor, B_f: Tensor, C_f: Tensor, D_f: Tensor,
                        dt_bias_f: Tensor, x_b: Tensor, dt_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
                        D_b: Tensor, dt_bias_b: Tensor, z: Tensor) -> Tensor:
    """`bimamba_scan` for inference (no autograd), its output written over x_f and returned (x_b may be
    overwritten too)."""
    from . import fast

    return fast.bimamba_scan_into_x(x_f, dt_f, A_f, B_f, C_f, D_f, dt_bias_f, x_b, dt_b, A_b, B_b, C_b, D_b,
                                    dt_bias_b, z)


def bimamba_conv(x: Tensor, w_f: Tensor, b_f: Tensor, w_b: Tensor, b_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both directions' depthwise conv + SiLU in the (B, L, E) layout (see `visionmamba.ops.fast.bimamba_conv`):
    (causal conv of x, anti-causal conv with the reversed kernel). Triton on CUDA tensors, F.conv1d on CPU."""
    from . import fast

    return fast.bimamba_conv(x, w_f, b_f, w_b, b_b)


def dt_proj(a_f: Tensor, w_f: Tensor, a_b: Tensor, w_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both directions' dt = F.linear(dt_low, W) without autograd (see `visionmamba.ops.fast.dt_proj`): one Triton
    launch on CUDA tensors, F.linear on CPU."""
    from . import fast

    return fast.dt_proj(a_f, w_f, a_b, w_b)


def bimamba_inner(xz: Tensor, conv_w_f: Tensor, conv_b_f: Tensor, conv_w_b: Tensor, conv_b_b: Tensor,
                  x_proj_w_f: Tensor, dt_proj_w_f: Tensor, A_f: Tensor, D_f: Tensor, dt_bias_f: Tensor,
                  x_proj_w_b: Tensor, dt_proj_w_b: Tensor, A_b: Tensor, D_b: Tensor, dt_bias_b: Tensor) -> Tensor:
    """The bidirectional mixer from in_proj's output xz (B, L, 2E) to out_proj's input y (B, L, E) as one autograd
    node: `bimamba_conv`, both directions' x_proj / dt_proj and `bimamba_scan`, with a hand-written backward (see
    `visionmamba.ops.fast.bimamba_inner`). Triton on CUDA tensors, the PyTorch references on CPU."""
    from . import fast

    return fast.bimamba_inner(xz, conv_w_f, conv_b_f, conv_w_b, conv_b_b, x_proj_w_f, dt_proj_w_f, A_f, D_f,
                              dt_bias_f, x_proj_w_b, dt_proj_w_b, A_b, D_b, dt_bias_b)


def _mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D, delta_bias):
    seqlen = xz.shape[-1]
    dt_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)  # (b, e, l) each
    x = causal_conv1d_ref(x, conv1d_weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(rearrange(x, "b e l -> (b l) e"), x_proj_weight)  # (b*l, R + 2N)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    delta = rearrange(F.linear(dt, delta_proj_weight), "(b l) e -> b e l", l=seqlen)
    B = rearrange(B, "(b l) n -> b n l", l=seqlen)
    C = rearrange(C, "(b l) n -> b n l", l=seqlen)
    return selective_scan_ref(x, delta, A, B, C, D, z, delta_bias, True)
