"""Plain (non-hierarchical) Vision Mamba: Vim, ShuffleMamba and (ShuffleMamba-)Mamba-Reg in one class.

The three official code bases differ only in where the class token sits, whether registers are used, the
norm type and the initialisation; one class with plain arguments covers all of them with official parameter
names and shapes (so official checkpoints load without renaming):

| family                          | ``cls_position`` | ``num_registers`` | ``init_style``  | source file              |
|---------------------------------|------------------|-------------------|-----------------|--------------------------|
| Vim (hustvl/Vim)                | ``middle``       | 0                 | ``vim``         | vim/models_mamba.py      |
| ShuffleMamba T/S/M/B/L          | ``head``         | 0                 | ``shufflemamba``| models_shuffle.py        |
| ShuffleMamba-Reg / Mamba-Reg    | ``none``         | 12 (L: 16)        | ``vim``         | models_reg.py            |

The stochastic layer-wise shuffle is a plug-in (`visionmamba.layers.LayerwiseShuffle`) called by the layer
loop; ``shuffle_rate=0`` turns it off (Vim, Mamba-Reg).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import BiMambaMixer, Block, LayerwiseShuffle, PatchEmbed, create_norm, register_layout, resize_grid_embed
from ..layers.patch_embed import grid_size
from ._registry import register_model

__all__ = ["VisionMamba"]

CLS_POSITIONS = ("middle", "head", "none")
INIT_STYLES = ("vim", "shufflemamba")


def _segm_init_weights(m: nn.Module) -> None:
    """Official ``segm_init_weights``: Linear trunc_normal(0.02)/bias 0, Conv2d lecun_normal, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        lecun_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


def _mamba_init_weights(module: nn.Module, n_layer: int) -> None:
    """mamba-ssm ``_init_weights`` as used by Vim: zero every Linear bias not marked ``_no_reinit`` (this is why
    ``dt_proj_b.bias`` ends at 0) and re-draw out_proj as kaiming_uniform(a=√5) / √depth (prenorm rescale)."""
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    for name, p in module.named_parameters(recurse=True):
        if name == "out_proj.weight":
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_layer)


class VisionMamba(nn.Module):
    """Bidirectional-Mamba ViT-style backbone + linear head.

    Args:
        img_size: the size the position embeddings are built for; other sizes are accepted at run time
            (bicubic position-embedding resize, registers re-laid for the new grid).
        patch_size / stride: patch embedding conv (stride < patch gives Vim's overlapping "stride 8" models).
        embed_dim / depth: D and number of blocks.  d_state / d_conv / expand: mixer sizes (16 / 4 / 2).
        norm: ``rms`` or ``ln``.  residual_in_fp32: keep the residual stream in fp32.
        drop_path_rate: mixer j's output is dropped with probability rate * j / (depth - 1).
        cls_position: ``middle`` (Vim), ``head`` (ShuffleMamba) or ``none`` (registers or mean pooling).
        num_registers / register_reduce: Mamba-Reg registers; reduce > 1 adds the ``neck`` + ``norm_neck``.
        shuffle_rate / shuffle_schedule: stochastic layer-wise shuffle (0 = off).
        init_style: ``vim`` (Vim, Mamba-Reg) or ``shufflemamba`` (models_shuffle.py) official initialisation.
        kernel_backend: ``auto|cuda|ref`` for the selective scan and causal conv.
        use_grad_checkpointing: recompute each block in backward (saves activation memory).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, stride: Optional[int] = None, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 24, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, norm: str = "rms", norm_eps: float = 1e-5, residual_in_fp32: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, cls_position: str = "middle",
                 num_registers: int = 0, register_reduce: int = 1, shuffle_rate: float = 0.0,
                 shuffle_schedule: str = "linear", init_style: str = "vim", kernel_backend: str = "auto",
                 use_grad_checkpointing: bool = False):
        super().__init__()
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
        if init_style not in INIT_STYLES:
            raise ValueError(f"init_style must be one of {INIT_STYLES}, got {init_style!r}")
        if num_registers and cls_position != "none":
            raise ValueError("registers replace the class token: use cls_position='none' with num_registers > 0")
        if num_registers and embed_dim % register_reduce:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by register_reduce {register_reduce}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.cls_position = cls_position
        self.num_registers = num_registers
        self.register_reduce = register_reduce
        self.use_grad_checkpointing = use_grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, stride or patch_size, in_chans, embed_dim)
        self.check_img_size(img_size)
        self.grid = (self.patch_embed.grid, self.patch_embed.grid)
        num_patches = self.patch_embed.num_patches
        has_cls = cls_position != "none"

        # Own parameters first: the official state_dict lists cls_token, pos_embed (, pos_embed_cls) before modules.
        if has_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        elif num_registers:
            # Official name: in Mamba-Reg the parameter called `cls_token` holds the registers.
            self.cls_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(has_cls), embed_dim))
        if num_registers:
            self.pos_embed_cls = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        if num_registers:
            head_dim = num_registers * embed_dim // register_reduce
            self.neck = nn.Linear(embed_dim, embed_dim // register_reduce, bias=False) if register_reduce > 1 else None
        else:
            head_dim = embed_dim
        self.num_features = head_dim
        self.head = nn.Linear(head_dim, num_classes) if num_classes > 0 else nn.Identity()

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        # Block i drops the *previous* mixer's output (the add is fused into the next block): [0] + dpr.
        inter_dpr = [0.0] + dpr
        mixer = partial(BiMambaMixer, d_state=d_state, d_conv=d_conv, expand=expand, kernel_backend=kernel_backend)
        self.layers = nn.ModuleList(
            Block(embed_dim, mixer(embed_dim), norm=norm, norm_eps=norm_eps, drop_path=inter_dpr[i],
                  residual_in_fp32=residual_in_fp32)
            for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = create_norm(norm, embed_dim, norm_eps)
        if num_registers and register_reduce > 1:
            self.norm_neck = create_norm(norm, head_dim, norm_eps)
        self.shuffle = LayerwiseShuffle(depth, shuffle_rate, shuffle_schedule)

        self._init_weights(init_style)

    # ------------------------------------------------------------------ init
    def _init_weights(self, style: str) -> None:
        if style == "shufflemamba":
            # models_shuffle.py applies segm_init to the WHOLE model: every Linear (in/x/dt proj, both dt biases
            # -> 0) becomes trunc_normal(0.02); conv1d keeps PyTorch's default; cls_token stays zero.
            self.apply(_segm_init_weights)
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.patch_embed.apply(_segm_init_weights)
            self.head.apply(_segm_init_weights)
            trunc_normal_(self.pos_embed, std=0.02)
            if hasattr(self, "cls_token"):
                trunc_normal_(self.cls_token, std=0.02)
            if self.num_registers:
                trunc_normal_(self.pos_embed_cls, std=0.02)
                if self.neck is not None:
                    self.neck.apply(_segm_init_weights)
        self.apply(partial(_mamba_init_weights, n_layer=self.depth))

    def no_weight_decay(self) -> set[str]:
        return {n for n in ("pos_embed", "cls_token", "pos_embed_cls") if hasattr(self, n)}

    def check_img_size(self, img_size: int) -> None:
        """ValueError when ``img_size`` px images cannot go through the model: smaller than one patch, or too few
        patches to place the registers between (Mamba-Reg needs at least ``num_registers + 1``)."""
        embed = self.patch_embed
        embed.check_img_size(img_size)
        if self.num_registers:
            num_patches = grid_size(img_size, embed.patch_size, embed.stride) ** 2
            if num_patches < self.num_registers + 1:
                side = math.ceil(math.sqrt(self.num_registers + 1))
                smallest = embed.patch_size + (side - 1) * embed.stride
                raise ValueError(f"img_size={img_size} gives {num_patches} patch(es) of {embed.patch_size} px but "
                                 f"{self.num_registers} registers need at least {self.num_registers + 1}: "
                                 f"use img_size >= {smallest}")

    # ------------------------------------------------------------------ sequence assembly
    def _split_pos_embed(self) -> tuple[Optional[Tensor], Tensor]:
        """(cls row (1, 1, D) or None, patch rows (1, N, D)) of the stored position embedding."""
        pos = self.pos_embed
        if self.cls_position == "head":
            return pos[:, :1], pos[:, 1:]
        if self.cls_position == "middle":
            mid = self.patch_embed.num_patches // 2
            return pos[:, mid:mid + 1], torch.cat([pos[:, :mid], pos[:, mid + 1:]], dim=1)
        return None, pos

    def readout_positions(self, grid: tuple[int, int]) -> Tensor | int | None:
        """Sequence index of the cls token / registers for a token grid."""
        n = grid[0] * grid[1]
        if self.cls_position == "middle":
            return n // 2
        if self.cls_position == "head":
            return 0
        if self.num_registers:
            return register_layout(n, self.num_registers)[1]
        return None

    def assemble_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Image (B, C, H, W) -> token sequence (B, L, D) with cls/registers and position embeddings."""
        x, grid = self.patch_embed(x)  # (B, N, D)
        batch, n = x.shape[:2]
        cls_pos, patch_pos = self._split_pos_embed()
        x = x + resize_grid_embed(patch_pos, self.grid, grid)
        if self.cls_position == "middle":
            cls = (self.cls_token + cls_pos).expand(batch, -1, -1)
            mid = n // 2  # Vim inserts the class token in the middle of the patch sequence
            x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1)
        elif self.cls_position == "head":
            x = torch.cat([(self.cls_token + cls_pos).expand(batch, -1, -1), x], dim=1)
        elif self.num_registers:
            regs = (self.cls_token + self.pos_embed_cls).expand(batch, -1, -1)  # (B, n_reg, D)
            token_idx = register_layout(n, self.num_registers)[0].to(x.device)
            x = torch.cat([x, regs], dim=1).index_select(1, token_idx)  # interleave registers
        return self.pos_drop(x), grid

    # ------------------------------------------------------------------ forward
    def _run_layer(self, index: int, hidden: Tensor, residual: Optional[Tensor]):
        layer = self.layers[index]
        if self.use_grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, hidden, residual, use_reentrant=False)
        return layer(hidden, residual)

    def forward_features(self, x: Tensor) -> Tensor:
        """Returns the pooled features fed to the head: (B, num_features)."""
        hidden, grid = self.assemble_tokens(x)
        residual = None
        plan = self.shuffle.plan(hidden)  # every layer's permutation at once (traced training forward only)
        for i in range(self.depth):
            hidden, residual = self.shuffle(i, partial(self._run_layer, i), hidden, residual, plan)
        residual = residual + self.drop_path(hidden)
        hidden = self.norm_f(residual.to(self.norm_f.weight.dtype))  # (B, L, D)
        batch = hidden.shape[0]
        if self.cls_position != "none":
            return hidden[:, self.readout_positions(grid)]
        if self.num_registers:
            h = hidden.index_select(1, self.readout_positions(grid).to(hidden.device))  # (B, n_reg, D)
            if self.neck is not None:
                return self.norm_neck(self.neck(h).reshape(batch, -1))  # (B, n_reg * D / reduce)
            return h.reshape(batch, -1)
        return hidden.mean(dim=1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_grad_checkpointing = enable


# ---------------------------------------------------------------------- registry
def _vim(**kwargs) -> VisionMamba:
    return VisionMamba(**kwargs)


_VIM = dict(cls_position="middle", init_style="vim")
_SHUFFLE = dict(cls_position="head", init_style="shufflemamba", shuffle_rate=0.1)  # --ssr default 0.1
_REG = dict(cls_position="none", init_style="vim", shuffle_rate=0.1)


def _make(defaults: dict, **model_args):
    def build(**overrides) -> VisionMamba:
        return _vim(**{**defaults, **model_args, **overrides})

    return build


def _register(name: str, defaults: dict, doc: str, **model_args) -> None:
    fn = _make(defaults, **model_args)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    register_model(fn)


# Vim (hustvl/Vim): middle class token, 24 layers. Parameter counts match the official models exactly.
_register("vim_tiny", _VIM, "Vim-T, 7,148,008 params.", embed_dim=192, depth=24)
_register("vim_small", _VIM, "Vim-S, 25,796,584 params.", embed_dim=384, depth=24)
_register("vim_base", _VIM, "Vim-B, 97,598,440 params.", embed_dim=768, depth=24)
_register("vim_tiny_stride8", _VIM, "Vim-T+ (stride 8, 730 tokens), 7,250,344 params.", embed_dim=192, depth=24,
          stride=8)
_register("vim_small_stride8", _VIM, "Vim-S+ (stride 8), 26,001,256 params.", embed_dim=384, depth=24, stride=8)

# ShuffleMamba (models_shuffle.py): head class token, no registers, whole-model segm init.
_register("shufflemamba_tiny", _SHUFFLE, "ShuffleMamba-T, 7,148,008 params.", embed_dim=192, depth=24)
_register("shufflemamba_small", _SHUFFLE, "ShuffleMamba-S, 25,796,584 params.", embed_dim=384, depth=24)
_register("shufflemamba_middle", _SHUFFLE, "ShuffleMamba-M (LayerNorm, as the official file), 74,236,456 params.",
          embed_dim=576, depth=32, norm="ln")
_register("shufflemamba_base", _SHUFFLE, "ShuffleMamba-B, 97,598,440 params.", embed_dim=768, depth=24)
_register("shufflemamba_large", _SHUFFLE, "ShuffleMamba-L (48 layers), 340,034,536 params.", embed_dim=1024, depth=48)
_register("shufflemamba_large_40", _SHUFFLE, "ShuffleMamba-L (40 layers), 283,698,152 params.", embed_dim=1024,
          depth=40)

# ShuffleMamba-Reg (models_reg.py) and Mamba-Reg (the same architecture, shuffle off).
for _prefix, _defaults in (("shufflemamba_reg", _REG), ("mambareg", {**_REG, "shuffle_rate": 0.0})):
    _register(f"{_prefix}_tiny", _defaults, "Reg-T, 9,264,232 params.", embed_dim=192, depth=24, num_registers=12,
              register_reduce=1)
    _register(f"{_prefix}_small", _defaults, "Reg-S, 27,801,064 params.", embed_dim=384, depth=24,
              num_registers=12, register_reduce=2)
    _register(f"{_prefix}_base", _defaults, "Reg-B, 99,301,096 params.", embed_dim=768, depth=24,
              num_registers=12, register_reduce=4)
    _register(f"{_prefix}_large", _defaults, "Reg-L, 341,222,376 params.", embed_dim=1024, depth=48,
              num_registers=16, register_reduce=8)

# Tiny models for CI and quick starts (32 px, patch 8 -> 16 patches; they train on CPU in seconds).
_TEST = dict(img_size=32, patch_size=8, embed_dim=64, depth=4)
_register("vim_test", _VIM, "Tiny Vim (middle cls) for tests.", **_TEST)
_register("shufflemamba_test", {**_SHUFFLE, "shuffle_rate": 0.5}, "Tiny ShuffleMamba for tests.", **_TEST)
_register("shufflemamba_reg_test", _REG, "Tiny ShuffleMamba-Reg (4 registers, reduce 2) for tests.",
          num_registers=4, register_reduce=2, **_TEST)
