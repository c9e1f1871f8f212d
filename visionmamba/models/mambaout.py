"""MambaOut (Yu & Wang, arXiv 2405.07992): Gated-CNN blocks without an SSM, through timm's implementation.

timm ships the official MambaOut models (``timm.models.mambaout``; its checkpoint filter also reads the
original yuweihao/MambaOut parameter names). These thin entry points put them in our registry so they train
and validate through the same configs and loop: they call ``timm.create_model(..., pretrained=False)``,
translate our common overrides, and can load timm- or original-format checkpoint files from a local path.

Accepted overrides: ``num_classes``, ``drop_path_rate``, ``drop_rate``, ``in_chans`` and other timm MambaOut
arguments; ``img_size`` (MambaOut is fully convolutional, any size runs, so it is not needed),
``kernel_backend`` (no selective scan here) and ``shuffle_schedule`` are accepted and ignored;
``shuffle_rate > 0`` raises (hierarchical 2-D model, see `visionmamba.models._hierarchical`);
``checkpoint_path`` loads weights after building.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import timm
from timm.models.mambaout import checkpoint_filter_fn
from torch import nn

from ._hierarchical import refuse_layerwise_shuffle
from ._registry import register_model

__all__ = ["load_mambaout_checkpoint"]

log = logging.getLogger(__name__)


def _no_weight_decay() -> set[str]:
    # The official model lists {"norm"}, which names no parameter (norm weights are 1-D and exempt anyway).
    return set()


def load_mambaout_checkpoint(model: nn.Module, checkpoint_path: str | os.PathLike, use_ema: bool = False,
                             strict: bool = True) -> None:
    """Load a MambaOut checkpoint file (``.pth``/``.pth.tar``/``.safetensors``; timm layout or the original
    yuweihao/MambaOut names; a bare state_dict or one under ``state_dict``/``model``/EMA keys) into ``model``.

    A classifier whose shape does not match (fine-tuning to another ``num_classes``) is skipped with a warning.
    """
    state_dict = timm.models.load_state_dict(str(checkpoint_path), use_ema=use_ema)
    state_dict = checkpoint_filter_fn(state_dict, model)  # original names -> timm names (no-op for timm files)
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k.startswith("head.") and k in own and own[k].shape != v.shape]
    for key in mismatched:
        del state_dict[key]
    if mismatched:
        log.warning("%s: classifier shape differs from the model (%s), left at its initialisation",
                    checkpoint_path, ", ".join(mismatched))
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"checkpoint {checkpoint_path} does not match the model: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")


def _mambaout(variant: str, img_size: Optional[int] = None, kernel_backend: Optional[str] = None,
              shuffle_rate: float = 0.0, shuffle_schedule: Optional[str] = None,
              checkpoint_path: Optional[str] = None, **kwargs) -> nn.Module:
    refuse_layerwise_shuffle("MambaOut", shuffle_rate)
    model = timm.create_model(variant, pretrained=False, **kwargs)
    model.no_weight_decay = _no_weight_decay  # our model contract (timm's MambaOut has no such method)
    if checkpoint_path:
        load_mambaout_checkpoint(model, checkpoint_path)
    return model


@register_model
def mambaout_femto(**kwargs) -> nn.Module:
    """MambaOut-Femto (timm ``mambaout_femto``): 7.3M params / 1.2 GMACs."""
    return _mambaout("mambaout_femto", **kwargs)


@register_model
def mambaout_kobe(**kwargs) -> nn.Module:
    """MambaOut-Kobe (24 Gated CNN blocks, timm ``mambaout_kobe``): 9.1M / 1.5G."""
    return _mambaout("mambaout_kobe", **kwargs)


@register_model
def mambaout_tiny(**kwargs) -> nn.Module:
    """MambaOut-Tiny (timm ``mambaout_tiny``): 26.5M / 4.5G."""
    return _mambaout("mambaout_tiny", **kwargs)


@register_model
def mambaout_small(**kwargs) -> nn.Module:
    """MambaOut-Small (timm ``mambaout_small``): 48.5M / 9.0G."""
    return _mambaout("mambaout_small", **kwargs)


@register_model
def mambaout_base(**kwargs) -> nn.Module:
    """MambaOut-Base (timm ``mambaout_base``): 84.8M / 15.8G."""
    return _mambaout("mambaout_base", **kwargs)


@register_model
def mambaout_test(**kwargs) -> nn.Module:
    """Tiny MambaOut for CI (timm's MambaOut class with femto depths 1-1-1-1 and dims 8-16-24-32)."""
    return _mambaout("mambaout_femto", **{**dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), **kwargs})
