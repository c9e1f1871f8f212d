"""Vim / mamba-ssm ``Block``: Add -> Norm -> Mixer, returning (hidden_states, residual).

The add is fused into the *next* block (that is why the block returns the residual): block i computes
residual = residual + DropPath_i(hidden_states_{i-1}); hidden = Norm(residual); hidden = Mixer(hidden).
The residual stream is kept in fp32 (``residual_in_fp32``) so bf16 training does not erode it over 24-48 layers.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from .mixer import BiMambaMixer
from .norm import create_norm


class Block(nn.Module):
    def __init__(self, dim: int, mixer: BiMambaMixer, norm: str = "rms", norm_eps: float = 1e-5,
                 drop_path: float = 0.0, residual_in_fp32: bool = True):
        super().__init__()
        self.mixer = mixer
        self.norm = create_norm(norm, dim, norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden_states: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Without autograd (inference) the add is in place: ``residual`` is overwritten and returned, so the stream
        needs no second (B, L, D) buffer while the mixer runs (the caller still holds the previous one)."""
        if residual is None:
            residual = hidden_states
        elif not torch.is_grad_enabled() and residual.dtype == torch.promote_types(residual.dtype,
                                                                                  hidden_states.dtype):
            residual = residual.add_(self.drop_path(hidden_states))
        else:
            residual = residual + self.drop_path(hidden_states)
        if self.residual_in_fp32:
            residual = residual.float()
        hidden_states = self.norm(residual.to(self.norm.weight.dtype))
        device_type = hidden_states.device.type
        if torch.is_autocast_enabled(device_type):
            # the mixer's first matmul casts its input anyway; casting here frees the fp32 norm output (a (B, L, D)
            # fp32 buffer) before the mixer runs instead of after
            hidden_states = hidden_states.to(torch.get_autocast_dtype(device_type))
        return self.mixer(hidden_states), residual
