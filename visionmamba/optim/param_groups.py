"""Weight-decay parameter groups: the official timm 0.4.12 rule and the modern Mamba-aware rule."""

from __future__ import annotations

from typing import Any

from torch import nn

DECAY_MODES = ("official", "modern")

# Substrings of parameter names that are tokens or position embeddings (never decayed in "modern" mode).
_TOKEN_NAME_PARTS = ("cls_token", "pos_embed", "register")


def param_groups(model: nn.Module, weight_decay: float, *, decay_mode: str = "modern") -> list[dict[str, Any]]:
    """Splits the trainable parameters into a no-decay and a decay group.

    ``"official"`` reproduces timm 0.4.12 ``add_weight_decay(model, weight_decay, model.no_weight_decay())`` as
    Vim/ShuffleMamba/Mamba-Reg use it: a parameter is *not* decayed iff ``p.ndim == 1``, its name ends in
    ``".bias"``, or its name is in ``model.no_weight_decay()``. So ``A_log``/``A_b_log`` (2-D), conv1d weights
    (3-D) and all projection weights *are* decayed; the ``_no_weight_decay`` attribute is ignored.

    ``"modern"`` additionally exempts parameters marked ``p._no_weight_decay = True`` (the mamba_ssm convention for
    ``A_log``, ``D`` and their backward copies), every parameter with ``ndim <= 1``, and names containing
    ``cls_token``, ``pos_embed`` or ``register``.

    Frozen parameters (``requires_grad=False``) are left out. Names are those of ``model.named_parameters()``, so
    pass the unwrapped model (not DDP's ``module.`` view) for ``no_weight_decay()`` names to match.

    Args:
        model: The model; an optional ``no_weight_decay() -> set[str]`` method lists exempt parameter names.
        weight_decay: Decay of the decay group.
        decay_mode: ``"official"`` or ``"modern"``.

    Returns:
        Up to two groups, no-decay first (the official order), each ``{"params", "weight_decay", "param_names"}``.
        Empty groups are dropped. ``param_names`` is also PyTorch's own key for named optimizer groups, so it is
        kept in ``optimizer.state_dict()``.

    Raises:
        ValueError: Unknown ``decay_mode``.
    """
    if decay_mode not in DECAY_MODES:
        raise ValueError(f"Unknown decay_mode '{decay_mode}'; valid modes are {', '.join(DECAY_MODES)}.")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()

    no_decay: dict[str, list] = {"params": [], "param_names": []}
    decay: dict[str, list] = {"params": [], "param_names": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if decay_mode == "official":
            exempt = param.ndim == 1 or name.endswith(".bias") or name in skip
        else:
            exempt = (
                param.ndim <= 1
                or name.endswith(".bias")
                or name in skip
                or getattr(param, "_no_weight_decay", False)
                or any(part in name for part in _TOKEN_NAME_PARTS)
            )
        group = no_decay if exempt else decay
        group["params"].append(param)
        group["param_names"].append(name)

    groups = [{**no_decay, "weight_decay": 0.0}, {**decay, "weight_decay": weight_decay}]
    return [group for group in groups if group["params"]]
