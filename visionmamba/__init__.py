"""visionmamba: config-driven ImageNet training for Vision Mamba models.

Importing the package never imports mamba_ssm, causal_conv1d or triton: the CUDA kernels load lazily
the first time a GPU path is requested (see `visionmamba.ops`).
"""
from .models import UnknownModelError, create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["UnknownModelError", "create_model", "list_models", "register_model", "__version__"]
