from .block import Block
from .mixer import BiMambaMixer
from .norm import LayerNormFp32, RMSNorm, create_norm
from .patch_embed import PatchEmbed, grid_size
from .pos_embed import register_layout, resize_grid_embed
from .shuffle import LayerwiseShuffle, shuffle_probabilities

__all__ = ["BiMambaMixer", "Block", "LayerNormFp32", "LayerwiseShuffle", "PatchEmbed", "RMSNorm", "create_norm",
           "grid_size", "register_layout", "resize_grid_embed", "shuffle_probabilities"]
