"""torchrun process-group setup and the few collectives the training loop needs.

Every helper also works without a process group (plain ``python train.py``): collectives become no-ops and the
process is rank 0 of a world of one. Nothing here knows about Hydra.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "cleanup",
    "env_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "replica_digest",
    "resolve_device",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """Global rank announced by torchrun, readable before the process group exists (Hydra config time)."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this rank's GPU when CUDA is visible, else CPU; ``cuda``/``cpu`` force a choice."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but torch sees no CUDA device (use device=auto or device=cpu)")
    return torch.device("cuda", local_rank)


_GROUPS_SET_UP = 0  # process groups this process has set up (`torchrun train.py -m`: one per sweep job)


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL on CUDA, gloo on CPU. A single process (no WORLD_SIZE or WORLD_SIZE=1) gets no process group at all, so
    one-GPU and CPU runs never depend on a rendezvous.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        # Before init: NCCL binds each rank to the current device, and every later .cuda() lands there.
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        # On GPUs, NCCL for CUDA tensors plus gloo for the small CPU-side collectives (loss/flag sums, metric
        # totals, object broadcasts): with plain "nccl" any CPU tensor collective fails with
        # "No backend type associated with device type cpu".
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_min)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # eager NCCL init: a broken fabric fails here, not at the first all-reduce
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        global _GROUPS_SET_UP
        if restart > 0 or _GROUPS_SET_UP > 0:
            # torchrun --max-restarts: the agent keeps one TCPStore across restart rounds and the workers' keys carry
            # no round number, so restarted ranks would read the dead round's gloo/NCCL addresses and fail to
            # connect (pytorch/pytorch#167288). A per-round key prefix keeps the rounds apart.
            # The same holds for a Hydra sweep under torchrun (`train.py -m`): every job sets up a new group in
            # the same processes on the same store, so each one gets its own prefix too (all ranks count alike).
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=kwargs["timeout"]))
            kwargs["store"] = dist.PrefixStore(f"visionmamba/restart_{restart}/group_{_GROUPS_SET_UP}", store)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        _GROUPS_SET_UP += 1
        log.info("process group up: backend=%s world_size=%d", backend, world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``/``max``/``min``); returns the tensor for chaining. No-op in a world of one."""
    if dist.is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, ordered by rank (e.g. per-rank RNG states for a checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. a decision only rank 0 can take, such as a resume path)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def replica_digest(*modules: Optional[torch.nn.Module]) -> str:
    """SHA-256 over every parameter and buffer of ``modules`` (e.g. the model and its EMA copy; None entries are
    skipped). Equal on all ranks unless replicas drifted apart (a parameter outside DDP, a buffer updated on one
    rank only, an EMA that started from another rank's initialisation, non-deterministic collectives); compare with
    all_gather. An FSDP2-sharded tensor (DTensor) is hashed in full, which gathers it: a collective, so every rank
    must call this with the same modules."""
    digest = hashlib.sha256()
    for index, module in enumerate(m for m in modules if m is not None):
        for name, tensor in sorted(module.state_dict().items()):
            full_tensor = getattr(tensor, "full_tensor", None)
            if callable(full_tensor):
                tensor = full_tensor()
            digest.update(f"{index}.{name}".encode() if index else name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
