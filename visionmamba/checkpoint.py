"""Checkpoint files: atomic writes, rotation (last N, best, every N epochs), auto-resume lookup, weight loading.

Our format is a plain dict that ``torch.load(weights_only=True)`` reads (tensors, numbers, strings, lists, dicts):

    format        "visionmamba/1"
    model         state_dict of the unwrapped model (no ``module.`` / ``_orig_mod.`` prefixes)
    model_ema     state_dict of the EMA copy, or None
    optimizer, scheduler, scaler   their state_dicts (scaler None without a GradScaler)
    epoch         epochs completed (resume starts at this epoch index)
    step_in_epoch optimizer updates done in epoch index ``epoch`` (0 at an epoch boundary; > 0 in a mid-epoch
                  checkpoint, written every ``checkpoint_every_steps`` updates or on preemption)
    global_step   optimizer updates completed
    best_top1, best_epoch, metrics  best non-EMA val top-1 so far and the last evaluation
    model_name    registry name;  config: the resolved run config (plain dict)
    derived       values computed from config and machine: global_batch, lr, world_size, steps_per_epoch
    rng           per-rank RNG snapshots (list indexed by rank): ``global`` python/numpy/torch(/cuda) at the save,
                  ``data`` the data-order generators as they were when epoch ``epoch``'s pass over the data began
    partial_epoch per-rank running sums of a mid-epoch checkpoint (epoch loss, skipped updates, log window),
                  so the resumed epoch reports the same averages as an uninterrupted one; None at a boundary

:func:`load_checkpoint` reads our files for auto-resume (exact, strict); :func:`load_weights` is the single entry
point that puts the weights of a checkpoint file of any supported format into a model (validate.py, init_from).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

# One error type for every checkpoint problem; foreign formats and their adaptation live with the models.
from .models._pretrained import CheckpointError, LoadReport, load_pretrained, read_checkpoint
from .optim import align_optimizer_state

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointManager",
    "apply_weights",
    "atomic_save",
    "capture_training_state",
    "clean_state_dict",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint_info",
    "resolve_checkpoint",
    "restore_training_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "visionmamba/1"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?\.pth$")
# atomic_save's temporary files: ".<name>.tmp<pid>"; a kill -9 during a write leaves one behind
_TEMP_FILE = re.compile(r"^\.(?:epoch_\d+(?:_step_\d+)?|best)\.pth\.tmp\d+$")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``.

    A crash (or kill -9) mid-write leaves either the old file or the new one, never a truncated ``path``;
    the directory fsync makes the rename itself survive a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read one of our checkpoints safely (``weights_only=True``); unreadable or foreign files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle of foreign classes, disk error: all mean "cannot use this file"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a visionmamba checkpoint (no 'model' entry)")
    return state


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) so keys match the bare model."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint file as given, or for a run directory its newest valid rolling checkpoint (the last epoch's
    state, as the official multi-stage hand-over uses)."""
    path = Path(source)
    if path.is_dir():
        latest = CheckpointManager(path / "checkpoints" if (path / "checkpoints").is_dir() else path).find_latest()
        if latest is None:
            raise CheckpointError(f"{path} is a directory without a usable epoch_*.pth checkpoint")
        return latest[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_checkpoint_info(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint file of any supported format once: ``(loaded object, info)``.

    ``info`` holds ``format`` ("visionmamba" or "foreign"), and for our files the ``model_name``, the recorded run
    ``config`` and ``epoch`` (None otherwise). Pass the object on to :func:`load_weights` to avoid a second read.
    """
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    ours = isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT
    info = {
        "format": "visionmamba" if ours else "foreign",
        "model_name": obj.get("model_name") if ours else None,
        "config": obj.get("config") if ours else None,
        "epoch": obj.get("epoch") if isinstance(obj, Mapping) else None,
    }
    return obj, info


def load_weights(model: nn.Module, path: str | os.PathLike, *, use_ema: bool = False, trust_pickle: bool = False,
                 drop_mismatched_head: bool = False, checkpoint: Any = None) -> LoadReport:
    """The one way a checkpoint file's weights get into a model (validate.py, ``init_from``).

    Any supported format: ours, the official Vim / ShuffleMamba / Mamba-Reg files (pickled ``args``: needs
    ``trust_pickle``), bare state_dicts, safetensors. Wrapper prefixes are stripped and position embeddings resized
    to the model's grid; with ``drop_mismatched_head`` a classifier of another size is dropped (fine-tuning),
    otherwise it is an error. Anything else that does not fit raises CheckpointError listing every key.

    Args:
        use_ema: the EMA weights instead of the raw ones (an error if the file has none).
        checkpoint: the object :func:`read_checkpoint_info` already read from ``path``.
    Returns:
        the report of what was resized or dropped.
    """
    return load_pretrained(model, path, use_ema=use_ema, trust_pickle=trust_pickle,
                           drop_mismatched_head=drop_mismatched_head, checkpoint=checkpoint)


def apply_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Strict ``load_state_dict`` whose error lists what does not fit (another architecture, size or class count)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        parts = [f"{name} {show(items)}" for name, items in
                 (("missing keys:", missing), ("unexpected keys:", unexpected), ("shape mismatches:", mismatched))
                 if items]
        raise CheckpointError(f"{source} does not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state_dict)


def capture_training_state(*, model: nn.Module, ema: Any, optimizer: Any, scheduler: Any,
                           scaler: Any) -> dict[str, Any]:
    """The object part of a checkpoint (``model``, ``model_ema``, ``optimizer``, ``scheduler``, ``scaler``)."""
    return {
        "model": model.state_dict(),
        "model_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def restore_training_state(state: dict[str, Any], *, model: nn.Module, ema: Any, optimizer: Any, scheduler: Any,
                           scaler: Any, source: str = "checkpoint") -> None:
    """Inverse of :func:`capture_training_state`. The weights must fit exactly (see :func:`apply_weights`); an EMA or
    scaler the file lacks (switched on since) starts fresh from the current weights / defaults."""
    apply_weights(model, clean_state_dict(state["model"]), source=source)
    if ema is not None and state.get("model_ema") is not None:
        ema.module.load_state_dict(clean_state_dict(state["model_ema"]))
    optimizer.load_state_dict(align_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])


class CheckpointManager:
    """Rotating checkpoints of one run in ``directory``.

    Files: ``epoch_NNNN.pth`` after each saved epoch (NNNN = epochs completed) and, within an epoch,
    ``epoch_NNNN_step_SSSSSS.pth`` (NNNN epochs completed, SSSSSS optimizer updates done in the next one; written
    every ``checkpoint_every_steps`` updates or on preemption). They sort by (epoch, step); the newest ``keep_last``
    of them are kept, plus every ``save_every``-th epoch-end file for good; ``best.pth`` holds the state with the
    best non-EMA val top-1. Only global rank 0 calls :meth:`save`; every rank may call :meth:`find_latest` on a
    shared filesystem.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, save_every: int = 0):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.save_every = save_every

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pth"

    def epoch_path(self, epoch: int, step: int = 0) -> Path:
        """``epoch_NNNN.pth`` at an epoch boundary, ``epoch_NNNN_step_SSSSSS.pth`` ``step`` updates into the next."""
        return self.directory / (f"epoch_{epoch:04d}.pth" if step == 0 else f"epoch_{epoch:04d}_step_{step:06d}.pth")

    def save(self, state: dict[str, Any], *, epoch: int, is_best: bool, step: int = 0) -> Path:
        state = {"format": CHECKPOINT_FORMAT, **state}
        path = atomic_save(state, self.epoch_path(epoch, step))
        if is_best:
            atomic_save(state, self.best_path)
        self._prune()
        return path

    def list_epoch_files(self) -> list[Path]:
        """Rotating checkpoint files, oldest first (by epoch, then step)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _EPOCH_FILE.match(path.name)
            if match:
                found.append(((int(match.group(1)), int(match.group(2) or 0)), path))
        return [path for _, path in sorted(found)]

    def _prune(self) -> None:
        files = self.list_epoch_files()
        for path in files[:-self.keep_last]:
            match = _EPOCH_FILE.match(path.name)
            epoch, step = int(match.group(1)), int(match.group(2) or 0)
            if self.save_every and step == 0 and epoch % self.save_every == 0:
                continue  # a permanent "every N epochs" snapshot
            path.unlink(missing_ok=True)

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of writes that a kill -9 or a power loss cut short (they are never read:
        the rename that would have published them did not happen). Call on rank 0 before training starts."""
        removed = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if _TEMP_FILE.match(path.name):
                    path.unlink(missing_ok=True)
                    removed.append(path)
        if removed:
            log.warning("removed %d unfinished checkpoint write(s) of an earlier process: %s", len(removed),
                        ", ".join(p.name for p in removed))
        return removed

    def find_latest(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """Newest checkpoint that loads: ``(path, state)``, or None. Unreadable newer files are skipped loudly."""
        for path in reversed(self.list_epoch_files()):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping unusable checkpoint: %s", exc)
        return None
