"""Distributed samplers: repeated augmentation for training, an exact (unpadded) split for evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fills in ``(num_replicas, rank)`` from the initialized process group, or ``(1, 0)`` without one."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


class RASampler(Sampler[int]):
    """Repeated-augmentation sampler with DeiT semantics (``deit/samplers.py``).

    Every epoch draws one permutation of the dataset (seeded by ``seed + epoch``, identical on all ranks), repeats
    each index ``num_repeats`` times in a row, and deals the sequence round-robin to the ranks. With
    ``num_replicas >= num_repeats`` the copies of one image therefore land on different ranks, where they get
    different augmentations. Each rank then keeps only its first ``len(dataset) // 256 * 256 // num_replicas``
    indices, so an "epoch" sees about ``1 / num_repeats`` of the unique images, as in the official recipes.

    For datasets under 256 images that length would be 0; it falls back to ``ceil(len(dataset) / num_replicas)``
    (what a ``DistributedSampler`` would give). With ``seed=0`` the order is exactly DeiT's.

    Args:
        dataset: Any sized dataset.
        num_replicas: World size (default: from the process group, else 1).
        rank: This rank (default: from the process group, else 0).
        shuffle: Permute per epoch; False repeats ``0 .. len - 1`` in order.
        num_repeats: Copies of each index per epoch across all ranks.
        seed: Base seed; must be the same on all ranks.
        selected_round: The epoch length per all ranks is rounded down to a multiple of this (DeiT: 256).
    """

    def __init__(
            self,
            dataset: Sized,
            num_replicas: int | None = None,
            rank: int | None = None,
            shuffle: bool = True,
            num_repeats: int = 3,
            seed: int = 0,
            selected_round: int = 256,
    ) -> None:
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.dataset = dataset
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) * num_repeats / self.num_replicas)  # per rank, before selection
        self.total_size = self.num_samples * self.num_replicas
        selected = len(dataset) // selected_round * selected_round // self.num_replicas
        self.num_selected_samples = selected if selected > 0 else math.ceil(len(dataset) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=generator)
        else:
            indices = torch.arange(len(self.dataset))
        indices = torch.repeat_interleave(indices, repeats=self.num_repeats, dim=0).tolist()
        # Pad by wrapping so the sequence splits evenly over the ranks.
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += indices[:padding]
        indices = indices[self.rank:self.total_size:self.num_replicas]  # (num_samples,)
        return iter(indices[:self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of ``epoch``; call it before every epoch on every rank."""
        self.epoch = epoch


class DistributedEvalSampler(Sampler[int]):
    """Splits a dataset over ranks without padding, so each sample is evaluated exactly once.

    Rank ``r`` gets indices ``r, r + world, r + 2 world, ...``; the ranks' lengths differ by at most one. Unlike
    ``DistributedSampler`` (which pads with duplicates so every rank has equal length), the union over ranks is
    the dataset exactly, so metrics are exact if the caller sums per-rank *totals* (e.g. ``correct`` and
    ``count``) with ``all_reduce(SUM)`` and divides afterwards, rather than averaging per-rank means.

    Because ranks may run a different number of batches, evaluate the unwrapped model (not the DDP wrapper, whose
    forward can issue collectives) and do the all-reduce after the loop.

    Args:
        dataset: Any sized dataset.
        num_replicas: World size (default: from the process group, else 1).
        rank: This rank (default: from the process group, else 0).
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.dataset = dataset
        self.num_replicas, self.rank = _world(num_replicas, rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """No-op (the order is fixed); present so callers can treat every sampler alike."""
