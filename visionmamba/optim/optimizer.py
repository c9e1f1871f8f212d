"""Learning-rate scaling and the optimizer factory."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

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


def largest_first(params: Sequence[Tensor]) -> list[int]:
    """Indices of ``params`` ordered by size, largest first (ties keep their order): the order to hand them to a fused
    optimizer in.

    Why: PyTorch's fused AdamW / SGD (``multi_tensor_apply``) pack up to 36 tensors into one launch and give each
    thread block one chunk of up to 65536 elements, which it walks in a loop bound by memory latency, so a launch
    lasts as long as its largest chunk. In model order every launch held one of the big projections: Vim-T's step
    was 12 launches of ~36 us (0.44 ms on an H200). Largest first, the big tensors share two launches and the others
    finish in a few us each: 0.14 ms (`scripts/benchmark.py`, README "Performance"). The update is elementwise per
    parameter, so nothing else changes.
    """
    return sorted(range(len(params)), key=lambda i: -params[i].numel())


def align_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``saved`` (an optimizer ``state_dict``) with its per-parameter state put in ``optimizer``'s parameter order,
    matched by the groups' ``param_names``: PyTorch loads state by position, so a checkpoint written with another
    order (before :func:`build_optimizer` ordered parameters :func:`largest_first`) would otherwise give each moment
    to the wrong parameter. Returned unchanged when the orders already agree, or when names are missing or differ
    (``load_state_dict`` then checks what it can)."""
    current = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups", [])
    if len(groups) != len(current) or any("param_names" not in g for g in (*groups, *current)):
        return saved
    if all(g["param_names"] == c["param_names"] for g, c in zip(groups, current)):
        return saved
    if any(sorted(g["param_names"]) != sorted(c["param_names"]) for g, c in zip(groups, current)):
        return saved
    state, aligned = {}, []
    for g, c in zip(groups, current):
        saved_id = dict(zip(g["param_names"], g["params"]))
        for name, pid in zip(c["param_names"], c["params"]):
            if saved_id[name] in saved["state"]:
                state[pid] = saved["state"][saved_id[name]]
        aligned.append({**g, "params": c["params"], "param_names": c["param_names"]})
    return {**saved, "state": state, "param_groups": aligned}


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
        The optimizer, with the no-decay group first, each group's parameters :func:`largest_first`.

    Raises:
        ValueError: Unknown ``name`` or ``decay_mode``.
    """
    key = name.lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"Unknown optimizer '{name}'; valid names are {', '.join(OPTIMIZER_NAMES)}.")
    groups = param_groups(model, weight_decay, decay_mode=decay_mode)
    for group in groups:
        order = largest_first(group["params"])
        group["params"] = [group["params"][i] for i in order]
        group["param_names"] = [group["param_names"][i] for i in order]
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=fused)
