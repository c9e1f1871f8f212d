"""How the training model is spread over the ranks of a torchrun job: DDP (default) or FSDP2.

``ddp``: every rank holds the whole model, optimizer state and EMA; gradients are all-reduced in buckets of
``bucket_cap_mb`` while the backward pass is still running (a bucket starts as soon as all its gradients exist, so
communication overlaps the remaining backward compute). The fastest choice whenever the model fits, i.e. for every
model of this repository on 80-141 GB GPUs.

``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every block (the outermost ``*Block`` modules: Vim/ShuffleMamba
``layers.i``, VMamba ``layers.i.blocks.j``, MambaOut ``stages.i.blocks.j``), then on the root. Each rank stores
1/world of the parameters, gradients and AdamW state; a block's weights are all-gathered just before its forward
(and again for its backward) and freed afterwards, and gradients are reduce-scattered. It saves memory for the large
models (ShuffleMamba-L: 340M parameters) or larger per-GPU batches, at the price of the extra all-gathers.

Both strategies write the same checkpoint file (full, unsharded state dicts, gathered on global rank 0; the
optimizer state keyed by parameter index as ``optimizer.state_dict()`` gives it), so a run can be resumed under the
other strategy and ``validate.py`` reads either. Nothing here knows about Hydra.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "STRATEGIES",
    "ParallelOptions",
    "block_modules",
    "broadcast_module_state",
    "capture_sharded_training_state",
    "fsdp2_available",
    "is_sharded",
    "reshard_after_eval",
    "shard_for_training",
    "shard_model",
    "wrap_ddp",
]

STRATEGIES = ("ddp", "fsdp2")
_FSDP_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# static_graph=True together with DDP.no_sync() (our gradient accumulation) crashes on the first backward with
# "expect_autograd_hooks_ INTERNAL ASSERT FAILED" and, once that is patched, silently stops all-reducing gradients
# (a regression since torch 2.1, reproduced with torch 2.15; the upstream fix is this pull request, open).
STATIC_GRAPH_NO_SYNC_ISSUE = "https://github.com/pytorch/pytorch/pull/187732"


@dataclass(frozen=True)
class ParallelOptions:
    """The ``distributed:`` block of conf/train.yaml (see there for what each knob does and why the defaults)."""
    strategy: str = "ddp"
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    find_unused_parameters: bool = False
    broadcast_buffers: bool = True
    fsdp_param_dtype: Optional[str] = None
    fsdp_reduce_dtype: Optional[str] = None
    fsdp_reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if isinstance(self.bucket_cap_mb, bool) or not isinstance(self.bucket_cap_mb, (int, float)) \
                or self.bucket_cap_mb <= 0:
            raise ValueError(f"distributed.bucket_cap_mb must be a number > 0, got {self.bucket_cap_mb!r}")
        for name in ("gradient_as_bucket_view", "static_graph", "find_unused_parameters", "broadcast_buffers",
                     "fsdp_reshard_after_forward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"distributed.{name.replace('fsdp_', 'fsdp.')} must be true or false, "
                                 f"got {getattr(self, name)!r}")
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            if getattr(self, name) not in _FSDP_DTYPES:
                raise ValueError(f"distributed.{name.replace('fsdp_', 'fsdp.')} must be null, fp32, bf16 or fp16, "
                                 f"got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, mapping: Optional[Mapping[str, Any]]) -> "ParallelOptions":
        """From the config block (a dict; ``fsdp`` nested). Missing keys take the defaults (old run configs)."""
        values = dict(mapping or {})
        fsdp = dict(values.pop("fsdp", None) or {})
        unknown = set(values) - {f for f in cls.__dataclass_fields__ if not f.startswith("fsdp_")}
        unknown |= {f"fsdp.{k}" for k in set(fsdp) - {"param_dtype", "reduce_dtype", "reshard_after_forward"}}
        if unknown:
            raise ValueError(f"unknown distributed option(s): {', '.join(sorted(unknown))}")
        return cls(**values, **{f"fsdp_{k}": v for k, v in fsdp.items()})

    def check(self, *, accum_steps: int) -> None:
        """Combinations that cannot work, as ValueError (train.py turns it into a ConfigError)."""
        if self.strategy == "ddp" and self.static_graph and accum_steps > 1:
            raise ValueError(
                f"distributed.static_graph=true cannot be combined with accum_steps={accum_steps}: PyTorch's DDP "
                f"static graph breaks under no_sync() gradient accumulation ({STATIC_GRAPH_NO_SYNC_ISSUE}); "
                "use static_graph=false (the default)")
        if self.strategy == "fsdp2" and not fsdp2_available():
            raise ValueError(f"distributed.strategy=fsdp2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6); "
                             f"this torch {torch.__version__} lacks it: use strategy=ddp or upgrade torch")

    def ddp_kwargs(self) -> dict[str, Any]:
        return dict(bucket_cap_mb=float(self.bucket_cap_mb), gradient_as_bucket_view=self.gradient_as_bucket_view,
                    static_graph=self.static_graph, find_unused_parameters=self.find_unused_parameters,
                    broadcast_buffers=self.broadcast_buffers)

    def describe(self) -> str:
        if self.strategy == "fsdp2":
            return (f"fsdp2 (fully_shard per block + root; param_dtype={self.fsdp_param_dtype or 'fp32'}, "
                    f"reduce_dtype={self.fsdp_reduce_dtype or 'param dtype'}, "
                    f"reshard_after_forward={self.fsdp_reshard_after_forward})")
        return "ddp (" + ", ".join(f"{k}={v}" for k, v in self.ddp_kwargs().items()) + ")"


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (public since torch 2.6)
    except ImportError:
        return False
    return dist.is_available()


def _is_dtensor(tensor: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be sharded
        return False
    return isinstance(tensor, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """True for a model whose parameters FSDP2 sharded (DTensors); False for a plain or DDP-wrapped model."""
    return any(_is_dtensor(p) for p in module.parameters())


# ------------------------------------------------------------------------------------------------ DDP
def wrap_ddp(model: nn.Module, device: torch.device, options: ParallelOptions) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` with the configured bucket size, gradient views, static graph and buffer sync.
    DDP broadcasts rank 0's parameters and buffers once here, so every replica starts identical."""
    kwargs = options.ddp_kwargs()
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        # newer torch renamed the per-forward buffer broadcast (broadcast_buffers is deprecated there; buffers are
        # synced at construction either way)
        kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               **kwargs)


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank ``src``'s (a collective; a no-op without a process group).

    Each rank seeds with ``seed + rank`` before the model is built, so the initial weights differ per rank until
    someone broadcasts them. DDP does it for the model; FSDP2 does not (it keeps each rank's slice of that rank's
    own tensors), so :func:`shard_for_training` does it first. (The EMA copy needs no broadcast under DDP: timm's
    first EMA update uses decay 0, i.e. copies the synchronised model; it gets one anyway before it is sharded.)"""
    if not dist.is_initialized():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


# ------------------------------------------------------------------------------------------------ FSDP2
def block_modules(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards separately: the outermost modules whose class name ends in ``Block`` (Vim/ShuffleMamba
    ``Block``, ``VSSBlock``, timm ``GatedCNNBlock``, ...). Parameters outside them (patch embed, tokens, position
    embeddings, final norm, head) belong to the root unit."""
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if module is model or not type(module).__name__.endswith("Block"):
            continue
        if any(name.startswith(outer + ".") for outer, _ in blocks):
            continue  # a Block inside a Block: sharded with its parent
        blocks.append((name, module))
    return [module for _, module in blocks]


def _fully_shard(module: nn.Module, mesh: Any, options: ParallelOptions) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: a Block receives (hidden, residual) and the residual stream is kept in fp32 on
    # purpose (residual_in_fp32); FSDP's default would cast it to param_dtype at every block boundary. Autocast
    # still decides the compute dtype of each op, exactly as under DDP.
    policy = MixedPrecisionPolicy(param_dtype=_FSDP_DTYPES[options.fsdp_param_dtype],
                                  reduce_dtype=_FSDP_DTYPES[options.fsdp_reduce_dtype], cast_forward_inputs=False)
    for block in block_modules(module):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=options.fsdp_reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=options.fsdp_reshard_after_forward)


def shard_for_training(model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer, device: torch.device,
                       options: ParallelOptions) -> Any:
    """Shard ``model`` (and the EMA copy the same way) in place with FSDP2; returns the device mesh.

    Called after the optimizer was built and a checkpoint possibly loaded into it (train.py builds everything on
    full tensors first, so resume is the same code for every strategy). ``fully_shard`` replaces each parameter by a
    new DTensor parameter, so the optimizer is re-pointed at those (its param groups, lr schedule and hyper-parameters
    stay) and any optimizer state it holds is sharded alongside.

    The EMA (timm ``ModelEmaV3``) is sharded with the same mesh and blocks: its ``lerp`` then runs on matching local
    shards, it costs 1/world of the memory, and a checkpoint gathers it in full like the model.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    full_optimizer_state = optimizer.state_dict()  # full tensors (a resume put them there) or empty when fresh
    mesh = shard_model(model, device, options)
    if ema is not None:
        shard_model(ema.module, device, options, mesh=mesh)  # a consistent copy even before its first update
    _rebind_optimizer(optimizer, model, names, full_optimizer_state)
    return mesh


def shard_model(model: nn.Module, device: torch.device, options: ParallelOptions, mesh: Any = None) -> Any:
    """Rank 0's weights everywhere, then ``fully_shard`` per block and on the root (in place); returns the 1-D mesh
    over all ranks. Build the optimizer afterwards (or use :func:`shard_for_training`): the parameters are new."""
    from torch.distributed.device_mesh import init_device_mesh

    # Blocks return their input residual stream unchanged when it is already fp32, and FSDP2's input hooks make
    # that tensor a view, so newer torch warns that an in-place op on it would skip an all-gather. Nothing here
    # modifies a block output in place (the residual adds are out of place), so the warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    broadcast_module_state(model)  # fully_shard keeps each rank's slice of its *own* tensors: make them rank 0's
    mesh = mesh if mesh is not None else init_device_mesh(device.type, (dist.get_world_size(),))
    _fully_shard(model, mesh, options)
    return mesh


def _rebind_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, names: dict[int, str],
                      full_state: dict[str, Any]) -> None:
    """Point ``optimizer`` at the sharded parameters of ``model`` and shard its state (same order, same groups)."""
    from torch.distributed.tensor import distribute_tensor

    current = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [current[names[id(p)]] for p in group["params"]]
    optimizer.state.clear()  # keyed by the replaced tensors
    if not full_state["state"]:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded: dict[str, Any] = {"param_groups": full_state["param_groups"], "state": {}}
    for index, entry in full_state["state"].items():
        param = params[index]
        sharded["state"][index] = {
            # exp_avg / exp_avg_sq / momentum have the parameter's full shape: shard them like the parameter (a
            # scatter from rank 0; every rank holds the same full state after a resume). "step" stays as it is.
            key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            if _is_dtensor(param) and torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    optimizer.load_state_dict(sharded)


@torch.no_grad()
def _gathered_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> Optional[dict[str, Any]]:
    """``optimizer.state_dict()`` with every sharded tensor gathered in full (a collective, tensor by tensor, so the
    peak is one full tensor); on CPU where ``keep`` (rank 0), None elsewhere. The same layout DDP checkpoints have."""
    state_dict = optimizer.state_dict()
    gathered: dict[Any, Any] = {}
    for index, entry in state_dict["state"].items():
        out = {}
        for key, value in entry.items():
            if _is_dtensor(value):
                value = value.full_tensor()  # every rank takes part; only rank 0 keeps the result
            if keep:
                out[key] = value.detach().cpu() if torch.is_tensor(value) else value
        gathered[index] = out
    return {"state": gathered, "param_groups": state_dict["param_groups"]} if keep else None


def capture_sharded_training_state(*, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                                   scaler: Any, is_main: bool) -> Optional[dict[str, Any]]:
    """The FSDP2 counterpart of :func:`visionmamba.checkpoint.capture_training_state`: every rank must call it (the
    full state dicts are gathered); global rank 0 gets the same dict a DDP run would save, the others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_on_rank0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0's CPU memory
    model_state = get_model_state_dict(model, options=full_on_rank0)
    ema_state = get_model_state_dict(ema.module, options=full_on_rank0) if ema is not None else None
    optimizer_state = _gathered_optimizer_state(optimizer, keep=is_main)
    if not is_main:
        return None
    return {"model": model_state, "model_ema": ema_state, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}


def reshard_after_eval(module: nn.Module) -> None:
    """FSDP2 keeps the root unit's parameters gathered after a forward without backward (it expects the backward
    next); after evaluation free them and, more importantly, drop that copy: an EMA update changes the shards in
    between, and the next evaluation of the EMA would otherwise run on the stale gathered root parameters."""
    if not is_sharded(module):
        return
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():  # reshard() acts on one unit: the root, and blocks kept gathered
        if isinstance(unit, FSDPModule):  # (fsdp.reshard_after_forward=false)
            unit.reshard()
