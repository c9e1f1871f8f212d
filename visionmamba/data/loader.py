"""DataLoader factory: sampler choice, drop_last, worker seeding, mid-epoch resume."""

from __future__ import annotations

import itertools
import logging
import signal
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from .samplers import DistributedEvalSampler, RASampler

_logger = logging.getLogger(__name__)

# Offsets the augmentation seed of each rank; large and odd so that (seed, rank) pairs never collide in practice.
_RANK_SEED_STRIDE = 1_000_003

# Signals that ask the training process to checkpoint and exit (visionmamba.preemption). A scheduler may send them
# to every process of the job, DataLoader workers included; a worker killed by them would crash the main process's
# next fetch before it can save. Workers therefore ignore them and end when the main process shuts them down.
_PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def _ignore_preemption_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    for signum in _PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class _SkipFirstBatches:
    """The loader's batch sampler, of which the next pass (only) drops its first ``skip`` batches.

    The skipped batches' indices are still drawn, so the sampler consumes its generator exactly as in a full pass
    and the remaining batches are the ones an uninterrupted pass would yield; nothing is loaded for them.
    """

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.skip = 0

    def __iter__(self):
        # A generator: the skip is taken at the first next(), not by iter(). A multi-worker DataLoader iterator
        # calls iter() twice when it is created and drops the first result unused.
        skip, self.skip = self.skip, 0
        yield from itertools.islice(iter(self.batch_sampler), skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # the full pass: callers count steps from the epoch's start


class ResumableDataLoader(DataLoader):
    """A DataLoader whose next pass can start after its first ``n`` batches (mid-epoch resume).

    ``len()``, ``.sampler`` and ``.batch_sampler`` are those of a plain DataLoader; :meth:`skip_next_batches`
    affects only the next ``iter()`` (persistent workers included). Restore the sampler/loader generators to
    their state at the start of the interrupted epoch first, and the pass continues exactly where it stopped.
    """

    def skip_next_batches(self, num_batches: int) -> None:
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        self._skipping_sampler().skip = num_batches

    def _skipping_sampler(self) -> _SkipFirstBatches:
        base = super()._index_sampler
        wrapper = self.__dict__.get("_skip_wrapper")
        if wrapper is None or wrapper.batch_sampler is not base:
            wrapper = _SkipFirstBatches(base)
            self.__dict__["_skip_wrapper"] = wrapper
        return wrapper

    @property
    def _index_sampler(self):
        # DataLoader's hook for "where the indices come from" (its iterators read it once, at creation; persistent
        # workers keep that object, which is why the wrapper is one object whose skip applies once).
        return self._skipping_sampler()


def build_loader(
        dataset: Dataset,
        *,
        batch_size: int,
        is_training: bool,
        num_workers: int = 8,
        distributed: bool = False,
        repeated_aug: int = 0,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        drop_last: bool | None = None,
        collate_fn: Callable | None = None,
) -> DataLoader:
    """Builds the DataLoader of one split.

    Samplers:
        * distributed + training: :class:`RASampler` (``num_repeats=repeated_aug``) when ``repeated_aug > 1``,
          else ``DistributedSampler(shuffle=True, seed=seed)``.
        * distributed + eval: :class:`DistributedEvalSampler`, which splits the dataset over ranks without padding
          or duplicates. Ranks may then get different numbers of batches; sum per-rank totals with
          ``all_reduce(SUM)`` after the loop, evaluating the unwrapped model (see the sampler's docstring).
        * single process: ``RandomSampler`` seeded by ``seed`` for training, ``SequentialSampler`` for eval.
          ``repeated_aug`` only applies with ``distributed``, as in the official code.

    Call :func:`set_sampler_epoch` before every training epoch, so distributed samplers reshuffle.

    Seeding: pass the same ``seed`` on every rank; the samplers need it to agree on the permutation. Augmentation
    randomness is seeded separately: the loader's generator is seeded from ``seed`` and the rank, and PyTorch seeds
    ``torch``, ``random`` and ``numpy`` in worker ``w`` with ``base_seed + w``, where ``base_seed`` is drawn from
    that generator for each epoch's iterator. Runs are thus repeatable yet differ per rank, worker and epoch.

    Args:
        dataset: A map-style dataset.
        batch_size: Samples per batch on this rank.
        is_training: Training (shuffling, ``drop_last`` default True) or evaluation loader.
        num_workers: Worker processes; 0 loads in the main process.
        distributed: Split the data over the ranks of the initialized process group.
        repeated_aug: Repeated-augmentation count; values > 1 select :class:`RASampler` when distributed training.
        seed: Seed of sampler order and augmentation (same value on every rank).
        pin_memory: Pin host memory (only honoured when CUDA is available).
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        prefetch_factor: Batches prefetched per worker (only with ``num_workers > 0``).
        drop_last: Drop the last incomplete batch; None means ``is_training``.
        collate_fn: Batch collation (None: PyTorch's default, which stacks equal-size tensors).

    Returns:
        A :class:`ResumableDataLoader`; ``loader.sampler`` is the sampler chosen above. Its workers ignore
        SIGTERM/SIGUSR1 (the main process handles them, see :mod:`visionmamba.preemption`).

    Raises:
        RuntimeError: ``distributed=True`` but ``torch.distributed`` is not initialized.
    """
    if drop_last is None:
        drop_last = is_training
    rank = 0
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs an initialized torch.distributed process group.")
        rank = dist.get_rank()

    sampler: Sampler[int]
    if distributed and is_training and repeated_aug > 1:
        sampler = RASampler(dataset, num_repeats=repeated_aug, seed=seed)
    elif distributed and is_training:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    elif distributed:
        sampler = DistributedEvalSampler(dataset)
    elif is_training:
        if repeated_aug > 1:
            _logger.info("repeated_aug=%d is ignored without distributed training (as in the official code).",
                         repeated_aug)
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)

    worker_kwargs = {}
    if num_workers > 0:
        worker_kwargs = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor,
                         "worker_init_fn": _ignore_preemption_signals}
    loader = ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed + _RANK_SEED_STRIDE * (rank + 1)),
        **worker_kwargs,
    )
    if num_workers > 0 and persistent_workers:
        # The workers ignore SIGTERM, which is how multiprocessing's exit hook stops daemon children before joining
        # them: a loader whose persistent workers are still alive at interpreter exit (a module-level loader, or
        # one kept alive by a traceback) would hang the exit. Shut them down first (weakref.finalize's exit hook
        # runs before multiprocessing's); without a reference, so garbage collection is unaffected.
        weakref.finalize(loader, _shutdown_persistent_workers, weakref.ref(loader))
    return loader


def _shutdown_persistent_workers(loader_ref: weakref.ref) -> None:
    loader = loader_ref()
    iterator = getattr(loader, "_iterator", None) if loader is not None else None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def set_sampler_epoch(loader: DataLoader, epoch: int) -> None:
    """Calls ``loader.sampler.set_epoch(epoch)`` when the sampler has it (distributed samplers)."""
    set_epoch = getattr(loader.sampler, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
