"""Model registry: ``@register_model`` / ``create_model(name, **overrides)`` / ``list_models()``.

Our own registry (timm style, but separate from timm's so nothing collides with timm model names).
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from torch import nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(ValueError):
    """Raised by `create_model` for a name that is not registered."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _ENTRYPOINTS:
        raise ValueError(f"model {name!r} is registered twice")
    _ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _ENTRYPOINTS


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model. Overrides whose value is None are dropped, so ``null`` in a config means
    "the model's default" and options a model does not take can be left unset."""
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, _ENTRYPOINTS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    model = _ENTRYPOINTS[name](**kwargs)
    model.model_name = name
    return model
