"""Learning-rate scaling and the optimizer factory."""

from __future__ import annotations

import torch
from torch import nn

from .param_groups import param_groups

OPTIMIZER_NAMES = ("adamw", "sgd")


def scale_lr(base_lr: float, global_batch: int, base_batch: int = 512) -> float:
    """Linear LR scaling of DeiT and the official recipes: ``base_lr * global_batch / base_batch``.

    ``warmup_lr`` and ``min_lr`` are *not* scaled in the official code; only pass the peak lr through this.

    Args:
        base_lr: LR quoted for ``base_batch`` images per step (``--lr``).
        global_batch: Images per optimizer step over all ranks: ``batch_per_gpu * accum_steps * world_size``.
        base_batch: Reference batch of ``base_lr`` (512 in DeiT/Vim/ShuffleMamba).

    Returns:
        The learning rate to use.
    """
    if global_batch <= 0 or base_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got global_batch={global_batch}, base_batch={base_batch}")
    return base_lr * global_batch / base_batch


def build_optimizer(
        model: nn.Module,
        *,
        name: str = "adamw",
        lr: float,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        decay_mode: str = "modern",
        fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Builds the optimizer over :func:`param_groups` of ``model``.

    Args:
        model: The unwrapped model.
        name: ``"adamw"`` (torch AdamW, the official choice) or ``"sgd"`` (momentum 0.9, Nesterov; ``betas`` and
            ``eps`` unused).
        lr: Peak learning rate (already scaled, see :func:`scale_lr`).
        weight_decay: Decoupled weight decay of the decay group.
        betas: AdamW betas.
        eps: AdamW epsilon.
        decay_mode: ``"official"`` or ``"modern"``, see :func:`param_groups`.
        fused: PyTorch's fused implementation; None lets PyTorch choose.

    Returns:
        The optimizer, with the no-decay group first.

    Raises:
        ValueError: Unknown ``name`` or ``decay_mode``.
    """
    key = name.lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"Unknown optimizer '{name}'; valid names are {', '.join(OPTIMIZER_NAMES)}.")
    groups = param_groups(model, weight_decay, decay_mode=decay_mode)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=fused)
