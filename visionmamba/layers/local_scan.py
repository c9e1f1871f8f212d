"""LocalMamba scan directions (hunto/LocalMamba ``classification/lib/models/mamba/{multi_mamba,local_scan}.py``).

A direction turns a (B, C, H, W) map into one (B, C, L') sequence:

* ``h`` row-major, ``v`` column-major (global scans);
* ``wK`` windowed ("local") scan: the map is zero-padded to multiples of K, cut into KxK windows taken in
  row-major order, each window read row-major, so L' = ceil(H/K)*K * ceil(W/K)*K >= H*W. The padded zeros are
  scanned like tokens (they still advance the recurrence), as in the official code;
* a ``_flip`` suffix reverses the sequence.

`reverse_direction` maps a scan output back onto the H x W grid (row-major, padding dropped). `BiAttn` is the
channel attention applied to every direction's output before the directions are summed.
The official 'v' reverse uses ``'b d (h w) -> b d (w h)'``, which is only right for square grids; here the
inverse permutation is used, identical on square grids and correct on rectangular ones.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ALL_DIRECTIONS", "BiAttn", "MultiScan", "merge_directions", "parse_direction", "reverse_direction",
           "scan_direction", "scan_directions", "scan_length", "validate_directions"]

# The search space of the paper (MultiScan.ALL_CHOICES); any window size K >= 1 is accepted as "wK".
ALL_DIRECTIONS = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")
_DIRECTION = re.compile(r"^(h|v|w(\d+))(_flip)?$")


def parse_direction(direction: str) -> tuple[str, int, bool]:
    """``"w7_flip"`` -> ("w", 7, True); ``"h"`` -> ("h", 0, False)."""
    m = _DIRECTION.match(direction)
    if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"unknown scan direction {direction!r}; use h, v or wK (K >= 1), optionally with '_flip', "
                         f"e.g. {', '.join(ALL_DIRECTIONS)}")
    kind = "w" if m.group(2) else m.group(1)
    return kind, int(m.group(2) or 0), m.group(3) is not None


def validate_directions(directions: Sequence[Sequence[str]], depth: int) -> tuple[tuple[str, ...], ...]:
    """Per-layer direction lists: one list per layer, every list the same length (the mixers' K)."""
    directions = tuple(tuple(d) for d in directions)
    if len(directions) != depth:
        raise ValueError(f"need one direction list per layer: got {len(directions)} lists for {depth} layers")
    sizes = {len(d) for d in directions}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every layer must use the same (non-zero) number of directions, got sizes {sorted(sizes)}")
    for layer in directions:
        for d in layer:
            parse_direction(d)
    return directions


def scan_direction(x: Tensor, direction: str) -> Tensor:
    """(B, C, H, W) -> (B, C, L') in the order of ``direction``."""
    kind, window, flip = parse_direction(direction)
    batch, channels, height, width = x.shape
    if kind == "h":
        seq = x.flatten(2)
    elif kind == "v":
        seq = x.transpose(2, 3).flatten(2)  # (B, C, W*H), column-major
    else:
        hg, wg = math.ceil(height / window), math.ceil(width / window)
        x = F.pad(x, (0, wg * window - width, 0, hg * window - height))
        # (B, C, hg, K, wg, K) -> (B, C, hg, wg, K, K): windows row-major, then pixels row-major inside a window
        seq = x.reshape(batch, channels, hg, window, wg, window).permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, -1)
    return seq.flip(-1) if flip else seq


def reverse_direction(y: Tensor, direction: str, height: int, width: int) -> Tensor:
    """(B, C, L') scanned in ``direction`` -> (B, C, H*W) row-major (window padding dropped)."""
    kind, window, flip = parse_direction(direction)
    batch, channels, _ = y.shape
    if flip:
        y = y.flip(-1)
    if kind == "h":
        return y
    if kind == "v":
        return y.reshape(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, -1)
    hg, wg = math.ceil(height / window), math.ceil(width / window)
    # (B, C, hg, wg, K, K) -> (B, C, hg, K, wg, K) = the padded grid, then crop
    y = y.reshape(batch, channels, hg, wg, window, window).permute(0, 1, 2, 4, 3, 5)
    y = y.reshape(batch, channels, hg * window, wg * window)[:, :, :height, :width]
    return y.reshape(batch, channels, -1)


class BiAttn(nn.Module):
    """LocalMamba's channel attention (official name/params): x * sigmoid(W2 GELU(W1 mean_L(LN(x)))).

    (B, L, C) -> (B, L, C).
    """

    def __init__(self, in_channels: int, act_ratio: float = 0.125):
        super().__init__()
        reduce_channels = int(in_channels * act_ratio)
        self.norm = nn.LayerNorm(in_channels)
        self.global_reduce = nn.Linear(in_channels, reduce_channels)
        self.act_fn = nn.GELU()
        self.channel_select = nn.Linear(reduce_channels, in_channels)
        self.gate_fn = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_global = self.norm(x).mean(1, keepdim=True)  # (B, 1, C)
        attn = self.gate_fn(self.channel_select(self.act_fn(self.global_reduce(x_global))))  # (B, 1, C)
        return x * attn


def scan_length(direction: str, height: int, width: int) -> int:
    """Length of the sequence `scan_direction` produces for an H x W map (windowed scans include padding)."""
    kind, window, _ = parse_direction(direction)
    if kind == "w":
        return math.ceil(height / window) * window * math.ceil(width / window) * window
    return height * width


def scan_directions(x: Tensor, directions: Sequence[str]) -> Tensor:
    """All directions of one layer, right-padded with zeros to a common length so they can be stacked into one
    scan call (the padding comes after every real token, so a causal scan's outputs are unchanged; the official
    LocalVMamba pads the same way).

    (B, C, H, W) -> (B, K, C, L_max).
    """
    seqs = [scan_direction(x, d) for d in directions]
    longest = max(s.shape[-1] for s in seqs)
    seqs = [F.pad(s, (0, longest - s.shape[-1])) if s.shape[-1] < longest else s for s in seqs]
    return torch.stack(seqs, dim=1)


def merge_directions(ys: Tensor, directions: Sequence[str], height: int, width: int,
                     attn: nn.Module) -> Tensor:
    """Inverse of `scan_directions` with LocalMamba's merge: every direction back on the grid, channel attention
    on each, then the sum. (B, K, C, L_max) -> (B, H*W, C)."""
    out = None
    for k, direction in enumerate(directions):
        y = ys[:, k, :, : scan_length(direction, height, width)]  # drop the stacking padding
        y = attn(reverse_direction(y, direction, height, width).transpose(1, 2))  # (B, H*W, C)
        out = y if out is None else out + y
    return out


class MultiScan(nn.Module):
    """One layer's scan directions (official ``MultiScan`` / ``MultiScanVSSM``, fixed-choice mode). LocalVMamba
    keeps its channel attention here (``multi_scan.attn``); LocalVim keeps it on the mixer, so ``attn_dim`` is
    optional."""

    def __init__(self, directions: Sequence[str], attn_dim: int | None = None):
        super().__init__()
        self.directions = tuple(directions)
        for d in self.directions:
            parse_direction(d)
        self.attn = BiAttn(attn_dim) if attn_dim else None

    def scan(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, C, L_max)."""
        return scan_directions(x, self.directions)

    def merge(self, ys: Tensor, height: int, width: int, attn: nn.Module | None = None) -> Tensor:
        """(B, K, C, L_max) -> (B, H*W, C), using ``attn`` or this module's own attention."""
        return merge_directions(ys, self.directions, height, width, attn if attn is not None else self.attn)

    def extra_repr(self) -> str:
        return ", ".join(self.directions)
