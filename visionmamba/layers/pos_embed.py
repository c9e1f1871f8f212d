"""Position-embedding resizing and register layout (Mamba-Reg ``get_cls_idx``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_grid_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resize of patch position embeddings. pos: (1, h*w, D) -> (1, H*W, D)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)


def register_layout(num_patches: int, num_registers: int) -> tuple[Tensor, Tensor]:
    """Where registers sit in the sequence (official ``utils.get_cls_idx``).

    With Lseg = N // (n + 1) the sequence is [p_0..p_{Lseg-1}, r_0, p_Lseg.., r_1, ..., r_{n-1}, remaining patches].

    Returns:
        token_idx: (N + n,) gather index into ``cat([patches, registers], 1)`` that yields the sequence.
        register_positions: (n,) sequence positions of the registers (arange(Lseg, Lseg*(n+1)+n, Lseg+1)).
    """
    seg = num_patches // (num_registers + 1)
    if seg < 1:
        raise ValueError(f"{num_registers} registers need at least {num_registers + 1} patches, got {num_patches}")
    order = []
    for r in range(num_registers):
        order.extend(range(r * seg, (r + 1) * seg))
        order.append(num_patches + r)
    order.extend(range(num_registers * seg, num_patches))
    positions = torch.arange(seg, seg * (num_registers + 1) + num_registers, seg + 1)
    return torch.tensor(order, dtype=torch.long), positions
