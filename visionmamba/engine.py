"""The training step and the evaluation loop, in plain PyTorch (no Hydra, no config objects).

``train.py`` calls :func:`train_one_epoch` and :func:`evaluate`; ``validate.py`` calls the same :func:`evaluate`, so
a checkpoint scores identically in both. Under DDP every rank must call both functions: they hold collectives.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .distributed import all_reduce, get_world_size, is_main_process
from .parallel import reshard_after_eval
from .utils import format_duration, peak_memory_gb

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteLossError",
    "PRECISIONS",
    "amp_dtype_for",
    "build_criterion",
    "evaluate",
    "train_one_epoch",
]

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
NONFINITE_POLICIES = ("skip", "stop")


class NonFiniteLossError(RuntimeError):
    """Raised on every rank at once when the non-finite policy says stop (the decision is collective)."""


def amp_dtype_for(precision: str) -> Optional[torch.dtype]:
    """``bf16``/``fp16`` → the autocast dtype; ``fp32`` → None (autocast off). Parameters always stay fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def build_criterion(*, mixup_active: bool, label_smoothing: float) -> nn.Module:
    """The DeiT choice: soft-target CE under mixup/cutmix (smoothing is folded into the targets by timm's Mixup),
    otherwise label-smoothed CE, otherwise plain CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    """FSDP2's counterpart of ``DDP.no_sync``: keep the micro-step's gradients unsharded and local (no
    reduce-scatter); the last micro-step of the update reduces the accumulated sum once."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (``clip_grad_norm_`` over FSDP2's sharded gradients returns one) as a plain tensor."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def _unwrap(model: nn.Module) -> nn.Module:
    """The parameter-owning module under torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class _Progress:
    """Rank-0 progress: a tqdm bar on a terminal, otherwise one log line every ``log_every`` steps (files, SLURM)."""

    def __init__(self, total: int, desc: str, mode: str, initial: int = 0):
        if mode not in ("auto", "bar", "line", "none"):
            raise ValueError(f"progress must be auto, bar, line or none, got {mode!r}")
        self.enabled = is_main_process() and mode != "none"
        self.use_bar = self.enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.total, self.desc, self.initial = total, desc, initial  # initial: steps done before a resume
        self.start = time.perf_counter()
        self.bar = None
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                            file=sys.stderr)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, done: int, fields: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done - self.initial, 1) * (self.total - done)
        body = "  ".join(f"{k} {v}" for k, v in fields.items())
        log.info("%s [%d/%d] eta %s  %s", self.desc, done, self.total, format_duration(eta), body)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    epoch: int,
    *,
    num_updates: int = 0,
    scheduler: Any = None,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    accum_steps: int = 1,
    clip_grad: Optional[float] = None,
    ema: Any = None,
    mixup_fn: Optional[Callable] = None,
    nonfinite: str = "skip",
    max_consecutive_nonfinite: int = 20,
    log_every: int = 50,
    on_log: Optional[Callable[[dict[str, float], int], None]] = None,
    progress: str = "auto",
    desc: Optional[str] = None,
    start_step: int = 0,
    resume_totals: Optional[dict[str, float]] = None,
    stop_requested: Optional[Callable[[], bool]] = None,
    on_step_end: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns epoch averages and the new ``num_updates`` (optimizer steps so far).

    One optimizer update = ``accum_steps`` micro-batches; a trailing remainder smaller than that is not used, so
    every update has the same effective batch and all ranks run the same number of steps.

    Args:
        model: the module to run forward/backward on (DDP and/or compiled wrapper allowed).
        scheduler: object with ``after_optimizer_step(num_updates)`` (per-step schedules); epoch-level stepping is
            the caller's business.
        scaler: a GradScaler (required for fp16, optional for bf16 to mirror ShuffleMamba); None = plain backward.
        ema: timm ``ModelEmaV3`` updated after every applied optimizer update.
        nonfinite: ``skip`` drops the update when any rank's loss (or, without a scaler, the grad norm) is not
            finite; ``stop`` raises :class:`NonFiniteLossError`. Both are decided by an all-reduce, so every rank
            takes the same branch and DDP never hangs. ``max_consecutive_nonfinite`` skips in a row also stop.
        on_log: called every ``log_every`` updates (and at the end) with global metrics and ``num_updates``.
        start_step: resume an interrupted epoch after this many updates. The first ``start_step * accum_steps``
            batches are skipped without loading them when the loader has ``skip_next_batches``
            (:class:`~visionmamba.data.ResumableDataLoader`); other loaders are read and discarded (the position is
            right, but the augmentation draws of the discarded batches are spent).
        resume_totals: the ``totals`` of the ``on_step_end`` call the epoch is resumed from: the epoch averages
            and log windows then come out as in an uninterrupted epoch.
        stop_requested: polled once per update on every rank (e.g. "a preemption signal arrived"); the answers
            travel in the per-step all-reduce, so when any rank says yes, all ranks stop after the same update.
        on_step_end: called on every rank after every update with ``{"step": updates done in this epoch,
            "num_updates", "stop": the collective stop decision, "totals": the running sums to resume from}``,
            e.g. to write a mid-epoch checkpoint (a collective callback is fine: all ranks call it together).
            After a ``stop`` the epoch ends early and the result has ``stopped=True``.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    model.train()
    module = _unwrap(model)
    params = [p for p in module.parameters() if p.requires_grad]
    world_size = get_world_size()
    steps = len(loader) // accum_steps
    if steps == 0:
        raise ValueError(f"the train loader has {len(loader)} batches per rank, fewer than accum_steps={accum_steps}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} is outside this epoch's {steps} updates")
    # no_sync skips DDP's gradient all-reduce (FSDP2: the reduce-scatter) on the micro-steps whose gradients are
    # only accumulated.
    no_sync = getattr(model, "no_sync", None)
    if no_sync is None and accum_steps > 1 and hasattr(module, "set_requires_gradient_sync"):
        no_sync = lambda: _fsdp_no_sync(module)  # noqa: E731

    bar = _Progress(steps, desc or f"epoch {epoch}", progress, initial=start_step)
    resumed = resume_totals or {}
    # epoch sums on the host, reduced once at the end
    loss_total = torch.tensor(float(resumed.get("loss_sum", 0.0)), dtype=torch.float64)
    loss_count = int(resumed.get("loss_count", 0))
    # (loss sum, loss count, images) since the last log line
    window = torch.tensor([float(resumed.get("window_loss_sum", 0.0)), float(resumed.get("window_loss_count", 0.0)),
                           0.0], dtype=torch.float64)
    window_start = time.perf_counter()
    epoch_start = window_start
    images_seen = 0
    skipped = int(resumed.get("skipped", 0))
    consecutive_skipped = int(resumed.get("consecutive_skipped", 0))
    grad_norm = None
    stopped = False
    steps_done = start_step
    data_iter = iter(()) if start_step == steps else _iter_from(loader, start_step * accum_steps)

    for step in range(start_step, steps):
        step_loss = torch.zeros((), device=device)
        step_images = 0
        for micro in range(accum_steps):
            # a new iteration for CUDA-graph trees (compile=reduce-overhead): nothing of the previous replay is read
            # after this point (the loss was accumulated into step_loss); a counter bump otherwise
            torch.compiler.cudagraph_mark_step_begin()
            images, targets = next(data_iter)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            sync = no_sync is None or micro == accum_steps - 1
            with contextlib.nullcontext() if sync else no_sync():
                with _autocast(device, amp_dtype):
                    output = model(images)
                    loss = criterion(output, targets)
                step_loss += loss.detach().float()
                scaled = loss / accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step_images += images.shape[0]
        step_loss /= accum_steps

        unscaled = False
        if clip_grad is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                unscaled = True
            grad_norm = _local_value(torch.nn.utils.clip_grad_norm_(params, clip_grad))
        # Non-finite check, agreed by all ranks in one all-reduce (this is also the step's only host sync).
        # A non-finite grad norm under a GradScaler is ordinary fp16 overflow: the scaler skips that step itself.
        # The third entry carries this rank's stop request (preemption), so the ranks agree on it for free.
        flags = torch.stack([
            (~torch.isfinite(step_loss)).float(),
            (~torch.isfinite(grad_norm)).float() if grad_norm is not None and scaler is None
            else torch.zeros((), device=device),
            torch.full((), float(bool(stop_requested is not None and stop_requested())), device=device),
        ])
        bad_loss, bad_norm, stop = all_reduce(flags, "sum").tolist()
        if bad_loss or bad_norm:
            skipped += 1
            consecutive_skipped += 1
            what = "loss" if bad_loss else "gradient norm"
            if nonfinite == "stop" or consecutive_skipped >= max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite {what} at epoch {epoch} step {step} (update {num_updates}); "
                    f"{consecutive_skipped} consecutive non-finite step(s), policy nonfinite={nonfinite}")
            log.warning("non-finite %s at epoch %d step %d on %d rank(s): update skipped (%d this epoch)",
                        what, epoch, step, int(max(bad_loss, bad_norm)), skipped)
            if unscaled:
                scaler.update()  # close the scaler's unscale_ bookkeeping; it also backs the scale off on inf
            optimizer.zero_grad(set_to_none=True)
        else:
            consecutive_skipped = 0
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = step_loss.item()
            loss_total += loss_value
            loss_count += 1
            window += torch.tensor([loss_value, 1.0, 0.0], dtype=torch.float64)
            if ema is not None:
                ema.update(module, step=num_updates + 1)
        window[2] += step_images
        images_seen += step_images
        # Skipped updates still count, so a per-step schedule stays aligned with epochs.
        num_updates += 1
        if scheduler is not None:
            scheduler.after_optimizer_step(num_updates)
        bar.step()

        if (step + 1) % log_every == 0 or step + 1 == steps:
            # Global numbers, identical in the progress line and MLflow: the loss is the mean over every rank's
            # updates (each the mean of an equal-sized batch: training loaders drop the last partial batch, so this
            # is the mean over all ranks' samples), img/s counts all ranks' images over the slowest rank's time,
            # and memory is the largest rank's peak.
            totals = all_reduce(window.clone(), "sum").tolist()
            elapsed, peak_gb = all_reduce(torch.tensor([time.perf_counter() - window_start, peak_memory_gb(device)],
                                                       dtype=torch.float64), "max").tolist()
            metrics = {
                "train/loss": totals[0] / max(totals[1], 1.0),
                "train/lr": max(group["lr"] for group in optimizer.param_groups),
                "throughput/img_per_s": totals[2] / max(elapsed, 1e-9),
                "memory/max_allocated_gb": peak_gb,
            }
            metrics["throughput/img_per_s_per_gpu"] = metrics["throughput/img_per_s"] / world_size
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            if on_log is not None:
                on_log(metrics, num_updates)
            bar.report(step + 1, {
                "loss": f"{metrics['train/loss']:.4f}", "lr": f"{metrics['train/lr']:.3g}",
                "img/s": f"{metrics['throughput/img_per_s']:.0f}", "mem": f"{metrics['memory/max_allocated_gb']:.1f}G",
            })
            window.zero_()
            window_start = time.perf_counter()
        steps_done = step + 1
        if on_step_end is not None:
            on_step_end({"step": steps_done, "num_updates": num_updates, "stop": bool(stop), "totals": {
                "loss_sum": float(loss_total), "loss_count": loss_count, "skipped": skipped,
                "consecutive_skipped": consecutive_skipped, "window_loss_sum": float(window[0]),
                "window_loss_count": float(window[1])}})
        if stop:
            stopped = True
            break
    bar.close()

    epoch_time = all_reduce(torch.tensor([time.perf_counter() - epoch_start], dtype=torch.float64), "max").item()
    totals = all_reduce(torch.tensor([float(loss_total), loss_count, images_seen], dtype=torch.float64), "sum")
    return {
        "loss": (totals[0] / max(totals[1], 1.0)).item(),
        "lr": max(group["lr"] for group in optimizer.param_groups),
        "img_per_s": totals[2].item() / max(epoch_time, 1e-9),
        "epoch_time_s": epoch_time,
        "skipped_steps": float(skipped),
        "num_updates": num_updates,
        "steps_done": steps_done,
        "stopped": stopped,
    }


def _iter_from(loader: Iterable, num_batches: int):
    """An iterator over ``loader`` that starts after its first ``num_batches`` batches."""
    if num_batches == 0:
        return iter(loader)
    skip = getattr(loader, "skip_next_batches", None)
    if skip is not None:
        skip(num_batches)
        return iter(loader)
    log.warning("the loader cannot skip batches without loading them: reading and discarding %d batches",
                num_batches)
    data_iter = iter(loader)
    for _ in range(num_batches):
        next(data_iter)
    return data_iter


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    amp_dtype: Optional[torch.dtype] = None,
    progress: str = "auto",
    desc: str = "eval",
    lockstep: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 (%), mean cross-entropy and global img/s over the whole evaluation set.

    Exact under DDP when each rank's loader holds a disjoint shard (``DistributedEvalSampler``: no padding, no
    duplicates): per-rank sums are all-reduced once at the end, so shards may differ in size. Pass the unwrapped
    model (not the DDP wrapper): evaluation needs no gradient sync and must not broadcast buffers.

    ``lockstep``: the forward itself holds collectives (an FSDP2-sharded model all-gathers each block), so every
    rank must run the same number of forwards: a rank whose shard has fewer batches repeats its last batch until
    the others are done, and those extra outputs are not counted. The FSDP2 root's gathered parameters are freed
    at the end.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, samples
    bar = _Progress(len(loader), desc, progress)  # a bar on a terminal; no periodic lines for a short pass
    start = time.perf_counter()
    padding_forwards = 0
    if lockstep:
        most = int(all_reduce(torch.tensor([len(loader)], dtype=torch.int64, device=device), "max").item())
        padding_forwards = most - len(loader)
        if padding_forwards and len(loader) == 0:
            raise ValueError("this rank's evaluation shard is empty (fewer samples than ranks), so it cannot take "
                             "part in a sharded model's forward passes")
    images = None
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hits = topk.eq(targets[:, None])
        sums += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=-1).sum().double(),
            torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device),
        ])
        bar.step()
    for _ in range(padding_forwards):  # keep the other ranks' all-gathers company; the output is discarded
        with _autocast(device, amp_dtype):
            model(images)
    bar.close()
    if lockstep:
        reshard_after_eval(_unwrap(model))
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    all_reduce(sums, "sum")
    all_reduce(elapsed, "max")  # global throughput = all images / the slowest rank's wall time
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return {
        "top1": 100.0 * c1 / n,
        "top5": 100.0 * c5 / n,
        "loss": loss / n,
        "img_per_s": n / max(elapsed.item(), 1e-9),
        "num_samples": int(n),
    }
