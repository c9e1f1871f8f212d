"""Vim / mamba-ssm ``Block``: Add -> Norm -> Mixer, returning (hidden_states, residual).

The add is fused into the *next* block (that is why the block returns the residual): block i computes
residual = residual + DropPath_i(hidden_states_{i-1}); hidden = Norm(residual); hidden = Mixer(hidden).
The residual stream is kept in fp32 (``residual_in_fp32``) so bf16 training does not erode it over 24-48 layers.
"""
from __future__ import annotations

from typing import Optional

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
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        if self.residual_in_fp32:
            residual = residual.float()
        hidden_states = self.norm(residual.to(self.norm.weight.dtype))
        return self.mixer(hidden_states), residual
