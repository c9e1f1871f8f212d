"""Shared policy of the hierarchical 2-D families (VMamba, LocalVMamba, MambaOut)."""
from __future__ import annotations

SHUFFLE_2D_EXPLANATION = (
    "the ShuffleMamba layer-wise shuffle is defined for plain token sequences (Vim-style backbones and LocalVim): "
    "it permutes the tokens before a layer and restores their order after it. {family} is a hierarchical 2-D "
    "model whose layers see an H x W feature map (depthwise 2-D convs, 2-D scans, patch merging), and no 2-D "
    "definition of the shuffle (e.g. permuting the flattened grid before each stage's scans) is implemented. "
    "Use shuffle_rate=0 (or null) for this model."
)


def refuse_layerwise_shuffle(family: str, shuffle_rate: float | None) -> None:
    """Raise a ValueError that explains why ``shuffle_rate > 0`` is not accepted by a hierarchical 2-D model."""
    if shuffle_rate is not None and shuffle_rate > 0:
        raise ValueError(f"shuffle_rate={shuffle_rate} is not supported by {family}: "
                         + SHUFFLE_2D_EXPLANATION.format(family=family))
