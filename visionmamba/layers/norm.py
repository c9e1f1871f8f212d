"""Norm layers with the official parameter names (RMSNorm has ``weight`` only, eps 1e-5)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as mamba-ssm's Triton kernel does); returns the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32; F.rms_norm is one fused kernel on GPU (several ops otherwise)
        return nn.functional.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm (weight + bias) evaluated in fp32 so a fp32 residual stream is normalised at full precision."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                        None if self.bias is None else self.bias.float(), self.eps).to(x.dtype)


def create_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``rms`` → RMSNorm (Vim, ShuffleMamba T/S/B/L, Reg); ``ln`` → LayerNorm with bias (ShuffleMamba-M)."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "ln":
        return LayerNormFp32(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose 'rms' or 'ln'")
