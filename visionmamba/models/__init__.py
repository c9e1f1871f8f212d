"""Model zoo. Importing a family module runs its ``register_model`` calls."""
from ._registry import UnknownModelError, create_model, is_model, list_models, register_model
from . import vim  # noqa: F401  (registers Vim, ShuffleMamba, ShuffleMamba-Reg / Mamba-Reg)
from .vim import VisionMamba
from . import localmamba, mambaout, vmamba  # noqa: F401  (register LocalVim/LocalVMamba, MambaOut, VMamba)

__all__ = ["UnknownModelError", "VisionMamba", "create_model", "is_model", "list_models", "register_model"]
