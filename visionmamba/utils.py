"""Small helpers shared by the scripts and the engine: seeding, RNG snapshots, config diffs, logging, memory."""
from __future__ import annotations

import json
import logging
import random
import resource
import sys
from typing import Any, Mapping, Optional

import numpy as np
import torch

__all__ = [
    "COMPILE_MODES",
    "config_differences",
    "flatten_config",
    "format_duration",
    "get_loader_rng_state",
    "get_rng_state",
    "peak_memory_gb",
    "seed_everything",
    "set_loader_rng_state",
    "set_rng_state",
    "setup_logging",
]


# torch.compile's modes, as train.py's ``compile=`` and the benchmarks accept them
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch with ``seed + rank`` (the DeiT convention) and return it.

    Different ranks must draw different augmentations and drop-path masks; the model init happens before DDP
    broadcasts rank 0's weights, so a per-rank seed does not make the starting weights differ.
    """
    rank_seed = int(seed) + int(rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    return rank_seed


def get_rng_state() -> dict[str, Any]:
    """A snapshot of every RNG the training loop draws from, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                        for k, v in np_state["state"].items()}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`get_rng_state` snapshot (tolerates one taken on a machine with/without CUDA)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = dict(state["numpy"])
    np_state["state"] = {k: (np.asarray(v, dtype=np.uint32) if isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def get_loader_rng_state(loader) -> dict[str, Any]:
    """States of the generators that decide a DataLoader's next sampling order and worker seeds."""
    sampler_gen = getattr(loader.sampler, "generator", None)
    return {
        "loader": loader.generator.get_state() if loader.generator is not None else None,
        "sampler": sampler_gen.get_state() if isinstance(sampler_gen, torch.Generator) else None,
    }


def set_loader_rng_state(loader, state: dict[str, Any]) -> None:
    if state.get("loader") is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])
    sampler_gen = getattr(loader.sampler, "generator", None)
    if state.get("sampler") is not None and isinstance(sampler_gen, torch.Generator):
        sampler_gen.set_state(state["sampler"])


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists become JSON, None becomes ``null`` (e.g. for MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        elif value is None:
            flat[name] = "null"
        else:
            flat[name] = str(value)
    return flat


def config_differences(old: Mapping[str, Any],
                       new: Mapping[str, Any]) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """``{flattened key: (old value, new value)}`` for every key whose value differs (None where absent)."""
    before, after = flatten_config(old), flatten_config(new)
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Rank 0 logs at ``level``; other ranks only warnings and errors, tagged with their rank.

    Hydra has already installed its console/file handlers; we only adjust levels and add a console handler when
    running outside Hydra (library use, tests).
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    if rank != 0:
        for handler in root.handlers:
            handler.addFilter(_RankFilter(rank))
            handler.setFormatter(logging.Formatter(f"[rank {rank}][%(name)s][%(levelname)s] - %(message)s"))


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank in GiB: CUDA ``max_memory_allocated`` on a GPU, the process's peak RSS on CPU.

    On CPU there is no allocator counter; peak RSS is the closest figure (it also counts the Python runtime).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux
