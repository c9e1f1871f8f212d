"""Loading weights from checkpoint files: ours, the official Vim / ShuffleMamba / Mamba-Reg formats, bare
state_dicts and timm-style files, with explicit adaptation to the target model.

Official files are ``{'model', 'model_ema', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'}`` where
``args`` is a pickled ``argparse.Namespace``: reading it requires ``torch.load(weights_only=False)``, which can
execute code, so it is only done when the caller passes ``trust_pickle=True``. Everything is reported, nothing
is dropped silently (the official hand-over uses ``strict=False`` and loses mismatches without a word).
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ..layers import resize_grid_embed

log = logging.getLogger(__name__)

# Keys whose shape legitimately changes with the number of classes / head layout; dropped (and reported) when
# they do not fit, as the official fine-tuning code does.
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
# Prefixes added by wrappers: DDP ("module."), torch.compile ("_orig_mod."), timm EMA v3 ("module." as well).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# How a position embedding of another grid is resized (see _adapt_pos_embed).
POS_EMBED_MODES = ("exact", "official")
# Where each checkpoint flavour keeps the raw and the EMA weights.
_RAW_KEYS = ("model", "state_dict", "model_state_dict")
_EMA_KEYS = ("model_ema", "ema", "state_dict_ema", "ema_state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message lists what differs."""


@dataclass
class LoadReport:
    source: str = ""
    weights: str = "model"
    resized: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.weights} weights from {self.source}"]
        for name in ("resized", "dropped", "missing", "unexpected"):
            values = getattr(self, name)
            if values:
                parts.append(f"{name}: {', '.join(values)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON / an MLflow artifact)."""
        return {"source": self.source, "weights": self.weights, "resized": list(self.resized),
                "dropped": list(self.dropped), "missing": list(self.missing), "unexpected": list(self.unexpected),
                "mismatched": list(self.mismatched)}

    def tags(self, prefix: str = "init_from.") -> dict[str, str]:
        """What the hand-over changed, as MLflow tags (``none`` when nothing was resized / dropped)."""
        return {f"{prefix}weights": self.weights, f"{prefix}resized": "; ".join(self.resized) or "none",
                f"{prefix}dropped": "; ".join(self.dropped) or "none"}


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Any:
    """torch.load on CPU, safely by default. Raises CheckpointError with the way to opt in for pickles."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        # The safe unpickler reports "Unsupported global" for Python objects (e.g. argparse.Namespace); any
        # other failure means the bytes themselves are not a readable checkpoint.
        if trust_pickle or "Unsupported global" not in str(exc):
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        raise CheckpointError(
            f"{path} contains pickled Python objects (official Vim/ShuffleMamba/Mamba-Reg files pickle their "
            "argparse 'args'), and unpickling can run arbitrary code, so it is refused by default. If you trust "
            "the file, opt in with trust_checkpoint=true (validate.py / init_from) or --trust-pickle "
            "(scripts/convert_checkpoint.py), or convert it once to a weights-only file with "
            "scripts/convert_checkpoint.py.") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a PyTorch file?): {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(obj: Any, *, use_ema: bool = False) -> tuple[dict[str, Tensor], str]:
    """Pick the raw or EMA weights out of any supported checkpoint layout. Returns (state_dict, which)."""
    if _is_state_dict(obj):
        if use_ema:
            raise CheckpointError("use_ema was requested but this file is a bare state_dict without EMA weights")
        return _strip_prefixes(dict(obj)), "model"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"unsupported checkpoint content of type {type(obj).__name__}")
    keys = _EMA_KEYS if use_ema else _RAW_KEYS
    for key in keys:
        value = obj.get(key)
        if isinstance(value, Mapping) and value:
            # our own EMA entry may be a ModelEmaV3 state_dict ("module." prefix) — stripped below
            return _strip_prefixes(dict(value)), key
    found = ", ".join(k for k, v in obj.items() if isinstance(v, Mapping)) or "none"
    what = "EMA" if use_ema else "model"
    raise CheckpointError(f"no {what} weights in this checkpoint (looked for {', '.join(keys)}; "
                          f"dictionary entries present: {found})")


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _adapt_pos_embed(value: Tensor, model: nn.Module, report: LoadReport, mode: str = "exact") -> Tensor:
    """Resize a plain-sequence model's pos_embed (1, N' + extra, D) to the model's grid (bicubic, as the official
    ``--finetune`` code), keeping the cls row where the model's layout puts it (middle for Vim, first for
    ShuffleMamba, none for registers: their ``pos_embed_cls`` is copied unchanged and the register layout follows
    the new grid at run time).

    ``mode="official"`` reproduces the official fine-tuning code for the middle-cls Vim (spec §4.6 "Vim quirk"): it
    keeps row 0 (the embedding of patch (0,0)) as the "extra token" and interpolates rows 1.. (which include the
    cls row) as the grid — what the published Vim-T+/S+ stride-8 fine-tunes started from. Other layouts resize the
    same way in both modes.
    """
    target = model.pos_embed
    if value.shape == target.shape:
        return value
    cls_position = getattr(model, "cls_position", "none")
    extra = 1 if cls_position in ("middle", "head") else 0
    old_n = value.shape[1] - extra
    side = int(round(old_n ** 0.5))
    if side * side != old_n or value.shape[-1] != target.shape[-1]:
        return value  # not a square grid of this layout: reported as a shape mismatch by the caller
    quirk = mode == "official" and cls_position == "middle"
    if quirk:  # row 0 kept, rows 1.. (patches 1..N-1 and the cls row) treated as the grid
        cls_row, patches = value[:, :1], value[:, 1:]
    elif cls_position == "middle":
        mid = old_n // 2
        cls_row, patches = value[:, mid:mid + 1], torch.cat([value[:, :mid], value[:, mid + 1:]], 1)
    elif cls_position == "head":
        cls_row, patches = value[:, :1], value[:, 1:]
    else:
        cls_row, patches = None, value
    patches = resize_grid_embed(patches, (side, side), model.grid)  # bicubic, align_corners=False
    if cls_row is None:
        out = patches
    elif cls_position == "middle" and not quirk:
        mid = patches.shape[1] // 2
        out = torch.cat([patches[:, :mid], cls_row, patches[:, mid:]], 1)
    else:
        out = torch.cat([cls_row, patches], 1)
    report.resized.append(f"pos_embed {side}x{side}->{model.grid[0]}x{model.grid[1]}"
                          + (" (official Vim row order)" if quirk else ""))
    return out


def adapt_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module, report: LoadReport, *,
                     drop_mismatched_head: bool = True, pos_embed_mode: str = "exact") -> dict[str, Tensor]:
    """Make a foreign state_dict fit ``model``: resize position embeddings, drop a mismatched classifier (and
    the Reg neck when the register reduction differs), and fail with the full list of what does not fit."""
    if pos_embed_mode not in POS_EMBED_MODES:
        raise ValueError(f"pos_embed_mode must be one of {', '.join(POS_EMBED_MODES)}, got {pos_embed_mode!r}")
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    mismatched = []
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if key == "pos_embed" and hasattr(model, "grid"):
            value = _adapt_pos_embed(value, model, report, pos_embed_mode)
        if value.shape != own[key].shape:
            is_head = key in HEAD_KEYS or key in ("neck.weight", "norm_neck.weight")
            if drop_mismatched_head and is_head:
                report.dropped.append(f"{key} {tuple(value.shape)}->{tuple(own[key].shape)}")
                continue
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            continue
        out[key] = value
    # missing: not in the file at all (a key of another shape is listed once, as a shape mismatch)
    report.missing = [k for k in own if k not in state_dict]
    report.mismatched = mismatched
    if mismatched or report.unexpected or report.missing:
        model_name = getattr(model, "model_name", type(model).__name__)
        lines = [f"checkpoint {report.source} does not fit model {model_name}:"]
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:12])
                         + (" ..." if len(mismatched) > 12 else ""))
        if report.missing:
            lines.append(f"  missing keys ({len(report.missing)}): " + ", ".join(report.missing[:12])
                         + (" ..." if len(report.missing) > 12 else ""))
        if report.unexpected:
            lines.append(f"  unexpected keys ({len(report.unexpected)}): " + ", ".join(report.unexpected[:12])
                         + (" ..." if len(report.unexpected) > 12 else ""))
        raise CheckpointError("\n".join(lines))
    return out


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, use_ema: bool = False, trust_pickle: bool = False,
                    drop_mismatched_head: bool = True, checkpoint: Optional[Any] = None,
                    pos_embed_mode: str = "exact") -> LoadReport:
    """Load weights from any supported checkpoint file into ``model`` (strictly, after adaptation).

    Dropped heads are reported (the caller decides whether that is expected, e.g. fine-tuning on a new label
    set); the new head keeps its fresh initialisation. ``pos_embed_mode``: see :func:`_adapt_pos_embed`.
    """
    obj = checkpoint if checkpoint is not None else read_checkpoint(path, trust_pickle=trust_pickle)
    state_dict, which = extract_state_dict(obj, use_ema=use_ema)
    report = LoadReport(source=os.fspath(path), weights=which)
    adapted = adapt_state_dict(state_dict, model, report, drop_mismatched_head=drop_mismatched_head,
                               pos_embed_mode=pos_embed_mode)
    own = model.state_dict()
    for key in report.dropped:
        adapted[key.split(" ")[0]] = own[key.split(" ")[0]]
    model.load_state_dict(adapted, strict=True)
    log.info(report.summary())
    return report
