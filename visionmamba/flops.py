"""Model complexity with fvcore, with analytic handles for the selective scan.

Convention (stated once, used everywhere, printed in the README): **GMACs** — fvcore counts one fused
multiply-add as one "flop", so every number here is a multiply-accumulate count. Linear layers, convolutions
(including the depthwise causal conv1d) and the patch embedding are counted by fvcore's own handles. The
selective scan is counted analytically, not as the hundreds of small ops of the reference implementation:
albertgu's 9·B·L·E·N FLOPs per scan (state-spaces/mamba#110, also used by VMamba) = 4.5·B·L·E·N MACs, plus
B·E·L for the D skip and B·E·L for the SiLU(z) gate when present. Element-wise ops (norms, activations,
softplus, flips, the shuffle's permutation) are not counted, as in fvcore. One image, eval mode.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Element-wise / data-movement ops deliberately left out of the count (see module docstring).
_IGNORED_OPS = (
    "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::div", "aten::div_",
    "aten::exp", "aten::neg", "aten::silu", "aten::silu_", "aten::gelu", "aten::sigmoid", "aten::softplus",
    "aten::flip", "aten::pow", "aten::mean", "aten::rms_norm", "aten::rsqrt", "aten::sqrt", "aten::cat", "aten::index_select",
    "aten::softmax", "aten::log", "aten::clamp", "aten::clamp_min", "aten::expm1", "aten::sum", "aten::cumsum",
    "aten::permute", "aten::repeat", "aten::roll", "aten::pad", "aten::constant_pad_nd", "aten::stack",
    "aten::unbind", "aten::abs", "aten::max_pool2d", "aten::avg_pool2d", "aten::adaptive_avg_pool1d",
    "aten::linalg_vector_norm", "aten::square", "aten::reciprocal", "aten::masked_fill", "aten::where",
    "aten::fill_", "aten::zeros_like", "aten::ones_like", "aten::scatter", "aten::gather", "aten::new_zeros",
    "aten::tanh", "aten::erf", "aten::hardswish", "aten::relu", "aten::relu_", "aten::dropout",
)
# Autograd Functions whose first input is u (B, E, L) and third is A (E, N): our ref scan and mamba-ssm's.
_SCAN_OPS = ("SelectiveScanRef", "SelectiveScanFn", "SelectiveScanCuda")
# Fused per-direction Functions (conv + x_proj + dt_proj + scan): xz (B, 2E, L), conv w, conv b, x_proj w, dt w, A.
_INNER_OPS = ("MambaInnerNoOutProjFn",)


def _shape(value) -> list[int] | None:
    t = value.type()
    if not isinstance(t, torch._C.TensorType):
        return None
    return t.sizes()


def selective_scan_macs(batch: int, length: int, channels: int, d_state: int, with_d: bool = True,
                        with_z: bool = True) -> int:
    """MACs of one selective scan: 4.5·B·L·E·N (= 9BLEN FLOPs / 2) + B·E·L for D and for the gate."""
    macs = 9 * batch * length * channels * d_state // 2
    return macs + batch * channels * length * (int(with_d) + int(with_z))


def _scan_handle(inputs, outputs) -> Counter:
    batch, channels, length = _shape(inputs[0])
    d_state = _shape(inputs[2])[-1]
    with_d = len(inputs) > 5 and _shape(inputs[5]) is not None
    with_z = len(inputs) > 6 and _shape(inputs[6]) is not None
    return Counter({"selective_scan": selective_scan_macs(batch, length, channels, d_state, with_d, with_z)})


def _inner_handle(inputs, outputs) -> Counter:
    batch, two_e, length = _shape(inputs[0])
    channels = two_e // 2
    width = _shape(inputs[1])[-1]
    r2n, _ = _shape(inputs[3])
    _, rank = _shape(inputs[4])
    d_state = _shape(inputs[5])[-1]
    tokens = batch * length
    return Counter({
        "conv1d": tokens * channels * width,
        "linear": tokens * channels * r2n + tokens * rank * channels,
        "selective_scan": selective_scan_macs(batch, length, channels, d_state),
    })


def _handles() -> dict[str, Any]:
    handles: dict[str, Any] = {op: None for op in _IGNORED_OPS}
    handles.update({f"prim::PythonOp.{name}": _scan_handle for name in _SCAN_OPS})
    handles.update({f"prim::PythonOp.{name}": _inner_handle for name in _INNER_OPS})
    return handles


def model_complexity(model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Parameters and GMACs of one image, counted by fvcore on a copy of the model (eval mode).

    Returns ``{"params": int, "gmacs": float, "by_operator": {op: gmacs}, "unsupported": {op: count}}``.
    """
    from fvcore.nn import FlopCountAnalysis  # imported lazily: only needed when complexity is asked for

    params = sum(p.numel() for p in model.parameters())
    probe = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.zeros(1, in_chans, h, w, device=device)
    analysis = FlopCountAnalysis(probe, x).set_op_handle(**_handles())
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with torch.no_grad():
        total = analysis.total()
    unsupported = dict(analysis.unsupported_ops())
    if unsupported:
        log.warning("fvcore could not count these ops (counted as 0): %s", unsupported)
    return {
        "params": params,
        "gmacs": total / 1e9,
        "by_operator": {k: v / 1e9 for k, v in analysis.by_operator().items()},
        "unsupported": unsupported,
    }
