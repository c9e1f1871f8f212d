"""2-D rotary position embedding of LocalVim (EVA-02 ``VisionRotaryEmbeddingFast``, as vendored by
hunto/LocalMamba ``classification/lib/models/mamba/rope.py``).

The first half of the channels rotates with the token's row, the second half with its column; channel pairs
(2i, 2i+1) share one frequency 1 / 10000^(2i / dim). Buffers keep the official names ``freqs_cos`` /
``freqs_sin`` (persistent, so official checkpoints load them and they follow the model across devices).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .pos_embed import resize_grid_embed

__all__ = ["VisionRotaryEmbedding2D", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """Channel pairs (a, b) -> (-b, a)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # (..., D/2, 2)
    a, b = pairs.unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


class VisionRotaryEmbedding2D(nn.Module):
    """Rotary embedding over a ``grid`` x ``grid`` token map, applied to (B, grid*grid, 2*dim) tensors.

    Args:
        dim: half of the embedding width (one half per axis).  pt_seq_len: the grid size the frequencies are
            defined for (positions are rescaled to it, as in EVA-02).  ft_seq_len: the grid built here.
        theta: frequency base.
    """

    def __init__(self, dim: int, pt_seq_len: int = 16, ft_seq_len: int | None = None, theta: float = 10000.0):
        super().__init__()
        ft_seq_len = ft_seq_len or pt_seq_len
        self.grid = (ft_seq_len, ft_seq_len)
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device="cpu")[: dim // 2].float() / dim))  # (dim/2,)
        t = torch.arange(ft_seq_len, device="cpu") / ft_seq_len * pt_seq_len
        freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (S, dim): each freq twice
        # rows use the first half of the channels, columns the second: (S, S, 2*dim) flattened row-major
        freqs = torch.cat([freqs[:, None, :].expand(-1, ft_seq_len, -1),
                           freqs[None, :, :].expand(ft_seq_len, -1, -1)], dim=-1).reshape(-1, 2 * dim)
        self.register_buffer("freqs_cos", freqs.cos())
        self.register_buffer("freqs_sin", freqs.sin())

    def forward(self, t: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """t: (B, H*W, 2*dim) tokens of an H x W grid (bicubic-resized frequencies when it differs from the
        built grid, as the official model does for other resolutions)."""
        cos, sin = self.freqs_cos, self.freqs_sin
        if grid is not None and tuple(grid) != self.grid:
            cos = resize_grid_embed(cos[None], self.grid, grid)[0]
            sin = resize_grid_embed(sin[None], self.grid, grid)[0]
        return t * cos.to(t.dtype) + rotate_half(t) * sin.to(t.dtype)
