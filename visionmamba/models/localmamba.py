"""LocalMamba (hunto/LocalMamba, arXiv 2403.09338): windowed local scans + global scans, per-layer directions.

Two families, both with 4 scan directions per layer (``h``/``v`` global, ``wK`` KxK-window local, ``_flip``
reversed; `visionmamba.layers.local_scan`) whose outputs are mapped back to the grid, re-weighted by a channel
attention (``BiAttn``) and summed:

* **LocalVim** (``classification/lib/models/local_vim.py``): a plain Vim-style sequence model (20 layers,
  RMSNorm, residual in fp32, absolute position embedding, 2-D RoPE re-applied before every layer to the
  hidden states and the residual, mean pooling, no class token). Its mixer (official ``MultiMamba``) has a
  causal conv1d / x_proj / dt_proj / A / D per direction. Here the 4 directions are stacked along the
  channel axis and run as ONE causal-conv1d and ONE selective-scan call (grouped B/C), same maths as the
  official 4 separate ``mamba_inner_fn_no_out_proj`` calls. The layer-wise shuffle (ShuffleMamba) is
  supported, as for every plain-sequence backbone.
* **LocalVMamba** (``classification/lib/models/local_vmamba.py``): the VMamba-v0 hierarchy
  (`visionmamba.models.vmamba.VSSM`: conv-4 stem, patch merging, no MLP, channels-last LayerNorm) with a
  windowed SS2D (`LocalSS2D`). The layer-wise shuffle is refused (2-D model).

The default directions are the searched ones published in the official files (`DIRECTION_PRESETS`); any
per-layer list (or a preset name) can be passed as ``directions``. Parameter and buffer names follow the
official code, so official checkpoints load with ``load_state_dict``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..layers import Block, LayerwiseShuffle, PatchEmbed, create_norm, resize_grid_embed
from ..layers.local_scan import BiAttn, MultiScan, validate_directions
from ..layers.rope import VisionRotaryEmbedding2D
from ..layers.ss2d import SS2D, directional_selective_scan
from ._registry import register_model
from .vim import _mamba_init_weights
from .vmamba import VSSM

__all__ = ["DIRECTION_PRESETS", "LocalMambaMixer", "LocalSS2D", "LocalVisionMamba", "resolve_directions"]

# ---------------------------------------------------------------------- published scan directions
_LOCAL_VIM_SEARCHED = (
    ("h", "v_flip", "w7", "w7_flip"), ("h_flip", "w2_flip", "w7", "w7_flip"), ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "v", "v_flip"), ("h", "h_flip", "v", "v_flip"), ("h", "h_flip", "v", "v_flip"),
    ("h_flip", "v", "v_flip", "w7"), ("h_flip", "v", "v_flip", "w2_flip"), ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"), ("h", "v", "v_flip", "w2"), ("h", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v_flip", "w7"), ("h_flip", "v", "v_flip", "w2"), ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "w2", "w2_flip"), ("v", "v_flip", "w2", "w7"), ("h", "h_flip", "v", "w2"),
    ("h", "h_flip", "w2_flip", "w7"), ("v", "v_flip", "w2", "w2_flip"),
)
_LOCAL_VMAMBA_TINY_SEARCHED = (
    ("h", "h_flip", "w7", "w7_flip"), ("h_flip", "v_flip", "w2", "w2_flip"), ("h_flip", "v_flip", "w2_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2"), ("h", "h_flip", "v_flip", "w2_flip"), ("h_flip", "v_flip", "w2", "w2_flip"),
    ("h", "w2_flip", "w7", "w7_flip"), ("h", "h_flip", "v", "v_flip"), ("h", "v_flip", "w7", "w7_flip"),
    ("h_flip", "v", "w2", "w7_flip"), ("v", "v_flip", "w2", "w7_flip"), ("h", "h_flip", "v_flip", "w2_flip"),
    ("v_flip", "w2_flip", "w7", "w7_flip"), ("h_flip", "v_flip", "w2_flip", "w7_flip"),
    ("h_flip", "v", "w7", "w7_flip"),
)
_LOCAL_VMAMBA_SMALL_SEARCHED = (
    ("h", "v", "v_flip", "w7_flip"), ("h", "h_flip", "v", "w7"), ("h_flip", "v", "v_flip", "w7"),
    ("h_flip", "v", "w2_flip", "w7"), ("h_flip", "v", "w2_flip", "w7"), ("h_flip", "v_flip", "w2", "w7_flip"),
    ("h_flip", "v", "v_flip", "w7"), ("h", "v", "v_flip", "w7"), ("h", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7_flip"), ("h", "h_flip", "v", "v_flip"), ("h", "v", "v_flip", "w2"),
    ("v", "v_flip", "w2_flip", "w7"), ("h", "h_flip", "v", "w2"), ("h_flip", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"), ("h", "v", "v_flip", "w7_flip"), ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v_flip", "w7"), ("h_flip", "v_flip", "w2_flip", "w7"), ("h_flip", "v", "v_flip", "w7_flip"),
    ("v", "v_flip", "w7", "w7_flip"), ("h", "v", "v_flip", "w7_flip"), ("h_flip", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"), ("h", "h_flip", "v", "w7"), ("h", "h_flip", "w7", "w7_flip"),
    ("h", "v_flip", "w2", "w2_flip"), ("h", "v_flip", "w2", "w7"), ("h", "v", "v_flip", "w7_flip"),
    ("h_flip", "v", "w2_flip", "w7"), ("h_flip", "v_flip", "w7", "w7_flip"), ("h", "v", "w7", "w7_flip"),
)

DIRECTION_PRESETS: dict[str, tuple[tuple[str, ...], ...]] = {
    # local_vim.py: searched for LocalVim-T (local_vim_tiny, local_vim_tiny_middle_cls_token and the first
    # local_vim_small definition)
    "local_vim_searched": _LOCAL_VIM_SEARCHED,
    # local_vim.py: local_vim_tiny_wo_search, and the SECOND local_vim_small definition of the official file,
    # which is the one timm's registry keeps (the later @register_model overwrites the earlier)
    "local_vim_wo_search": (("h", "h_flip", "w2", "w2_flip"),) * 20,
    "local_vmamba_tiny_searched": _LOCAL_VMAMBA_TINY_SEARCHED,  # local_vmamba.py: local_vssm_tiny
    "local_vmamba_small_searched": _LOCAL_VMAMBA_SMALL_SEARCHED,  # local_vmamba.py: local_vssm_small
}


def resolve_directions(directions: str | Sequence[Sequence[str]], depth: int) -> tuple[tuple[str, ...], ...]:
    """A preset name (`DIRECTION_PRESETS`) or explicit per-layer lists -> validated per-layer tuples."""
    if isinstance(directions, str):
        if directions not in DIRECTION_PRESETS:
            raise ValueError(f"unknown direction preset {directions!r}; choose one of {', '.join(DIRECTION_PRESETS)} "
                             "or pass one list of directions per layer")
        directions = DIRECTION_PRESETS[directions]
    return validate_directions(directions, depth)


# ---------------------------------------------------------------------- LocalVim mixer
class LocalMambaMixer(nn.Module):
    """LocalVim token mixer (official ``MultiMamba``), (B, H*W, D) -> (B, H*W, D).

    in_proj gives x and the gate z for every token; each direction scans (x, z) in its own order with its own
    causal conv1d (``conv1d_i``), x_proj (``x_proj_i``), dt_proj (``dt_proj_i``), A (``A_log_i``) and D
    (``D_i``); outputs go back to the grid, through the shared ``attn`` and are summed before ``out_proj``.
    The grid is set by the model before each forward (``mixer.grid = (H, W)``, as the official model sets
    ``multi_scan.token_size``).
    """

    def __init__(self, d_model: int, directions: Sequence[str], d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 kernel_backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.kernel_backend = kernel_backend
        self.grid: tuple[int, int] = (0, 0)
        E, R, N = self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.multi_scan = MultiScan(directions)  # no parameters: LocalVim's attention lives on the mixer
        self.num_directions = len(self.multi_scan.directions)
        A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1)  # S4D-real, (E, N)
        for i in range(self.num_directions):
            # official per-direction names (A_log_i, conv1d_i, x_proj_i, dt_proj_i, D_i) for checkpoint loading
            A = nn.Parameter(A_log.clone())
            A._no_weight_decay = True
            setattr(self, f"A_log_{i}", A)
            setattr(self, f"conv1d_{i}", nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1,
                                                   bias=conv_bias))
            setattr(self, f"x_proj_{i}", nn.Linear(E, R + 2 * N, bias=False))
            dt_proj = nn.Linear(R, E, bias=True)
            std = R ** -0.5 * dt_scale
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
            dt_proj.bias._no_reinit = True
            setattr(self, f"dt_proj_{i}", dt_proj)
            D = nn.Parameter(torch.ones(E))
            D._no_weight_decay = True
            setattr(self, f"D_{i}", D)
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        self.attn = BiAttn(E)

    def _stacked(self, name: str, attr: str | None = None) -> Tensor:
        """The K per-direction parameters ``{name}_i[.attr]`` stacked on a new leading axis."""
        items = [getattr(self, f"{name}_{i}") for i in range(self.num_directions)]
        return torch.stack([getattr(m, attr) if attr else m for m in items])

    def forward(self, hidden_states: Tensor) -> Tensor:
        batch, length, _ = hidden_states.shape
        height, width = self.grid
        if height * width != length:
            raise ValueError(f"mixer grid {self.grid} does not match the {length} tokens it received")
        K, E = self.num_directions, self.d_inner
        xz = self.in_proj(hidden_states).transpose(1, 2).reshape(batch, 2 * E, height, width)  # (B, 2E, H, W)
        xzs = self.multi_scan.scan(xz)  # (B, K, 2E, L')
        seqlen = xzs.shape[-1]
        x, z = xzs.chunk(2, dim=2)  # (B, K, E, L') each
        # K causal convs as one depthwise conv over the K*E stacked channels
        conv_w = self._stacked("conv1d", "weight").reshape(K * E, self.d_conv)  # (K, E, 1, W) -> (K*E, W)
        conv_b = self._stacked("conv1d", "bias").reshape(K * E) if self.conv1d_0.bias is not None else None
        x = ops.causal_conv1d(x.reshape(batch, K * E, seqlen), conv_w, conv_b, activation="silu",
                              backend=self.kernel_backend)
        ys = directional_selective_scan(
            x.view(batch, K, E, seqlen), self._stacked("x_proj", "weight"), self._stacked("dt_proj", "weight"),
            self._stacked("dt_proj", "bias"), self._stacked("A_log").reshape(K * E, -1),
            self._stacked("D").reshape(K * E), z=z, backend=self.kernel_backend,
        )  # (B, K, E, L'), already gated by SiLU(z)
        y = self.multi_scan.merge(ys, height, width, attn=self.attn)  # (B, H*W, E)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)


# ---------------------------------------------------------------------- LocalVim
# LocalVim's ``segm_init_weights`` (applied to the whole model) is VMamba's init: Linear trunc_normal(0.02) and
# bias 0 — which also resets every dt_proj — and LayerNorm 1/0; convolutions keep PyTorch's default init.
_segm_init_weights = VSSM._init_weights


class LocalVisionMamba(nn.Module):
    """LocalVim: plain Vim-style backbone with `LocalMambaMixer` layers.

    Args:
        img_size / patch_size / in_chans: patch grid the position embedding and RoPE are built for (other
            sizes run with bicubic-resized embeddings).  num_classes: 0 gives no head.
        embed_dim / depth: D and number of layers.  d_state / d_conv / expand: mixer sizes (16 / 4 / 2).
        directions: per-layer direction lists or a `DIRECTION_PRESETS` name.
        norm: ``rms`` (official) or ``ln``.  residual_in_fp32: keep the residual stream in fp32.
        use_rope / use_rope_residual: 2-D RoPE before every layer on the hidden states / also on the residual.
        rope_pt_seq_len: grid size the RoPE frequencies are defined for (14, as the official pt_hw_seq_len).
        drop_rate / drop_path_rate: dropout after the position embedding / stochastic depth (linear in depth).
        shuffle_rate / shuffle_schedule: stochastic layer-wise shuffle (0 = off).
        kernel_backend: ``auto|cuda|ref``.  use_grad_checkpointing: recompute each layer in backward.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 20, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 directions: str | Sequence[Sequence[str]] = "local_vim_searched", norm: str = "rms",
                 norm_eps: float = 1e-5, residual_in_fp32: bool = True, use_rope: bool = True,
                 use_rope_residual: bool = True, rope_pt_seq_len: int = 14, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, shuffle_rate: float = 0.0, shuffle_schedule: str = "linear",
                 kernel_backend: str = "auto", use_grad_checkpointing: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.directions = resolve_directions(directions, depth)
        self.use_rope_residual = use_rope_residual
        self.use_grad_checkpointing = use_grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, patch_size, in_chans, embed_dim)
        self.grid = (self.patch_embed.grid, self.patch_embed.grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # RoPE over half the width per axis: 2 * (embed_dim // 2) channels rotate
        self.rope = (VisionRotaryEmbedding2D(embed_dim // 2, rope_pt_seq_len, self.patch_embed.grid)
                     if use_rope else None)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        inter_dpr = [0.0] + dpr  # block i drops the previous mixer's output (the add is fused into the next block)
        mixer = partial(LocalMambaMixer, d_state=d_state, d_conv=d_conv, expand=expand, kernel_backend=kernel_backend)
        self.layers = nn.ModuleList(
            Block(embed_dim, mixer(embed_dim, self.directions[i]), norm=norm, norm_eps=norm_eps,
                  drop_path=inter_dpr[i], residual_in_fp32=residual_in_fp32)
            for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = create_norm(norm, embed_dim, norm_eps)
        self.shuffle = LayerwiseShuffle(depth, shuffle_rate, shuffle_schedule)

        # Official order: segm init on everything, pos_embed trunc_normal, then the mamba init (zero the
        # non-dt biases, out_proj kaiming / sqrt(depth)).
        self.apply(_segm_init_weights)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(partial(_mamba_init_weights, n_layer=depth))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def _run_layer(self, index: int, hidden: Tensor, residual: Optional[Tensor]):
        layer = self.layers[index]
        if self.use_grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, hidden, residual, use_reentrant=False)
        return layer(hidden, residual)

    def forward_features(self, x: Tensor) -> Tensor:
        """Returns the mean-pooled features fed to the head: (B, D)."""
        x, grid = self.patch_embed(x)  # (B, H*W, D)
        x = self.pos_drop(x + resize_grid_embed(self.pos_embed, self.grid, grid))
        for layer in self.layers:
            layer.mixer.grid = grid
        hidden, residual = x, None
        plan = self.shuffle.plan(hidden)  # every layer's permutation at once (traced training forward only)
        for i in range(self.depth):
            if self.rope is not None:
                # official order: RoPE on the block inputs, then the block adds hidden to the residual
                hidden = self.rope(hidden, grid)
                if residual is not None and self.use_rope_residual:
                    residual = self.rope(residual, grid)
            hidden, residual = self.shuffle(i, partial(self._run_layer, i), hidden, residual, plan)
        residual = residual + self.drop_path(hidden)
        hidden = self.norm_f(residual.to(self.norm_f.weight.dtype))  # (B, L, D)
        return hidden.mean(dim=1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_grad_checkpointing = enable


# ---------------------------------------------------------------------- LocalVMamba
class LocalSS2D(SS2D):
    """SS2D whose K directions are LocalMamba's (global and windowed) scans; each direction's output is mapped
    back to the grid and passed through the channel attention ``multi_scan.attn`` before the sum."""

    def __init__(self, d_model: int, directions: Sequence[str], **kwargs):
        directions = tuple(directions)
        super().__init__(d_model, num_directions=len(directions), **kwargs)
        self.multi_scan = MultiScan(directions, attn_dim=self.d_inner)

    def scan(self, x: Tensor) -> Tensor:
        return self.multi_scan.scan(x)  # (B, K, E, L')

    def merge(self, ys: Tensor, height: int, width: int) -> Tensor:
        return self.multi_scan.merge(ys, height, width).transpose(1, 2)  # (B, H*W, E) -> (B, E, H*W)


def local_vssm(depths: Sequence[int], dims: int | Sequence[int], directions: str | Sequence[Sequence[str]],
               **kwargs) -> VSSM:
    """LocalVMamba: the official local_vmamba.py VSSM (VMamba-v0 layout: conv 4x4 stem + LayerNorm, patch
    merging, no MLP, d_state 16, ssm_ratio 2, depthwise conv 3 with bias, z gate) with `LocalSS2D` mixers."""
    per_layer = resolve_directions(directions, sum(depths))
    defaults = dict(ssm_d_state=16, ssm_ratio=2.0, ssm_dt_rank="auto", ssm_conv=3, ssm_conv_bias=True,
                    ssm_use_z=True, mlp_ratio=0.0, patch_norm=True, norm_layer="ln", downsample_version="v1",
                    patchembed_version="v1", drop_path_rate=0.2)
    return VSSM(depths=depths, dims=dims, mixer=LocalSS2D, family="LocalVMamba",
                mixer_kwargs_per_block=[{"directions": d} for d in per_layer], **{**defaults, **kwargs})


# ---------------------------------------------------------------------- registry
@register_model
def local_vim_tiny(**kwargs) -> LocalVisionMamba:
    """LocalVim-T (local_vim_tiny): 192 x 20, searched directions; 7.99M params, official 8M / 1.5G."""
    return LocalVisionMamba(**{**dict(embed_dim=192, depth=20, directions="local_vim_searched"), **kwargs})


@register_model
def local_vim_small(**kwargs) -> LocalVisionMamba:
    """LocalVim-S (local_vim_small): 384 x 20; 27.8M params, official 28M / 4.8G.

    Directions default to the searched LocalVim list (the first local_vim_small definition of the official
    file). The official file defines local_vim_small a second time with (h, h_flip, w2, w2_flip) in every
    layer, and timm's registry keeps that later definition: pass ``directions="local_vim_wo_search"`` to
    build exactly what ``timm.create_model("local_vim_small")`` builds there (e.g. for the released LocalVim-S
    checkpoint, whose directions are not recorded in its file)."""
    return LocalVisionMamba(**{**dict(embed_dim=384, depth=20, directions="local_vim_searched"), **kwargs})


@register_model
def local_vmamba_tiny(**kwargs) -> VSSM:
    """LocalVMamba-T (local_vssm_tiny): dims 96-768, depths 2-2-9-2, searched directions; 25.5M params,
    official 26M / 5.7G."""
    return local_vssm((2, 2, 9, 2), 96, kwargs.pop("directions", "local_vmamba_tiny_searched"), **kwargs)


@register_model
def local_vmamba_small(**kwargs) -> VSSM:
    """LocalVMamba-S (local_vssm_small): dims 96-768, depths 2-2-27-2, searched directions; 49.7M params,
    official 50M / 11.4G."""
    return local_vssm((2, 2, 27, 2), 96, kwargs.pop("directions", "local_vmamba_small_searched"), **kwargs)


# Tiny models for CI: 32 px. LocalVim: patch 8 -> 4x4 grid, where w3 pads to 6x6 (exercises the padded
# windows and the stacking padding); LocalVMamba: 8x8, 4x4, 2x2, 1x1 maps.
_TEST_DIRECTIONS = (("h", "v_flip", "w2", "w3_flip"), ("h_flip", "v", "w3", "w2_flip"),
                    ("h", "h_flip", "v", "v_flip"), ("w2", "w2_flip", "w3", "v"))


@register_model
def local_vim_test(**kwargs) -> LocalVisionMamba:
    """Tiny LocalVim for tests (4 layers x 32, 4x4 tokens)."""
    return LocalVisionMamba(**{**dict(img_size=32, patch_size=8, embed_dim=32, depth=4, d_state=8,
                                      directions=_TEST_DIRECTIONS, rope_pt_seq_len=4), **kwargs})


@register_model
def local_vmamba_test(**kwargs) -> VSSM:
    """Tiny LocalVMamba for tests (dims 16-128, one block per stage)."""
    return local_vssm((1, 1, 1, 1), 16, kwargs.pop("directions", _TEST_DIRECTIONS),
                      **{**dict(img_size=32, ssm_d_state=4, drop_path_rate=0.1), **kwargs})
