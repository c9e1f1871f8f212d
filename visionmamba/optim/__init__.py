"""Optimization: weight-decay groups, LR scaling, optimizer and scheduler factories (plain functions, no Hydra)."""

from .optimizer import OPTIMIZER_NAMES, align_optimizer_state, build_optimizer, largest_first, scale_lr
from .param_groups import DECAY_MODES, param_groups
from .scheduler import INTERVALS, LRScheduler, build_scheduler

__all__ = [
    "DECAY_MODES",
    "INTERVALS",
    "OPTIMIZER_NAMES",
    "LRScheduler",
    "align_optimizer_state",
    "build_optimizer",
    "build_scheduler",
    "largest_first",
    "param_groups",
    "scale_lr",
]
