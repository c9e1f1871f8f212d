"""Patch embedding: one Conv2d, key ``patch_embed.proj`` as in the official code."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def grid_size(img_size: int, patch_size: int, stride: int) -> int:
    """Tokens per side: (img - patch) // stride + 1 (14 for 224/16/16, 27 for stride 8)."""
    return (img_size - patch_size) // stride + 1


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, stride: int = 16, in_chans: int = 3,
                 embed_dim: int = 192):
        super().__init__()
        self.img_size, self.patch_size, self.stride = img_size, patch_size, stride
        self.check_img_size(img_size)
        self.grid = grid_size(img_size, patch_size, stride)
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def check_img_size(self, img_size: int) -> None:
        """ValueError for images that do not hold one whole patch (the conv would fail at the first forward)."""
        if img_size < self.patch_size:
            raise ValueError(f"img_size={img_size} is smaller than one patch ({self.patch_size} px): "
                             f"this model needs images of at least {self.patch_size} px")

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, h*w, D) and the token grid (h, w)."""
        if self.stride == self.patch_size:
            # non-overlapping patches: the conv is one matrix product of (C, p, p) patch vectors with the flattened
            # kernel. Same maths and MACs; on GPUs it skips cuDNN's two NCHW -> NHWC layout kernels and its
            # channels-first conv (together ~1.5 % of a shufflemamba_tiny training step)
            B, C, H, W = x.shape
            self.check_img_size(min(H, W))
            p = self.patch_size
            h, w = grid_size(H, p, p), grid_size(W, p, p)  # as the conv: pixels that fill no patch are dropped
            patches = x[:, :, :h * p, :w * p].reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
            tokens = F.linear(patches.reshape(B, h * w, C * p * p), self.proj.weight.reshape(self.proj.out_channels, -1),
                              self.proj.bias)
            return tokens, (h, w)
        x = self.proj(x)  # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid
