"""Cosine LR schedule with linear warmup (timm ``CosineLRScheduler``), per epoch or per optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import CosineLRScheduler

INTERVALS = ("epoch", "step")


class LRScheduler:
    """Drives a timm ``CosineLRScheduler`` from two explicit hooks of the training loop.

    The schedule, with ``t`` in epochs (``interval="epoch"``) or optimizer steps (``interval="step"``), is
    ``f(t) = warmup_lr + t * (lr - warmup_lr) / warmup_t`` for ``t < warmup_t`` and
    ``f(t) = min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * t / T))`` afterwards, where ``T`` is the whole run and
    ``t`` counts from 0, not from the end of warmup (timm ``warmup_prefix=False``, as in the official code). It is
    ``min_lr`` from ``t >= T`` on (``cycle_limit=1``).

    Which ``t`` each epoch or step runs at:
        * ``interval="step"``: step ``s`` (0-based) runs at ``f(s)``.
        * ``interval="epoch"``: epoch ``k`` (0-based) runs at ``f(k)``.
        * ``interval="epoch", official_epoch_shift=True``: the official loop calls ``scheduler.step(epoch)`` after
          each epoch, so epochs 0 and 1 both run at ``f(0) = warmup_lr`` and epoch ``k >= 1`` runs at ``f(k - 1)``.

    The optimizer's lr is ``f(0)`` (``warmup_lr`` when warming up) as soon as this object exists. The wrapper
    remembers the last hook call, so :meth:`load_state_dict` alone restores the lr for the resumed position.

    Args:
        optimizer: Its groups' current ``lr`` is taken as the peak lr.
        epochs: Run length ``T`` in epochs.
        steps_per_epoch: Optimizer steps per epoch (after gradient accumulation); used by ``interval="step"``.
        warmup_epochs: Warmup length in epochs (0 disables warmup; longer than ``epochs`` means the whole run warms
            up, which short smoke runs with recipe defaults rely on).
        warmup_lr: Lr at ``t = 0`` of the warmup.
        min_lr: Floor of the cosine.
        interval: ``"epoch"`` (lr changes once per epoch, timm ``t_in_epochs=True``) or ``"step"``.
        official_epoch_shift: Reproduce the official one-epoch lag (``interval="epoch"`` only).
    """

    def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            *,
            epochs: int,
            steps_per_epoch: int,
            warmup_epochs: int = 5,
            warmup_lr: float = 1e-6,
            min_lr: float = 1e-5,
            interval: str = "epoch",
            official_epoch_shift: bool = False,
    ) -> None:
        if interval not in INTERVALS:
            raise ValueError(f"Unknown interval '{interval}'; valid intervals are {', '.join(INTERVALS)}.")
        if official_epoch_shift and interval != "epoch":
            raise ValueError("official_epoch_shift reproduces the per-epoch official loop; it needs interval='epoch'.")
        if epochs <= 0 or steps_per_epoch <= 0:
            raise ValueError(f"epochs and steps_per_epoch must be positive, got {epochs} and {steps_per_epoch}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.optimizer = optimizer
        self.interval = interval
        self.official_epoch_shift = official_epoch_shift
        self.last_epoch = -1  # last epoch passed to after_epoch
        self.num_updates = 0  # last value passed to after_optimizer_step
        units = 1 if interval == "epoch" else steps_per_epoch
        # The constructor already sets every group's lr to f(0).
        self.scheduler = CosineLRScheduler(
            optimizer,
            t_initial=epochs * units,
            lr_min=min_lr,
            warmup_t=warmup_epochs * units,
            warmup_lr_init=warmup_lr,
            cycle_limit=1,
            warmup_prefix=False,
            t_in_epochs=interval == "epoch",
        )

    def after_optimizer_step(self, num_updates: int) -> None:
        """Call after every optimizer step with the number of steps done so far (1 after the first step)."""
        self.num_updates = num_updates
        if self.interval == "step":
            self.scheduler.step_update(num_updates)

    def after_epoch(self, epoch: int) -> None:
        """Call after each epoch with the 0-based index of the epoch just finished; sets the next epoch's lr."""
        self.last_epoch = epoch
        if self.interval == "epoch":
            self.scheduler.step(epoch if self.official_epoch_shift else epoch + 1)

    def lr_at(self, t: int) -> float:
        """The schedule value ``f(t)`` of the first group (``t`` in this scheduler's unit)."""
        return self.scheduler._get_lr(t)[0]

    def get_last_lr(self) -> list[float]:
        """Current lr of every param group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Hook position, settings and the timm scheduler state (no optimizer)."""
        return {
            "interval": self.interval,
            "official_epoch_shift": self.official_epoch_shift,
            "last_epoch": self.last_epoch,
            "num_updates": self.num_updates,
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state and re-applies the lr of the saved position to the optimizer.

        Raises:
            ValueError: The state was saved with another ``interval`` or ``official_epoch_shift``.
        """
        for key in ("interval", "official_epoch_shift"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(f"Scheduler state has {key}={state_dict[key]!r} but this run uses "
                                 f"{getattr(self, key)!r}.")
        self.scheduler.load_state_dict(state_dict["scheduler"])
        if state_dict["last_epoch"] >= 0:
            self.after_epoch(state_dict["last_epoch"])
        if state_dict["num_updates"] > 0:
            self.after_optimizer_step(state_dict["num_updates"])


def build_scheduler(
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: int = 5,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        interval: str = "epoch",
        official_epoch_shift: bool = False,
) -> LRScheduler:
    """Builds the warmup + cosine :class:`LRScheduler` (see it for the exact schedule and hook semantics)."""
    return LRScheduler(
        optimizer,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        interval=interval,
        official_epoch_shift=official_epoch_shift,
    )
