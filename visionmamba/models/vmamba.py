"""VMamba (MzeroMiko/VMamba ``classification/models/vmamba.py``): hierarchical VSS blocks with SS2D.

Each stage is a stack of VSS blocks (x + DropPath(SS2D(norm(x))), then x + DropPath(MLP(norm2(x)))) followed
by a downsampling layer; the SS2D 4-direction scan runs as one `visionmamba.ops.selective_scan` call
(`visionmamba.layers.ss2d`). The registered models follow the current official configs
(``classification/configs/vssm``); the options cover the v0/v2 stems and downsamplers and the channel-last
(``ln``) / channel-first (``ln2d``, ``bn``) layouts. Module and parameter names match the official ones
(``patch_embed.N``, ``layers.i.blocks.j.{norm,op,norm2,mlp}``, ``layers.i.downsample``,
``classifier.{norm,head}``), so official checkpoints load with ``load_state_dict``.

The ShuffleMamba layer-wise shuffle is refused (``shuffle_rate > 0`` raises): see
`visionmamba.models._hierarchical`.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers.ss2d import SS2D, LayerNorm2d, Linear2d, Permute
from ._hierarchical import refuse_layerwise_shuffle
from ._registry import register_model

__all__ = ["VSSM", "VSSBlock", "Mlp", "PatchMerging2D"]

_NORM_LAYERS = {"ln": nn.LayerNorm, "ln2d": LayerNorm2d, "bn": nn.BatchNorm2d}
_ACT_LAYERS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


# ---------------------------------------------------------------------- blocks
class Mlp(nn.Module):
    """fc1 -> act -> fc2 (1x1 convs when channel_first)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.0, channel_first: bool = False):
        super().__init__()
        Linear = Linear2d if channel_first else nn.Linear
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchMerging2D(nn.Module):
    """Swin patch merging (``downsample v1``): 2x2 neighbours concatenated -> norm(4C) -> Linear(4C, C_out)."""

    def __init__(self, dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm,
                 channel_first: bool = False):
        super().__init__()
        self.channel_first = channel_first
        self.reduction = (Linear2d if channel_first else nn.Linear)(4 * dim, out_dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first:  # (B, C, H, W)
            h, w = x.shape[-2:]
            x = F.pad(x, (0, w % 2, 0, h % 2))
            x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], 1)
        else:  # (B, H, W, C)
            h, w = x.shape[-3:-1]
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :],
                           x[..., 1::2, 1::2, :]], -1)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class VSSBlock(nn.Module):
    """x + DropPath(op(norm(x))) [+ x + DropPath(mlp(norm2(x))) when mlp_ratio > 0]. ``op`` is built by
    ``mixer`` (an SS2D or a subclass such as LocalMamba's windowed SS2D)."""

    def __init__(self, dim: int, mixer: Callable[[int], nn.Module], drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, mlp_ratio: float = 4.0,
                 mlp_act_layer: type[nn.Module] = nn.GELU, mlp_drop_rate: float = 0.0, channel_first: bool = False):
        super().__init__()
        self.norm = norm_layer(dim)
        self.op = mixer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.use_mlp = mlp_ratio > 0
        if self.use_mlp:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_act_layer, mlp_drop_rate, channel_first)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.use_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


# ---------------------------------------------------------------------- model
class VSSM(nn.Module):
    """Hierarchical visual state-space model (VMamba; LocalVMamba with a windowed SS2D).

    Args:
        img_size: accepted for a uniform model API; VMamba has no position embedding, any size runs.
        patch_size: total stride of the stem (4).  in_chans / num_classes: input channels / classes (0: no head).
        depths / dims: blocks per stage and stage widths (an int d means d, 2d, 4d, 8d).
        ssm_d_state / ssm_ratio / ssm_dt_rank / ssm_conv / ssm_conv_bias / ssm_act_layer / ssm_drop_rate:
            SS2D sizes (d_state, expansion, dt rank, depthwise conv kernel and bias, activation, dropout).
        ssm_use_z: gate the scan output with SiLU(z) (official forward types without ``_noz``).
        mlp_ratio / mlp_act_layer / mlp_drop_rate: MLP branch (mlp_ratio 0: none, as VMamba-v0/LocalVMamba).
        drop_path_rate: linear in block index over the whole network, up to this rate.
        patch_norm: norm after the stem convs.  norm_layer: ``ln`` (channels-last), ``ln2d`` or ``bn``
            (channels-first: 1x1 convs instead of Linears, no permutes).
        downsample_version: ``v1`` patch merging, ``v2`` conv 2x2/2, ``v3`` conv 3x3/2 (each followed by a norm).
        patchembed_version: ``v1`` conv patch x patch, ``v2`` two conv 3x3/2 with norm + GELU in between.
        mixer: SS2D class (or factory) for the blocks; gets ``d_model`` and the ssm options.
        mixer_kwargs_per_block: optional per-block extra kwargs for the mixer (LocalVMamba's directions).
        kernel_backend: ``auto|cuda|ref`` for the selective scan.
        shuffle_rate / shuffle_schedule: the layer-wise shuffle is not defined for 2-D models; rate > 0 raises.
        use_grad_checkpointing: recompute each block in backward.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (2, 2, 9, 2), dims: int | Sequence[int] = 96, ssm_d_state: int = 16,
                 ssm_ratio: float = 2.0, ssm_dt_rank="auto", ssm_act_layer: str = "silu", ssm_conv: int = 3,
                 ssm_conv_bias: bool = True, ssm_drop_rate: float = 0.0, ssm_use_z: bool = True,
                 mlp_ratio: float = 4.0, mlp_act_layer: str = "gelu", mlp_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, patch_norm: bool = True, norm_layer: str = "ln",
                 downsample_version: str = "v2", patchembed_version: str = "v1",
                 mixer: Callable[..., nn.Module] = SS2D, mixer_kwargs_per_block: Optional[Sequence[dict]] = None,
                 kernel_backend: str = "auto", shuffle_rate: float = 0.0, shuffle_schedule: Optional[str] = None,
                 use_grad_checkpointing: bool = False, family: str = "VMamba"):
        super().__init__()
        refuse_layerwise_shuffle(family, shuffle_rate)
        if norm_layer.lower() not in _NORM_LAYERS:
            raise ValueError(f"norm_layer must be one of {sorted(_NORM_LAYERS)}, got {norm_layer!r}")
        if ssm_act_layer.lower() != "silu":
            raise ValueError(f"only ssm_act_layer='silu' is implemented (the official default), got {ssm_act_layer!r}")
        if mixer_kwargs_per_block is not None and len(mixer_kwargs_per_block) != sum(depths):
            raise ValueError(f"mixer_kwargs_per_block has {len(mixer_kwargs_per_block)} entries for "
                             f"{sum(depths)} blocks")
        self.img_size = img_size
        self.num_classes = num_classes
        self.channel_first = norm_layer.lower() in ("bn", "ln2d")
        self.num_layers = len(depths)
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(self.num_layers)]
        self.dims = list(dims)
        self.num_features = self.dims[-1]
        self.use_grad_checkpointing = use_grad_checkpointing
        norm = _NORM_LAYERS[norm_layer.lower()]
        mlp_act = _ACT_LAYERS[mlp_act_layer.lower()]
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]

        self.patch_embed = self._make_patch_embed(patchembed_version, in_chans, self.dims[0], patch_size,
                                                  patch_norm, norm)
        ssm_kwargs = dict(d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank, d_conv=ssm_conv,
                          conv_bias=ssm_conv_bias, use_z=ssm_use_z, dropout=ssm_drop_rate,
                          channel_first=self.channel_first, kernel_backend=kernel_backend)
        self.layers = nn.ModuleList()
        block_idx = 0
        for i, depth in enumerate(depths):
            blocks = []
            for _ in range(depth):
                extra = mixer_kwargs_per_block[block_idx] if mixer_kwargs_per_block is not None else {}
                blocks.append(VSSBlock(self.dims[i], partial(_build_mixer, mixer, ssm_kwargs, extra),
                                       drop_path=dpr[block_idx], norm_layer=norm, mlp_ratio=mlp_ratio,
                                       mlp_act_layer=mlp_act, mlp_drop_rate=mlp_drop_rate,
                                       channel_first=self.channel_first))
                block_idx += 1
            downsample = (self._make_downsample(downsample_version, self.dims[i], self.dims[i + 1], norm)
                          if i < self.num_layers - 1 else nn.Identity())
            self.layers.append(nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks), downsample=downsample)))

        self.classifier = nn.Sequential(OrderedDict(
            norm=norm(self.num_features),
            permute=nn.Identity() if self.channel_first else Permute(0, 3, 1, 2),  # (B, C, H, W) for pooling
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            head=nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(),
        ))
        self.apply(self._init_weights)

    # ------------------------------------------------------------------ stems and downsamplers
    def _make_patch_embed(self, version: str, in_chans: int, embed_dim: int, patch_size: int, patch_norm: bool,
                          norm: type[nn.Module]) -> nn.Sequential:
        cf = self.channel_first
        if version == "v1":
            return nn.Sequential(
                nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size),
                nn.Identity() if cf else Permute(0, 2, 3, 1),
                norm(embed_dim) if patch_norm else nn.Identity(),
            )
        if version == "v2":
            stride = patch_size // 2
            kernel = stride + 1
            # channels-last norms need (B, H, W, C) around the middle norm; without a norm nothing is permuted
            to_last = nn.Identity() if (cf or not patch_norm) else Permute(0, 2, 3, 1)
            to_first = nn.Identity() if (cf or not patch_norm) else Permute(0, 3, 1, 2)
            return nn.Sequential(
                nn.Conv2d(in_chans, embed_dim // 2, kernel_size=kernel, stride=stride, padding=1),
                to_last,
                norm(embed_dim // 2) if patch_norm else nn.Identity(),
                to_first,
                nn.GELU(),
                nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=kernel, stride=stride, padding=1),
                nn.Identity() if cf else Permute(0, 2, 3, 1),
                norm(embed_dim) if patch_norm else nn.Identity(),
            )
        raise ValueError(f"patchembed_version must be v1 or v2, got {version!r}")

    def _make_downsample(self, version: str, dim: int, out_dim: int, norm: type[nn.Module]) -> nn.Module:
        cf = self.channel_first
        if version == "v1":
            return PatchMerging2D(dim, out_dim, norm, channel_first=cf)
        if version in ("v2", "v3"):
            conv = (nn.Conv2d(dim, out_dim, kernel_size=2, stride=2) if version == "v2"
                    else nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1))
            return nn.Sequential(
                nn.Identity() if cf else Permute(0, 3, 1, 2),
                conv,
                nn.Identity() if cf else Permute(0, 2, 3, 1),
                norm(out_dim),
            )
        if version == "none":
            return nn.Identity()
        raise ValueError(f"downsample_version must be v1, v2, v3 or none, got {version!r}")

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: Linear (and Linear2d) trunc_normal(0.02), bias 0; LayerNorm 1/0. The SS2D projections
        stored as plain Parameters keep their mamba init."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        # The official set is {"pos_embed"} (only present with posembed=True, which no released config uses).
        return set()

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor) -> Tensor:
        """Returns the pooled, normalised features fed to the head: (B, num_features)."""
        x = self.patch_embed(x)  # (B, C, H/4, W/4) channel-first or (B, H/4, W/4, C)
        for layer in self.layers:
            for block in layer.blocks:
                if self.use_grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            x = layer.downsample(x)
        c = self.classifier
        return c.flatten(c.avgpool(c.permute(c.norm(x))))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.classifier.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_grad_checkpointing = enable


def _build_mixer(mixer: Callable[..., nn.Module], ssm_kwargs: dict, extra: dict, dim: int) -> nn.Module:
    return mixer(d_model=dim, **ssm_kwargs, **extra)


# ---------------------------------------------------------------------- registry
# Current official configs (classification/configs/vssm/vmambav2*_224.yaml): ssm_d_state 1, dt_rank auto,
# ssm_conv 3 without bias, forward_type v05_noz (no z gate), mlp_ratio 4, downsample v3, patchembed v2, ln2d.
_V2 = dict(ssm_d_state=1, ssm_dt_rank="auto", ssm_ratio=2.0, ssm_conv=3, ssm_conv_bias=False, ssm_use_z=False,
           mlp_ratio=4.0, downsample_version="v3", patchembed_version="v2", norm_layer="ln2d")


def _vmamba(defaults: dict, overrides: dict) -> VSSM:
    return VSSM(**{**_V2, **defaults, **overrides})


@register_model
def vmamba_tiny(**kwargs) -> VSSM:
    """VMamba-T (vmambav2_tiny_224.yaml, ``vssm1_tiny_0230``): 30.7M params, official 30M / 4.8G."""
    return _vmamba(dict(depths=(2, 2, 5, 2), dims=96, drop_path_rate=0.2), kwargs)


@register_model
def vmamba_small(**kwargs) -> VSSM:
    """VMamba-S[s2l15] (vmambav2_small_224.yaml, ``vssm1_small_0229``): 50.1M params, official 50M / 8.7G."""
    return _vmamba(dict(depths=(2, 2, 15, 2), dims=96, drop_path_rate=0.3), kwargs)


@register_model
def vmamba_base(**kwargs) -> VSSM:
    """VMamba-B[s2l15] (vmambav2_base_224.yaml, ``vssm1_base_0229``): 88.6M params, official 89M / 15.4G."""
    return _vmamba(dict(depths=(2, 2, 15, 2), dims=128, drop_path_rate=0.6), kwargs)


@register_model
def vmamba_tiny_s1l8(**kwargs) -> VSSM:
    """VMamba-T[s1l8] (vmambav2v_tiny_224.yaml, ``vssm1_tiny_0230s``, ssm_ratio 1): 30.2M params, official
    30M / 4.9G."""
    return _vmamba(dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2), kwargs)


@register_model
def vmamba_test(**kwargs) -> VSSM:
    """Tiny VMamba for CI (32 px -> 8x8, 4x4, 2x2, 1x1 maps; d_state 4 to exercise the grouped B/C scan)."""
    return _vmamba(dict(img_size=32, depths=(1, 1, 2, 1), dims=16, ssm_d_state=4, mlp_ratio=2.0,
                        drop_path_rate=0.1), kwargs)
