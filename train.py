"""Train a Vision Mamba model from the Hydra config in conf/.

    python train.py experiment=digits_quickstart                                          # CPU quick start
    torchrun --nproc_per_node=8 train.py model=vim_tiny data=imagefolder data.root=/data/imagenet
    python train.py -m regularizer.shuffle.rate=0,0.1,0.3,0.5 model=shufflemamba_tiny ...  # one run per value

This file only turns the config into objects (the `build_*` functions, also used by validate.py and the tests)
and runs the epoch loop; the step itself lives in visionmamba/engine.py.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationResolutionError,
                              MissingMandatoryValue)
from timm.utils import ModelEmaV3

from visionmamba.checkpoint import (CheckpointError, CheckpointManager, capture_training_state, load_checkpoint,
                                    load_weights, resolve_checkpoint, restore_training_state)
from visionmamba.data import (DECODE_MODES, DatasetError, build_dataset, build_device_transform,
                              build_gpu_decode_loader, build_loader, build_mixup, build_transform, set_sampler_epoch)
from visionmamba.distributed import (DistInfo, all_gather_object, all_reduce, barrier, broadcast_object, cleanup,
                                     env_rank, init_distributed, replica_digest)
from visionmamba.engine import NonFiniteLossError, amp_dtype_for, build_criterion, evaluate, train_one_epoch
from visionmamba.flops import model_complexity
from visionmamba.models import UnknownModelError, create_model
from visionmamba.models._pretrained import LoadReport
from visionmamba.ops import KernelUnavailableError, resolve_backend
from visionmamba.optim import build_optimizer, build_scheduler, scale_lr
from visionmamba.parallel import (ParallelOptions, capture_sharded_training_state, is_sharded, shard_for_training,
                                  wrap_ddp)
from visionmamba.preemption import Preempted, PreemptionHandler, exit_code_for
from visionmamba.tracking import Tracker, git_commit
from visionmamba.utils import (COMPILE_MODES, config_differences, flatten_config, get_loader_rng_state,
                               get_rng_state, seed_everything, set_loader_rng_state, set_rng_state, setup_logging)

log = logging.getLogger("train")


class ConfigError(ValueError):
    """A config value that cannot work; raised before any file of the run is written."""


# Errors that are the user's input, not a bug: reported as one line and exit status 2 (no traceback).
USER_ERRORS = (ConfigError, UnknownModelError, DatasetError, CheckpointError, KernelUnavailableError,
               NonFiniteLossError, MissingMandatoryValue, InterpolationResolutionError)


def swept_overrides(job_overrides: list[str]) -> str:
    """The sweep job's directory name: its overrides minus those fixed on the command line, i.e. the swept values
    (``a=1,2``, ``range()``, ``choice()`` or ``hydra.sweeper.params``), e.g. ``regularizer.shuffle.rate=0.3``.
    Names stay short, and a re-run of the same sweep lands in the same directories (auto-resume)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - Hydra itself reports a malformed command line
        parsed = []
    fixed = {o.key_or_group for o in parsed if not o.is_sweep_override()}
    swept = [o for o in job_overrides if o.split("=", 1)[0].lstrip("+~") not in fixed]
    return ",".join(swept).replace("/", "_") or "job"


def register_resolvers() -> None:
    """Resolvers the YAML files use. Hydra resolves ``hydra.*`` before our code runs, on every torchrun rank, so
    the rank comes from torchrun's environment: only rank 0 writes the run's log file."""
    if not OmegaConf.has_resolver("vm_rank_zero_file"):
        OmegaConf.register_new_resolver("vm_rank_zero_file", lambda path: path if env_rank() == 0 else os.devnull)
        OmegaConf.register_new_resolver("vm_swept_overrides", lambda overrides: swept_overrides(list(overrides)))


register_resolvers()


def user_error_message(exc: BaseException) -> str:
    """The message of a user error. One raised in a DataLoader worker comes back wrapped by PyTorch ("Caught X in
    DataLoader worker process N." + the worker's traceback): keep only the original message."""
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and " in DataLoader worker process " in lines[0]:
        last = lines[-1].strip()  # "package.module.ErrorClass: the original message"
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


@contextmanager
def reported_user_errors():
    """Turn user errors into ``error: <one line>`` and exit status 2; real bugs keep their traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        # the first line says what is wrong; some errors add detail lines (e.g. every key that does not fit)
        log.error("error: %s", user_error_message(exc))
        sys.exit(2)


# ---------------------------------------------------------------------------------------------- command line
_CLI_RAISES_HYDRA_ERRORS = False


def describe_config_error(exc: Exception) -> str:
    """One line for a command line that does not compose: unknown group choice or key (with the valid ones and the
    closest matches), or override syntax."""
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, choice = exc.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(choice, exc.options, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"unknown {group}={choice}{hint}; valid {group} options: {', '.join(exc.options)}"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {exc.message.splitlines()[0]}"
    cause = exc.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(cause):
        parent = cause.parent_node
        keys = [str(k) for k in parent.keys() if k != "hydra"] if parent is not None else []
        close = difflib.get_close_matches(str(cause.key), keys, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        prefix = cause.full_key.rpartition(".")[0]
        where = f"of {prefix}" if prefix else "at the top level"
        return (f"unknown config option {cause.full_key!r}{hint}; valid keys {where}: {', '.join(keys)} "
                f"(+{cause.full_key}=... adds a new key on purpose)")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return "; ".join(lines) or type(exc).__name__


def run_cli(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point; a command line that does not compose (unknown option or group choice,
    bad override syntax) becomes one ``error:`` line and exit status 2 instead of Hydra's multi-line report.

    Hydra prints composition errors itself unless ``HYDRA_FULL_ERROR=1``; we set it until the task function starts
    (:func:`release_hydra_errors`), so errors inside the job still get Hydra's usual report. A user who sets
    ``HYDRA_FULL_ERROR=1`` gets Hydra's full output for everything, as documented by Hydra.
    """
    global _CLI_RAISES_HYDRA_ERRORS
    if os.environ.get("HYDRA_FULL_ERROR"):
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _CLI_RAISES_HYDRA_ERRORS = True
    try:
        hydra_main()
    except (ConfigCompositionException, OverrideParseException) as exc:
        print(f"error: {describe_config_error(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        release_hydra_errors()


def release_hydra_errors() -> None:
    """Undo :func:`run_cli`'s ``HYDRA_FULL_ERROR`` once the config composed (called first thing in the job)."""
    global _CLI_RAISES_HYDRA_ERRORS
    if _CLI_RAISES_HYDRA_ERRORS:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        _CLI_RAISES_HYDRA_ERRORS = False


# ------------------------------------------------------------------------------------------ builders: cfg → objects
def build_model(model_cfg: DictConfig) -> torch.nn.Module:
    """``create_model(name, **overrides)``; ``null`` overrides mean the model's default."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    name = kwargs.pop("name")
    try:
        return create_model(name, **kwargs)
    except UnknownModelError:
        raise
    except (TypeError, ValueError) as exc:  # an override this model cannot take (e.g. shuffle on a 2-D model)
        raise ConfigError(f"model={name}: {exc} ({type(exc).__name__}; model options {kwargs})") from exc


def check_image_size(model: torch.nn.Module, img_size: int, name: str) -> None:
    """Images of ``img_size`` px must fit the model (e.g. hold one patch, or enough patches for the registers):
    checked when the job is built, not at the first forward after the run directory was written."""
    check = getattr(model, "check_img_size", None) or getattr(getattr(model, "patch_embed", None),
                                                              "check_img_size", None)
    if check is not None:
        try:
            check(img_size)
        except ValueError as exc:
            raise ConfigError(f"data.img_size={img_size} does not fit model={name}: {exc}") from exc


def build_data(data_cfg: DictConfig, reg_cfg: Optional[DictConfig], split: str, *, batch_size: int, workers: int,
               distributed: bool, seed: int = 0, device: Optional[torch.device] = None):
    """Dataset + loader of one split. Training augmentation comes from the regularizer group (``reg_cfg``).

    ``data.decode=gpu``: the workers only read the JPEG bytes; batches are decoded and augmented on ``device``
    (default: this process's GPU, else the CPU) and the loader yields them there (visionmamba/data/gpu_decode.py)."""
    is_training = split == "train"
    decode = data_cfg.get("decode") or "cpu"  # configs recorded before data.decode existed mean cpu
    if decode not in DECODE_MODES:
        raise ConfigError(f"data.decode={decode!r} is not one of {', '.join(DECODE_MODES)}")
    use_gpu_decode = decode == "gpu"
    if use_gpu_decode and (data_cfg.name == "synthetic" or data_cfg.get("in_chans", 3) != 3):
        raise ConfigError(f"data.decode=gpu decodes RGB image files; data={data_cfg.name} with "
                          f"in_chans={data_cfg.get('in_chans', 3)} needs data.decode=cpu")
    make_transform = build_device_transform if use_gpu_decode else build_transform  # same arguments, same family
    common = dict(interpolation=data_cfg.interpolation, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std))
    try:
        if is_training:
            transform = make_transform(
                True, data_cfg.img_size, crop_pct=data_cfg.crop_pct, auto_augment=reg_cfg.auto_augment,
                three_augment=reg_cfg.three_augment, color_jitter=reg_cfg.color_jitter, reprob=reg_cfg.reprob,
                scale=tuple(reg_cfg.scale), hflip=reg_cfg.hflip, **common)
        else:
            transform = make_transform(False, data_cfg.img_size, crop_pct=data_cfg.crop_pct, **common)
    except ValueError as exc:
        if not use_gpu_decode:
            raise
        raise ConfigError(f"data.decode=gpu: {exc}") from exc  # e.g. an augmentation policy it does not implement
    dataset = build_dataset(
        data_cfg.name, split, root=data_cfg.get("root"), img_size=data_cfg.img_size,
        num_classes=data_cfg.num_classes, transform=None if use_gpu_decode else transform,
        in_chans=data_cfg.in_chans, synthetic_length=data_cfg.get(f"{split}_length", 10_000),
        strict=data_cfg.strict, decode=decode)
    loader_kwargs = dict(
        batch_size=batch_size, is_training=is_training, num_workers=workers, distributed=distributed,
        repeated_aug=reg_cfg.repeated_aug if is_training else 0, seed=seed, pin_memory=data_cfg.pin_memory,
        persistent_workers=data_cfg.persistent_workers, prefetch_factor=data_cfg.prefetch_factor)
    if use_gpu_decode:
        loader = build_gpu_decode_loader(dataset, transform, device=device, prefetch=data_cfg.get("gpu_prefetch", 2),
                                         **loader_kwargs)
    else:
        loader = build_loader(dataset, **loader_kwargs)
    return dataset, loader


def build_optimization(cfg: DictConfig, model: torch.nn.Module, *, world_size: int, steps_per_epoch: int):
    """Optimizer and LR scheduler; the peak lr follows the DeiT rule ``base_lr * global_batch / base_batch``."""
    opt = cfg.optimizer
    global_batch = cfg.batch_size * cfg.accum_steps * world_size
    lr = scale_lr(opt.base_lr, global_batch, opt.base_batch) if opt.scale_lr else opt.base_lr
    optimizer = build_optimizer(model, name=opt.name, lr=lr, weight_decay=opt.weight_decay, betas=tuple(opt.betas),
                                eps=opt.eps, decay_mode=opt.decay_mode, fused=opt.fused)
    sched = opt.schedule
    try:
        scheduler = build_scheduler(optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                                    warmup_epochs=sched.warmup_epochs, warmup_lr=sched.warmup_lr,
                                    min_lr=sched.min_lr, interval=sched.interval,
                                    official_epoch_shift=sched.official_epoch_shift)
    except ValueError as exc:
        raise ConfigError(f"optimizer.schedule: {exc}") from exc
    return optimizer, scheduler, {"global_batch": global_batch, "lr": lr}


def build_regularization(reg: DictConfig, model: torch.nn.Module, *, num_classes: int):
    """(mixup_fn or None, train criterion, EMA or None)."""
    mixup_fn = build_mixup(mixup_alpha=reg.mixup.mixup_alpha, cutmix_alpha=reg.mixup.cutmix_alpha,
                           prob=reg.mixup.prob, switch_prob=reg.mixup.switch_prob, mode=reg.mixup.mode,
                           label_smoothing=reg.label_smoothing, num_classes=num_classes)
    criterion = build_criterion(mixup_active=mixup_fn is not None, label_smoothing=reg.label_smoothing)
    # The EMA copy starts from the freshly built weights (a resume then loads its own state), before DDP, like the
    # official code; it lives on the model's device.
    ema = ModelEmaV3(model, decay=reg.ema.decay, use_warmup=reg.ema.warmup) if reg.ema.enabled else None
    return mixup_fn, criterion, ema


def grad_scaler_for(cfg: DictConfig, device: torch.device) -> Optional[torch.amp.GradScaler]:
    use_scaler = cfg.precision == "fp16" if cfg.use_grad_scaler is None else cfg.use_grad_scaler
    if cfg.precision == "fp16" and not use_scaler:
        raise ConfigError("precision=fp16 needs a GradScaler (fp16 gradients underflow): drop use_grad_scaler=false")
    return torch.amp.GradScaler(device.type) if use_scaler else None


# ---------------------------------------------------------------------------------------------- run directory
def run_location(cfg: DictConfig) -> tuple[Path, str]:
    """(run directory, run label). The directory is Hydra's output dir, which conf/train.yaml derives from
    ``output_dir/run_name`` (+ the job's overrides in a sweep); the label is that path below ``output_dir``."""
    if HydraConfig.initialized():
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    else:  # called as a library (compose API): same rule, without sweeps
        run_dir = Path(cfg.output_dir) / cfg.run_name
    try:
        label = run_dir.resolve().relative_to(Path(cfg.output_dir).resolve()).as_posix()
    except ValueError:
        label = cfg.run_name
    return run_dir, label


def is_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def save_config_snapshots(cfg: DictConfig, resolved: dict, run_dir: Path) -> None:
    """``config.yaml`` (resolved, what the checkpoints record) and Hydra's ``.hydra/`` trio. Written by us, after
    the config proved buildable, rather than by Hydra at launch: a mistyped re-run must not overwrite them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, run_dir / ".hydra" / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), run_dir / ".hydra" / "hydra.yaml")


# Keys that say how to run, not what to train: a resumed run may change them (e.g. more epochs, other workers).
# Any other difference from the checkpoint's config stops the job instead of silently mixing two experiments.
RESUMABLE_CHANGES = ("epochs", "resume", "workers", "log_every", "progress", "device", "eval_every", "save_every",
                     "keep_last", "checkpoint_every_steps", "eval_batch_size", "compile", "kernel_backend",
                     "model.kernel_backend", "nonfinite",
                     "max_consecutive_nonfinite", "output_dir", "run_name", "mlflow.", "trust_checkpoint",
                     "distributed.",
                     "data.root", "data.strict", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
                     "data.decode", "data.gpu_prefetch")


# ---------------------------------------------------------------------------------------------- training
@dataclass
class Job:
    """Everything one training job builds from its config, plus where it stands (updated by resume and fit)."""
    cfg: DictConfig
    dist: DistInfo
    run_dir: Path
    run_label: str
    resolved: dict[str, Any]  # the resolved config as plain data: checkpoints, MLflow params, config.yaml
    model: torch.nn.Module  # the bare model: state_dict, EMA source, evaluation
    train_model: torch.nn.Module  # the same parameters behind DDP / torch.compile, for the training forward
    eval_model: torch.nn.Module
    ema: Optional[ModelEmaV3]
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    criterion: torch.nn.Module
    mixup_fn: Any
    amp_dtype: Optional[torch.dtype]
    derived: dict[str, Any]  # global batch, effective lr, world size, steps per epoch
    checkpoints: CheckpointManager
    start_epoch: int = 0
    start_step: int = 0  # updates already done in epoch start_epoch (a mid-epoch checkpoint)
    partial_epoch: Optional[dict[str, float]] = None  # this rank's running sums of that epoch, from the checkpoint
    pending_rng: Optional[dict[str, Any]] = None  # this rank's RNG states from the checkpoint, set at the first step
    num_updates: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"top1": float("-inf"), "epoch": -1})
    last_metrics: dict[str, float] = field(default_factory=dict)
    init_report: Optional[LoadReport] = None  # what init_from loaded, resized and dropped (None without it)
    train_dataset: Any = None
    val_dataset: Any = None
    preemption: Optional[PreemptionHandler] = None
    unreadable_reported: int = 0  # unreadable images already reported in the log
    complexity: Optional[dict[str, Any]] = None  # params/GMACs, taken before FSDP2 shards the model (rank 0)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    release_hydra_errors()
    with reported_user_errors():
        try:
            return train(cfg).get("best/top1")
        except Preempted as exc:  # the checkpoint is written: a resumable, non-zero exit (see visionmamba.preemption)
            log.warning("%s", exc)
            sys.exit(exit_code_for(exc.signum))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) one training job; returns its final metrics (on every rank).

    SIGTERM/SIGUSR1 during the job end it after the current update with a checkpoint on every rank, raising
    :class:`~visionmamba.preemption.Preempted` (the signal handlers are restored on return).
    """
    dist_info = init_distributed(cfg.device)
    setup_logging(dist_info.rank)
    try:
        with PreemptionHandler() as preemption:
            job = build_job(cfg, dist_info)
            job.preemption = preemption
            resume(job)
            job.train_model, job.eval_model = wrap_model(job)
            return fit(job)
    finally:
        cleanup()


def compile_mode(cfg: DictConfig) -> Optional[str]:
    """``compile``: false (eager) | true (torch.compile's default mode) | a mode name; None means eager."""
    value = cfg.compile
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value in COMPILE_MODES:
        return value
    raise ConfigError(f"compile={value!r} is not one of false, true, {', '.join(COMPILE_MODES)}")


def check_config(cfg: DictConfig) -> None:
    """Value checks that the builders below would otherwise report late or obscurely."""
    if compile_mode(cfg) in ("reduce-overhead", "max-autotune") and cfg.accum_steps > 1:
        # A CUDA-graph replay reuses its output memory, and a gradient left in .grad by one micro-step is such an
        # output (AccumulateGrad keeps the tensor), so the next micro-step's replay would overwrite it.
        raise ConfigError(f"compile={cfg.compile} (CUDA graphs) cannot accumulate gradients over micro-steps: use "
                          f"accum_steps=1 (a larger batch_size or more GPUs) or compile=true")
    for key, allowed in (("precision", ("bf16", "fp16", "fp32")), ("nonfinite", ("skip", "stop")),
                         ("progress", ("auto", "bar", "line", "none"))):
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    for key, low in (("epochs", 1), ("batch_size", 1), ("accum_steps", 1), ("log_every", 1), ("keep_last", 1),
                     ("checkpoint_every_steps", 0), ("workers", 0), ("eval_every", 0), ("save_every", 0)):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {cfg[key]!r}")
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ConfigError(f"data.root is not set: data={cfg.data.name} data.root=/path/to/dataset "
                          "(or data=digits for the bundled dataset)")
    parallel_options(cfg)
    mixup = cfg.regularizer.mixup
    if (mixup.mixup_alpha > 0 or mixup.cutmix_alpha > 0) and mixup.mode == "batch" and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix in batch mode needs an even batch_size, got {cfg.batch_size}")


def build_job(cfg: DictConfig, dist_info: DistInfo) -> Job:
    """Data, model and optimization from the config. Nothing is written to the run directory here, so a bad
    option fails before it can touch an existing run."""
    check_config(cfg)
    run_dir, run_label = run_location(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if resolved["data"].get("root"):  # recorded absolute: the checkpoint's config then works from any directory
        resolved["data"]["root"] = str(Path(resolved["data"]["root"]).expanduser().resolve())
    seed_everything(cfg.seed, dist_info.rank)
    torch.backends.cudnn.benchmark = True  # fixed input sizes (as the official code); no effect on CPU
    log.info("run %s in %s: model=%s data=%s world_size=%d device=%s", run_label, run_dir, cfg.model.name,
             cfg.data.name, dist_info.world_size, dist_info.device)

    loader_kwargs = dict(workers=cfg.workers, distributed=dist_info.is_distributed, seed=cfg.seed,
                         device=dist_info.device)
    train_dataset, train_loader = build_data(cfg.data, cfg.regularizer, "train", batch_size=cfg.batch_size,
                                             **loader_kwargs)
    val_dataset, val_loader = build_data(cfg.data, cfg.regularizer, "val", batch_size=cfg.eval_batch_size,
                                         **loader_kwargs)
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_loader)} train batches per rank is fewer than accum_steps={cfg.accum_steps}: "
                          "lower batch_size or accum_steps")

    model = build_model(cfg.model)
    check_image_size(model, cfg.data.img_size, cfg.model.name)
    init_report = None
    if cfg.init_from:  # before the EMA copy is made, which then starts from these weights (as officially)
        init_report = load_weights(model, resolve_checkpoint(cfg.init_from), use_ema=cfg.init_from_ema,
                                   trust_pickle=cfg.trust_checkpoint, drop_mismatched_head=True)
    model.to(dist_info.device)
    mixup_fn, criterion, ema = build_regularization(cfg.regularizer, model, num_classes=cfg.data.num_classes)
    optimizer, scheduler, derived = build_optimization(cfg, model, world_size=dist_info.world_size,
                                                       steps_per_epoch=steps_per_epoch)
    derived.update(world_size=dist_info.world_size, steps_per_epoch=steps_per_epoch)
    return Job(
        cfg=cfg, dist=dist_info, run_dir=run_dir, run_label=run_label, resolved=resolved, model=model,
        train_model=model, eval_model=model, ema=ema, train_loader=train_loader, val_loader=val_loader,
        optimizer=optimizer, scheduler=scheduler, scaler=grad_scaler_for(cfg, dist_info.device),
        criterion=criterion, mixup_fn=mixup_fn, amp_dtype=amp_dtype_for(cfg.precision), derived=derived,
        checkpoints=CheckpointManager(run_dir / "checkpoints", keep_last=cfg.keep_last, save_every=cfg.save_every),
        train_dataset=train_dataset, val_dataset=val_dataset, init_report=init_report,
    )


def resume(job: Job) -> None:
    """Continue from the run directory's newest valid checkpoint, if there is one (auto-resume).

    Only a changed epoch count, data location or machine settings (:data:`RESUMABLE_CHANGES`) are accepted, and
    batch_size/accum_steps when the global batch stays the same (another GPU count); any other config change is
    an error, as is ``resume=false`` in front of existing checkpoints.

    Rank 0 chooses the file (skipping unreadable ones) and every rank loads that same file: model, EMA, optimizer,
    scheduler, scaler, counters, and each rank's own RNG and data-order generators. A mid-epoch checkpoint also
    gives the position in the epoch and the epoch's running sums; its RNG states are applied just before the first
    update (:func:`run_epochs`), so nothing done in between (tracking, model statistics) can shift them.
    """
    if job.dist.is_main:
        job.checkpoints.remove_stale_temp_files()
    latest = job.checkpoints.find_latest() if job.dist.is_main else None
    path = broadcast_object(str(latest[0]) if latest else None)
    if path is None:
        return
    if not job.cfg.resume:
        raise ConfigError(f"{job.run_dir} already holds checkpoints and resume=false: pick another run_name "
                          "(or delete that directory) rather than overwrite them")
    state = latest[1] if latest else load_checkpoint(path)
    changed = config_differences(state.get("config") or {}, job.resolved)
    conflicts = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE_CHANGES)}
    recorded_batch = state.get("derived", {}).get("global_batch", job.derived["global_batch"])
    if recorded_batch == job.derived["global_batch"]:
        # e.g. 8 GPUs x 256 resumed on 4 GPUs x 256 x accum_steps=2: the same optimization, another machine
        conflicts = {k: v for k, v in conflicts.items() if k not in ("batch_size", "accum_steps")}
    else:  # same config on another number of GPUs: the lr and the schedule's steps would silently change
        conflicts["global batch (batch_size x accum_steps x world size)"] = (recorded_batch,
                                                                           job.derived["global_batch"])
    if conflicts:
        listed = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in list(conflicts.items())[:6])
        raise ConfigError(f"{job.run_dir} holds a run with another config ({listed}"
                          f"{', ...' if len(conflicts) > 6 else ''}): pick a new run_name to start a new run")
    restore_training_state(state, model=job.model, ema=job.ema, optimizer=job.optimizer, scheduler=job.scheduler,
                           scaler=job.scaler, source=path)
    job.start_epoch, job.num_updates = state["epoch"], state["global_step"]
    job.start_step = int(state.get("step_in_epoch") or 0)
    steps_per_epoch = job.derived["steps_per_epoch"]
    if job.start_step > steps_per_epoch:  # e.g. data.root now holds fewer images: treat that epoch as done
        log.warning("the checkpoint is %d updates into epoch %d, which now has only %d: that epoch ends there",
                    job.start_step, job.start_epoch + 1, steps_per_epoch)
        job.start_step = steps_per_epoch
    per_rank = state.get("rng") or []
    partial = state.get("partial_epoch") or []
    if len(per_rank) == job.dist.world_size:
        job.pending_rng = per_rank[job.dist.rank]
        job.partial_epoch = partial[job.dist.rank] if len(partial) == job.dist.world_size else None
    else:
        log.warning("checkpoint has RNG states for %d ranks, this job has %d: random streams restart%s",
                    len(per_rank), job.dist.world_size,
                    " and the resumed epoch's averages cover only its remaining updates" if job.start_step else "")
    job.best = {"top1": state.get("best_top1", float("-inf")), "epoch": state.get("best_epoch", -1)}
    job.last_metrics = state.get("metrics") or {}
    within = f", {job.start_step}/{steps_per_epoch} updates into that epoch" if job.start_step else ""
    log.info("resuming from %s at epoch %d (update %d)%s", path, job.start_epoch, job.num_updates, within)
    for key, (old, new) in changed.items():
        log.info("changed since the checkpoint: %s: %s -> %s", key, old, new)


def parallel_options(cfg: DictConfig) -> ParallelOptions:
    """The ``distributed:`` block, checked (ConfigError for a bad value or an impossible combination)."""
    block = cfg.get("distributed")
    try:
        options = ParallelOptions.from_mapping(OmegaConf.to_container(block, resolve=True) if block else None)
        options.check(accum_steps=cfg.accum_steps)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    return options


def wrap_model(job: Job) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(training module, evaluation module), per ``distributed.strategy``; torch.compile optionally on both.

    ddp: DDP wraps only the training forward; evaluation runs the bare model on each rank's disjoint shard (no
    gradient sync, no buffer broadcast). fsdp2: the model (and its EMA) is sharded in place and is both modules;
    its forward holds collectives, so evaluation runs in lockstep (see :func:`evaluate_all`)."""
    train_model = job.model
    if job.dist.is_distributed:
        options = parallel_options(job.cfg)
        if options.strategy == "fsdp2":
            if job.dist.is_main and job.start_epoch == 0 and job.start_step == 0:
                # fvcore traces a copy of the model, which a sharded model cannot give: count before sharding
                job.complexity = model_complexity(job.model, job.cfg.data.img_size, in_chans=job.cfg.data.in_chans,
                                                  device=job.dist.device)
            shard_for_training(job.model, job.ema, job.optimizer, job.dist.device, options)
        else:
            train_model = wrap_ddp(job.model, job.dist.device, options)
        log.info("distributed: %s over %d ranks", options.describe(), job.dist.world_size)
    mode = compile_mode(job.cfg)
    if mode is not None:
        log.info("torch.compile mode=%s (the first steps and the first evaluation compile)", mode)
        return torch.compile(train_model, mode=mode), torch.compile(job.model, mode=mode)
    return train_model, job.model


def start_tracking(job: Job) -> Tracker:
    """The job's MLflow run (a no-op object on ranks other than 0 or with mlflow.enabled=false)."""
    cfg, mlflow_cfg = job.cfg, job.cfg.mlflow
    tracker = Tracker(enabled=mlflow_cfg.enabled and job.dist.is_main, tracking_uri=mlflow_cfg.tracking_uri,
                      experiment_name=mlflow_cfg.experiment_name, run_name=job.run_label,
                      state_file=job.run_dir / "mlflow_run.json")
    if not job.dist.is_main:
        return tracker
    tracker.start(tags={
        "model": cfg.model.name, "dataset": cfg.data.name, "world_size": job.dist.world_size,
        "precision": cfg.precision, "kernel_backend": resolve_backend(cfg.kernel_backend, job.dist.device),
        "device": job.dist.device.type, "git_commit": git_commit(Path(__file__).parent),
        "run_dir": str(job.run_dir.resolve()), "sweep": cfg.run_name if is_sweep() else None,
        "init_from": cfg.init_from, **mlflow_cfg.tags,
    })
    tracker.log_params({**flatten_config(job.resolved), **{f"derived.{k}": v for k, v in job.derived.items()}})
    if job.init_report is not None:  # the stage hand-over: what was loaded, resized and dropped
        tracker.set_tags(job.init_report.tags())  # init_from.weights / init_from.resized / init_from.dropped
        report_path = job.run_dir / "init_from.json"
        report_path.write_text(json.dumps(job.init_report.as_dict(), indent=2))
        tracker.log_artifact(report_path)
    if job.start_epoch == 0 and job.start_step == 0:  # once per run; fvcore traces a copy on the run's device
        complexity = job.complexity or model_complexity(job.model, cfg.data.img_size, in_chans=cfg.data.in_chans,
                                                        device=job.dist.device)
        tracker.log_metrics({"model/params_m": complexity["params"] / 1e6, "model/gmacs": complexity["gmacs"]}, 0)
        log.info("model %s: %.3fM params, %.4g GMACs per %d px image (1 MAC = 1 multiply-add)", cfg.model.name,
                 complexity["params"] / 1e6, complexity["gmacs"], cfg.data.img_size)
    tracker.log_artifact(job.run_dir / "config.yaml")
    return tracker


def fit(job: Job) -> dict[str, Any]:
    """Rank 0 records the config and opens the MLflow run, then the epoch loop runs; returns the final metrics."""
    if job.dist.is_main:
        save_config_snapshots(job.cfg, job.resolved, job.run_dir)
        log.info("global batch %d (%d per rank x %d accumulation x %d ranks), lr %.3g, %d optimizer steps per epoch",
                 job.derived["global_batch"], job.cfg.batch_size, job.cfg.accum_steps, job.dist.world_size,
                 job.derived["lr"], job.derived["steps_per_epoch"])
    tracker = start_tracking(job)
    status = "FAILED"
    try:
        final = run_epochs(job, tracker)
        if job.dist.is_main:
            final.update({"run_dir": str(job.run_dir.resolve()), "mlflow_run_id": tracker.run_id})
            (job.run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
            tracker.log_artifact(job.run_dir / "final_metrics.json")
        status = "FINISHED"
        return final
    except (KeyboardInterrupt, Preempted):
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def run_epochs(job: Job, tracker: Tracker) -> dict[str, Any]:
    """The epoch loop: train, evaluate model and EMA, checkpoint, log.

    Checkpoints also go out every ``checkpoint_every_steps`` updates within an epoch and when a preemption signal
    arrives (then :class:`Preempted` ends the job on every rank, after the checkpoint)."""
    cfg, device = job.cfg, job.dist.device
    digests: list[str] = []
    if job.start_epoch >= cfg.epochs:
        log.info("run already complete (%d/%d epochs); raise epochs=... to train further", job.start_epoch, cfg.epochs)
    if job.pending_rng is not None:  # the checkpoint's RNG states, as late as possible: just before the first update
        set_rng_state(job.pending_rng["global"])
        set_loader_rng_state(job.train_loader, job.pending_rng["data"])
        job.pending_rng = None
    steps_per_epoch = job.derived["steps_per_epoch"]
    for epoch in range(job.start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        set_sampler_epoch(job.train_loader, epoch)
        # The data-order generators as this epoch's pass begins: a mid-epoch checkpoint records these, so that a
        # resume replays the same order (and worker seeds) and skips what was consumed.
        epoch_data_rng = get_loader_rng_state(job.train_loader)
        start_step, resume_totals = job.start_step, job.partial_epoch
        job.start_step, job.partial_epoch = 0, None
        stop_position: dict[str, Any] = {}

        def on_step_end(position: dict[str, Any], epoch: int = epoch, data_rng: dict = epoch_data_rng) -> None:
            every = cfg.checkpoint_every_steps
            periodic = every > 0 and position["num_updates"] % every == 0 and position["step"] < steps_per_epoch
            if position["stop"] or periodic:  # the same decision on every rank (collective inside)
                job.num_updates = position["num_updates"]
                save_checkpoint(job, epoch, job.last_metrics, False, step=position["step"], data_rng=data_rng,
                                partial=position["totals"])
            if position["stop"]:
                stop_position.update(position)

        stats = train_one_epoch(
            job.train_model, job.train_loader, job.optimizer, job.criterion, device, epoch,
            num_updates=job.num_updates, scheduler=job.scheduler, amp_dtype=job.amp_dtype, scaler=job.scaler,
            accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, ema=job.ema, mixup_fn=job.mixup_fn,
            nonfinite=cfg.nonfinite, max_consecutive_nonfinite=cfg.max_consecutive_nonfinite,
            log_every=cfg.log_every, on_log=tracker.log_metrics, progress=cfg.progress,
            desc=f"epoch {epoch + 1}/{cfg.epochs}", start_step=start_step, resume_totals=resume_totals,
            stop_requested=lambda: job.preemption is not None and job.preemption.requested,
            on_step_end=on_step_end)
        job.num_updates = stats["num_updates"]
        if stats["stopped"]:
            raise preempted(job, job.checkpoints.epoch_path(epoch, stop_position["step"]))
        job.scheduler.after_epoch(epoch)
        metrics = {"train/epoch_loss": stats["loss"], "train/epoch_img_per_s": stats["img_per_s"],
                   "train/skipped_steps": stats["skipped_steps"]}

        is_best = False
        if epoch + 1 == cfg.epochs or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0):
            metrics.update(evaluate_all(job))
            is_best = metrics["val/top1"] > job.best["top1"]  # chosen on the raw (non-EMA) weights, as officially
            if is_best:
                job.best = {"top1": metrics["val/top1"], "epoch": epoch + 1}
        if job.best["epoch"] > 0:
            metrics.update({"best/top1": job.best["top1"], "best/epoch": job.best["epoch"]})
        metrics.update(count_unreadable_images(job))

        digests = save_checkpoint(job, epoch + 1, metrics, is_best)
        tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith(("val", "best", "data/"))}, epoch + 1)
        tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("train/")}, job.num_updates)
        log.info("epoch %d/%d done in %.0fs: %s", epoch + 1, cfg.epochs, time.perf_counter() - epoch_start,
                 "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        job.last_metrics = metrics
        # A signal that arrived during evaluation or the checkpoint: that checkpoint is current, stop here.
        if epoch + 1 < cfg.epochs and agreed_signal(job):
            raise preempted(job, job.checkpoints.epoch_path(epoch + 1))
    return {**job.last_metrics, "epoch": max(job.start_epoch, cfg.epochs), "global_step": job.num_updates,
            "best/top1": job.best["top1"], "best/epoch": job.best["epoch"], "replica_digests": digests}


def agreed_signal(job: Job) -> int:
    """The preemption signal number if any rank received one (0 if none): a collective, the same on all ranks."""
    local = job.preemption.signum if job.preemption is not None and job.preemption.signum else 0
    return int(all_reduce(torch.tensor([local], dtype=torch.int64, device=job.dist.device), "max").item())


def preempted(job: Job, checkpoint: Path) -> Preempted:
    """The exception that ends a preempted job, once every rank knows rank 0 finished writing ``checkpoint``."""
    signum = agreed_signal(job)
    barrier()  # no rank exits (under torchrun: makes the agent tear the others down) while rank 0 still writes
    return Preempted(signum or 15, str(checkpoint))


def count_unreadable_images(job: Job) -> dict[str, float]:
    """``data/unreadable_images``: distinct image files skipped so far because they cannot be decoded (folder
    datasets; all ranks' flags are OR-ed, a collective). Each new count is also logged as a warning."""
    counts, examples = {}, []
    for split, dataset in (("train", job.train_dataset), ("val", job.val_dataset)):
        flags_of = getattr(dataset, "bad_file_flags", None)
        if flags_of is None:
            continue
        flags = all_reduce(flags_of().to(job.dist.device), "max").cpu()
        counts[split] = int(flags.sum())
        examples += [dataset.samples[i][0] for i in flags.nonzero().flatten().tolist()[:3]]
    if not counts:
        return {}
    total = sum(counts.values())
    if total > job.unreadable_reported:
        log.warning("%d unreadable image file(s) skipped so far (train %d, val %d; each replaced by the next "
                    "readable sample), e.g. %s; data.strict=true makes them an error", total, counts.get("train", 0),
                    counts.get("val", 0), ", ".join(examples[:3]))
        job.unreadable_reported = total
    return {"data/unreadable_images": float(total)}


def evaluate_all(job: Job) -> dict[str, float]:
    """``val/*`` for the model and, when configured, ``val_ema/*`` for its EMA (every rank takes part)."""
    # an FSDP2-sharded model gathers its blocks inside the forward: every rank must run as many forwards
    kwargs = dict(amp_dtype=job.amp_dtype, progress=job.cfg.progress, lockstep=is_sharded(job.model))
    results = {"val": evaluate(job.eval_model, job.val_loader, job.dist.device, desc="val", **kwargs)}
    if job.ema is not None and job.cfg.regularizer.ema.eval:
        results["val_ema"] = evaluate(job.ema.module, job.val_loader, job.dist.device, desc="val ema", **kwargs)
    return {f"{prefix}/{k}": v for prefix, res in results.items() for k, v in res.items() if k != "num_samples"}


def save_checkpoint(job: Job, epoch: int, metrics: dict[str, float], is_best: bool, *, step: int = 0,
                    data_rng: Optional[dict[str, Any]] = None,
                    partial: Optional[dict[str, float]] = None) -> list[str]:
    """Gather every rank's RNG snapshot and replica digest (a collective), then rank 0 writes the checkpoint.
    Returns the digests, one per rank: they differ only if DDP replicas drifted apart, which is logged as an error.

    ``epoch`` counts completed epochs; ``step > 0`` makes it a mid-epoch checkpoint ``step`` updates into the next
    epoch, with ``data_rng`` (the data-order generators at that epoch's start) and ``partial`` (this rank's running
    sums) to resume from."""
    per_rank = all_gather_object({"global": get_rng_state(),
                                  "data": data_rng if data_rng is not None else get_loader_rng_state(job.train_loader),
                                  "partial": partial,
                                  "digest": replica_digest(job.model, job.ema.module if job.ema else None)})
    digests = [entry.pop("digest") for entry in per_rank]
    partials = [entry.pop("partial") for entry in per_rank]
    if len(set(digests)) > 1:
        log.error("model/EMA replicas differ across ranks after epoch %d step %d: %s", epoch, step, digests)
    sharded_state = None
    if is_sharded(job.model):  # FSDP2: every rank takes part in gathering the full state dicts onto rank 0
        sharded_state = capture_sharded_training_state(model=job.model, ema=job.ema, optimizer=job.optimizer,
                                                       scheduler=job.scheduler, scaler=job.scaler,
                                                       is_main=job.dist.is_main)
    if job.dist.is_main:
        path = job.checkpoints.save({
            **(sharded_state or capture_training_state(model=job.model, ema=job.ema, optimizer=job.optimizer,
                                                       scheduler=job.scheduler, scaler=job.scaler)),
            "epoch": epoch, "step_in_epoch": step, "global_step": job.num_updates, "best_top1": job.best["top1"],
            "best_epoch": job.best["epoch"], "metrics": metrics, "model_name": job.cfg.model.name,
            "config": job.resolved, "derived": job.derived, "rng": per_rank,
            "partial_epoch": partials if step else None,
        }, epoch=epoch, step=step, is_best=is_best)
        if step:
            log.info("checkpoint %s (%d updates into epoch %d, update %d)", path, step, epoch + 1, job.num_updates)
    return digests


if __name__ == "__main__":
    run_cli(main)
