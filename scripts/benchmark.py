#!/usr/bin/env python
"""Training and inference throughput + peak memory of registered models and timm baselines, in one run.

Each positional ROW is a model name, optionally with per-row overrides after ``@``::

    python scripts/benchmark.py deit_tiny_patch16_224 vim_tiny@backend=cuda vim_tiny@backend=ref \
        shufflemamba_tiny@shuffle=off --batch-size 128 --img-size 224 --dtype bf16 --json bench.json

Row keys: ``backend`` (auto|cuda|fast|ref), ``shuffle`` (default|on|off|<rate>), ``compile`` (0|1 or a torch.compile
mode: reduce-overhead = CUDA graphs, max-autotune, max-autotune-no-cudagraphs), ``label``, and
``warmup`` / ``iters`` / ``repeats`` to time a slow row (the pure-PyTorch reference) with fewer steps.
Names registered in `visionmamba.models` are built with `visionmamba.create_model` (which also wraps some timm models,
e.g. ``mambaout_femto``); any other name goes to `timm.create_model` (``deit_tiny_patch16_224``,
``deit_small_patch16_224``). The FIRST row
is the baseline: every other row's throughput and memory are printed as ratios to it, measured in the same process.

Measurements (random inputs, random labels):
  * train: zero_grad + forward + cross-entropy + backward + AdamW step (PyTorch's fused AdamW on CUDA), under
    autocast for bf16/fp16 (fp16 with a GradScaler);
  * infer: ``model.eval()`` forward under ``torch.inference_mode``;
  * time: ``--warmup`` untimed steps, then ``--repeats`` timed windows of ``--iters`` steps each (CUDA events on a
    GPU, a monotonic clock on CPU); the reported step time is the median window's mean;
  * memory: peak allocated during the timed windows, and ``act`` = peak minus what was allocated before them
    (parameters, gradients, optimizer state), i.e. the activations and temporaries of one step.

``--profile`` additionally runs a few steps of each row (or ``--profile-rows``) under torch.profiler, train steps
unless only inference is benchmarked (``--mode infer``), and prints the top kernels by GPU time (top CPU ops when
there is no GPU). ``--mlflow URI`` logs the configuration and every row's numbers as one MLflow run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from visionmamba.optim import largest_first  # noqa: E402
from visionmamba.utils import COMPILE_MODES  # noqa: E402

log = logging.getLogger("benchmark")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROW_KEYS = ("backend", "shuffle", "compile", "label", "warmup", "iters", "repeats")
DEFAULT_SHUFFLE_ON = 0.1  # ShuffleMamba's --ssr default, used by shuffle=on for a model whose default rate is 0
GIB = 1024 ** 3


@dataclass
class RowSpec:
    model: str
    backend: str
    shuffle: str  # default | on | off | <float>
    compile: bool
    label: str
    warmup: int
    iters: int
    repeats: int
    compile_mode: str = "default"  # torch.compile(mode=...) when compile is on


@dataclass
class Phase:
    step_ms: float  # median over repeats of the mean step time of a window
    step_ms_windows: list
    img_s: float
    spread: float  # (max - min) / median of the windows: the timing noise within the row
    peak_mem_gib: Optional[float]
    act_mem_gib: Optional[float]


@dataclass
class RowResult:
    label: str
    model: str
    family: str  # visionmamba | timm
    params_m: Optional[float] = None
    backend_requested: Optional[str] = None
    backend: Optional[str] = None  # resolved path, e.g. cuda/fused, ref; n/a for timm models
    shuffle_rate: Optional[float] = None
    compile: bool = False
    compile_mode: Optional[str] = None
    timing: dict = field(default_factory=dict)  # warmup / iters / repeats used for this row
    train: Optional[Phase] = None
    infer: Optional[Phase] = None
    ratios: dict = field(default_factory=dict)
    error: Optional[str] = None


# ------------------------------------------------------------------------------------------------ parsing
def parse_row(text: str, args: argparse.Namespace) -> RowSpec:
    name, _, rest = text.partition("@")
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ROW_KEYS:
            raise ValueError(f"row {text!r}: expected key=value with key in {ROW_KEYS}, got {item!r}")
        opts[key] = value
    backend = opts.get("backend", args.backend)
    shuffle = opts.get("shuffle", args.shuffle)
    if shuffle not in ("default", "on", "off"):
        try:
            float(shuffle)
        except ValueError:
            raise ValueError(f"row {text!r}: shuffle must be default|on|off|<rate>, got {shuffle!r}") from None
    compile_value = opts.get("compile", "1" if args.compile else "0")
    if compile_value not in ("0", "1", "true", "false", "yes", "no", "on", "off") + COMPILE_MODES:
        raise ValueError(f"row {text!r}: compile must be 0|1 or one of {COMPILE_MODES}, got {compile_value!r}")
    compile_ = compile_value not in ("0", "false", "no", "off")
    compile_mode = compile_value if compile_value in COMPILE_MODES else "default"
    label = opts.get("label") or text
    counts = {}
    for key in ("warmup", "iters", "repeats"):
        try:
            counts[key] = int(opts.get(key, getattr(args, key)))
        except ValueError:
            raise ValueError(f"row {text!r}: {key} must be an integer, got {opts[key]!r}") from None
    if counts["iters"] < 1 or counts["repeats"] < 1 or counts["warmup"] < 0:
        raise ValueError(f"row {text!r}: need iters >= 1, repeats >= 1, warmup >= 0; got {counts}")
    return RowSpec(name, backend, shuffle, compile_, label, **counts, compile_mode=compile_mode)


# ------------------------------------------------------------------------------------------------ models
def build_model(spec: RowSpec, args: argparse.Namespace, result: RowResult) -> torch.nn.Module:
    from visionmamba import ops
    from visionmamba.models import create_model, is_model

    if is_model(spec.model):
        # Our registry also wraps models without the shuffle plug-in or the selective-scan ops (e.g. MambaOut):
        # shuffle options are only passed when asked for, and the backend is only reported where it is used.
        result.family = "visionmamba"
        rate = {"default": None, "off": 0.0, "on": None}.get(spec.shuffle)
        if rate is None and spec.shuffle not in ("default", "on"):
            rate = float(spec.shuffle)
        model = create_model(spec.model, img_size=args.img_size, kernel_backend=spec.backend, shuffle_rate=rate,
                             num_classes=args.num_classes)
        shuffle = getattr(model, "shuffle", None)
        if spec.shuffle == "on":
            if shuffle is None:
                raise ValueError(f"{spec.model} has no layer-wise shuffle to turn on")
            if shuffle.rate == 0.0:
                # "on" keeps a ShuffleMamba model's own rate; a model without one gets ShuffleMamba's default.
                shuffle.set_rate(DEFAULT_SHUFFLE_ON)
        result.shuffle_rate = float(shuffle.rate) if shuffle is not None else None
        result.backend_requested = spec.backend
        if any(hasattr(m, "kernel_backend") for m in model.modules()):
            resolved = ops.resolve_backend(spec.backend, args.device)
            if resolved == "cuda":
                from visionmamba.ops import cuda

                resolved = f"cuda/{cuda.inner_impl()}"
            result.backend = resolved
        else:
            result.backend = "n/a"
    else:
        import timm

        result.family = "timm"
        if spec.shuffle != "default" or spec.backend != args.backend:
            log.warning("%s is a timm model: backend/shuffle options do not apply", spec.model)
        result.backend = "n/a"
        try:
            model = timm.create_model(spec.model, pretrained=False, num_classes=args.num_classes,
                                      img_size=args.img_size)
        except TypeError as exc:  # convolutional models (mambaout) take any input size and no img_size argument
            if "img_size" not in str(exc):
                raise
            log.info("%s takes no img_size argument (%s); built at its default and fed %d px", spec.model, exc,
                     args.img_size)
            model = timm.create_model(spec.model, pretrained=False, num_classes=args.num_classes)
    result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    return model


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _window_ms(step: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Mean step time of `iters` back-to-back steps (CUDA events on a GPU: no host sync inside the window)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) * 1e3 / iters


def phase_from_windows(windows: list, batch: int, peak_b: Optional[int], base_b: Optional[int]) -> Phase:
    """A Phase from timed windows (mean ms per step of each) of ``batch`` images per step; memory in bytes."""
    step_ms = statistics.median(windows)
    return Phase(step_ms=step_ms, step_ms_windows=windows, img_s=batch * 1e3 / step_ms,
                 spread=(max(windows) - min(windows)) / step_ms,
                 peak_mem_gib=None if peak_b is None else peak_b / GIB,
                 act_mem_gib=None if peak_b is None else (peak_b - base_b) / GIB)


def _memory_start(device: torch.device) -> Optional[int]:
    _sync(device)
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _memory_peak(device: torch.device) -> Optional[int]:
    _sync(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, iters: int, repeats: int,
               batch: int) -> Phase:
    """Warm up, then `repeats` windows of `iters` steps; memory = peak over the windows."""
    for _ in range(warmup):
        step()
    base = _memory_start(device)
    windows = [_window_ms(step, device, iters) for _ in range(repeats)]
    return phase_from_windows(windows, batch, _memory_peak(device), base)


def warm_up_gpu(device: torch.device, seconds: float) -> None:
    """Run dense matmuls for `seconds` so the first (baseline) row does not meet an idle GPU's low clocks."""
    if device.type != "cuda" or seconds <= 0:
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    _sync(device)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(10):
            a @ a
        _sync(device)
    del a
    torch.cuda.empty_cache()


def _amp(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_train_step(model, images, labels, device, dtype):
    model.train()
    # the fused AdamW kernel on CUDA (one launch group instead of foreach's many; the same for every row, so the
    # ratios stay fair): PyTorch's default foreach step was 1 ms of a 36 ms H200 step for shufflemamba_tiny. The
    # parameters largest first, as `build_optimizer` orders them (`largest_first`: 0.44 -> 0.14 ms for that model)
    params = list(model.parameters())
    params = [params[i] for i in largest_first(params)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _amp(device, dtype):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step, optimizer


def make_infer_step(model, images, device, dtype):
    model.eval()

    def step():
        with torch.inference_mode(), _amp(device, dtype):
            model(images)

    return step


# ------------------------------------------------------------------------------------------------ profile
def profile_steps(step: Callable[[], Any], device: torch.device, steps: int, top: int, phase: str = "train") -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # one more warm step outside the trace
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    if device.type == "cuda":
        per_kernel: dict[str, list] = {}
        intervals = []
        for evt in prof.events():
            # user annotations (e.g. "Optimizer.step#AdamW.step") also appear as GPU-side ranges that span kernels
            # counted on their own: counting them too would count those kernels twice
            if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False):
                entry = per_kernel.setdefault(evt.name, [0.0, 0])
                entry[0] += evt.device_time_total
                entry[1] += 1
                intervals.append((evt.time_range.start, evt.time_range.end))
        if not per_kernel:
            log.warning("the profiler recorded no CUDA kernel events; printing its operator table instead")
            return {"unit": "ops", "phase": phase, "table": prof.key_averages().table(sort_by="self_device_time_total",
                                                                      row_limit=top)}
        total = sum(v[0] for v in per_kernel.values())
        rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
        span_us, busy_us = _busy(intervals)
        return {"unit": "us per step", "phase": phase, "total_gpu_us_per_step": total / steps,
                # GPU idle gaps mean the host (Python, launches, hooks) is the bottleneck; the profiler's own
                # per-op overhead makes this a lower bound
                "span_us_per_step": span_us / steps, "gpu_busy_pct": 100.0 * busy_us / max(span_us, 1e-9),
                "top": [{"name": name, "us_per_step": us / steps, "calls_per_step": n / steps,
                         "pct": 100.0 * us / max(total, 1e-9)} for name, (us, n) in rows]}
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return {"unit": "cpu", "phase": phase, "table": table}


def _busy(intervals: list) -> tuple[float, float]:
    """(span from the first kernel start to the last kernel end, time with at least one kernel running), in us."""
    if not intervals:
        return 0.0, 0.0
    intervals = sorted(intervals)
    busy, cur_start, cur_end = 0.0, intervals[0][0], intervals[0][1]
    for start, end in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    # cur_end is now the latest end of all
    return cur_end - intervals[0][0], busy + cur_end - cur_start


def _step_name(prof: dict) -> str:
    """What a profile measured: "train" or "inference" steps (profiles without a phase are train steps)."""
    return "inference" if prof.get("phase") == "infer" else "train"


def print_profile(label: str, prof: dict) -> None:
    print(f"\n== profile: {label} ({_step_name(prof)} step) ==")
    if "table" in prof:
        print(prof["table"])
        return
    print(f"GPU time per step: {prof['total_gpu_us_per_step'] / 1e3:.2f} ms; GPU busy "
          f"{prof.get('gpu_busy_pct', float('nan')):.1f}% of the {prof.get('span_us_per_step', 0.0) / 1e3:.2f} ms "
          f"per step between the first and the last kernel")
    print(f"{'%':>6s} {'ms/step':>9s} {'calls':>6s}  kernel")
    for r in prof["top"]:
        name = r["name"] if len(r["name"]) <= 110 else r["name"][:107] + "..."
        print(f"{r['pct']:6.1f} {r['us_per_step'] / 1e3:9.3f} {r['calls_per_step']:6.1f}  {name}")


# ------------------------------------------------------------------------------------------------ one row
def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Live:
    """A row being measured: its spec, result and the objects that live between phases."""
    spec: RowSpec
    result: RowResult
    model: Any = None
    images: Any = None
    labels: Any = None
    step: Any = None
    optimizer: Any = None


def _fail(row: _Live, exc: BaseException, args: argparse.Namespace, device: torch.device) -> None:
    text = str(exc).strip()
    row.result.error = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
    log.error("row %s failed: %s", row.spec.label, row.result.error, exc_info=args.verbose)
    row.model = row.step = row.optimizer = row.images = row.labels = None
    _release(device)


def _prepare(spec: RowSpec, args: argparse.Namespace, device: torch.device) -> _Live:
    row = _Live(spec, RowResult(label=spec.label, model=spec.model, family="?", compile=spec.compile,
                                compile_mode=spec.compile_mode if spec.compile else None,
                                timing=dict(warmup=spec.warmup, iters=spec.iters, repeats=spec.repeats)))
    try:
        torch.manual_seed(args.seed)
        model = build_model(spec, args, row.result).to(device)
        row.model = torch.compile(model, mode=spec.compile_mode) if spec.compile else model
        row.images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        row.labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    except Exception as exc:  # noqa: BLE001 - one failing row (OOM, missing kernels) must not hide the others
        _fail(row, exc, args, device)
    return row


def _start_phase(row: _Live, phase: str, device: torch.device, dtype: torch.dtype) -> None:
    if phase == "train":
        row.step, row.optimizer = make_train_step(row.model, row.images, row.labels, device, dtype)
    else:
        row.step = make_infer_step(row.model, row.images, device, dtype)


def _end_phase(row: _Live, device: torch.device) -> None:
    if row.optimizer is not None:
        row.optimizer.zero_grad(set_to_none=True)
    row.step = row.optimizer = None
    _release(device)


def _phases(args: argparse.Namespace) -> list[str]:
    return {"train": ["train"], "infer": ["infer"], "both": ["train", "infer"]}[args.mode]


def _wants_profile(spec: RowSpec, args: argparse.Namespace, phase: str) -> bool:
    """Profile the train phase, or the inference phase when it is the only one."""
    return (args.profile and phase == _phases(args)[0]
            and (args.profile_rows is None or spec.label in args.profile_rows or spec.model in args.profile_rows))


def run_sequential(specs: list[RowSpec], args, device, dtype, on_progress) -> tuple[list[RowResult], dict]:
    """One row after the other: build, train phase (+ profile), inference phase, free."""
    results, profiles = [], {}
    for spec in specs:
        log.info("benchmarking %s (warmup %d, %d x %d iters)", spec.label, spec.warmup, spec.repeats, spec.iters)
        row = _prepare(spec, args, device)
        for phase in _phases(args):
            if row.result.error:
                break
            try:
                _start_phase(row, phase, device, dtype)
                setattr(row.result, phase, time_steps(row.step, device, spec.warmup, spec.iters, spec.repeats,
                                                      args.batch_size))
                if _wants_profile(spec, args, phase):
                    profiles[spec.label] = profile_steps(row.step, device, args.profile_steps, args.profile_top, phase)
                    print_profile(spec.label, profiles[spec.label])
                _end_phase(row, device)
            except Exception as exc:  # noqa: BLE001 - one failing row must not hide the others
                _fail(row, exc, args, device)
        row.model = row.images = row.labels = None
        _release(device)
        results.append(row.result)
        log.info("%s: %s", spec.label, _summary(row.result))
        on_progress(results, profiles)
    return results, profiles


def run_interleaved(specs: list[RowSpec], args, device, dtype, on_progress) -> tuple[list[RowResult], dict]:
    """All rows resident; the timed windows alternate between rows (A B C A B C ...), so a slow drift of the
    machine (clocks, temperature, a neighbour) spreads over all rows instead of biasing the ones measured last.

    Memory is probed separately for each row (one step after its warm-up). With the other rows' parameters and
    optimizer states resident, only ``act`` (the step's own peak above what was allocated before it) is meaningful;
    ``peak`` is reported as None.
    """
    rows = [_prepare(spec, args, device) for spec in specs]
    profiles: dict = {}
    for phase in _phases(args):
        live = [r for r in rows if not r.result.error]
        windows: dict[int, list] = {}
        act: dict[int, Optional[int]] = {}
        for i, row in enumerate(live):
            try:
                _start_phase(row, phase, device, dtype)
                for _ in range(row.spec.warmup):
                    row.step()
                base = _memory_start(device)
                row.step()
                peak = _memory_peak(device)
                act[i] = None if peak is None else peak - base
                windows[i] = []
            except Exception as exc:  # noqa: BLE001
                _fail(row, exc, args, device)
        for rep in range(max((r.spec.repeats for r in live), default=0)):
            for i, row in enumerate(live):
                if row.result.error or rep >= row.spec.repeats:
                    continue
                try:
                    windows[i].append(_window_ms(row.step, device, row.spec.iters))
                except Exception as exc:  # noqa: BLE001
                    _fail(row, exc, args, device)
        for i, row in enumerate(live):
            if row.result.error:
                continue
            result = phase_from_windows(windows[i], args.batch_size, None, None)
            result.act_mem_gib = None if act[i] is None else act[i] / GIB
            setattr(row.result, phase, result)
            if _wants_profile(row.spec, args, phase):
                profiles[row.spec.label] = profile_steps(row.step, device, args.profile_steps, args.profile_top,
                                                         phase)
                print_profile(row.spec.label, profiles[row.spec.label])
        for row in live:
            if not row.result.error:
                _end_phase(row, device)
        log.info("%s phase done (%d rows, interleaved)", phase, len(live))
    for row in rows:
        row.model = row.images = row.labels = None
        log.info("%s: %s", row.spec.label, _summary(row.result))
    _release(device)
    results = [r.result for r in rows]
    on_progress(results, profiles)
    return results, profiles


# ------------------------------------------------------------------------------------------------ table
def add_ratios(results: list[RowResult]) -> None:
    base = results[0]
    for r in results:
        for phase in ("train", "infer"):
            mine, ref = getattr(r, phase), getattr(base, phase)
            if mine is None or ref is None:
                continue
            r.ratios[f"{phase}_img_s"] = mine.img_s / ref.img_s
            if mine.peak_mem_gib is not None and ref.peak_mem_gib:
                r.ratios[f"{phase}_peak_mem"] = mine.peak_mem_gib / ref.peak_mem_gib
            if mine.act_mem_gib is not None and ref.act_mem_gib:
                r.ratios[f"{phase}_act_mem"] = mine.act_mem_gib / ref.act_mem_gib


def _fmt(value, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}s}"
    return f"{value:{width}{spec}}"


def format_table(results: list[RowResult], env: dict, args: argparse.Namespace,
                 profiles: Optional[dict] = None) -> str:
    w = min(60, max(12, *(len(r.label) for r in results)))
    lines = [f"device: {env['device']} | torch {env['torch']} | batch {args.batch_size} | {args.img_size} px | "
             f"{args.dtype} | warmup {args.warmup}, median of {args.repeats} x {args.iters} iters unless the row "
             f"says otherwise{' | rows interleaved' if args.interleave else ''} | ratios (x) vs baseline: "
             f"{results[0].label}"]
    head = (f"{'row':{w}s} {'backend':13s} {'shuf':>5s} {'Mparam':>7s} | {'train img/s':>11s} {'x':>6s} "
            f"{'ms':>8s} {'peak GiB':>8s} {'act GiB':>7s} | {'infer img/s':>11s} {'x':>6s} {'peak GiB':>8s} "
            f"{'act GiB':>7s}")
    lines += [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.label[:w]:{w}s} {str(r.backend or '-')[:13]:13s} ERROR {r.error}")
            continue
        t, i = r.train, r.infer
        lines.append(
            f"{r.label[:w]:{w}s} {str(r.backend)[:13]:13s} {_fmt(r.shuffle_rate, '.2f', 5)} "
            f"{_fmt(r.params_m, '.2f', 7)} | {_fmt(t and t.img_s, '.1f', 11)} "
            f"{_fmt(r.ratios.get('train_img_s'), '.2f', 6)} {_fmt(t and t.step_ms, '.2f', 8)} "
            f"{_fmt(t and t.peak_mem_gib, '.2f', 8)} {_fmt(t and t.act_mem_gib, '.2f', 7)} | "
            f"{_fmt(i and i.img_s, '.1f', 11)} {_fmt(r.ratios.get('infer_img_s'), '.2f', 6)} "
            f"{_fmt(i and i.peak_mem_gib, '.2f', 8)} {_fmt(i and i.act_mem_gib, '.2f', 7)}")
    noisy = [f"{r.label} {phase} {100 * p.spread:.1f}%" for r in results for phase in ("train", "infer")
             if (p := getattr(r, phase)) is not None and len(p.step_ms_windows) > 1 and p.spread > 0.03]
    if noisy:
        lines.append("timing spread (max-min)/median above 3%: " + "; ".join(noisy))
    lines += gpu_time_lines(results, profiles or {})
    return "\n".join(lines)


def gpu_time_lines(results: list[RowResult], profiles: dict) -> list[str]:
    """Kernel time per step of the profiled rows, as ratios to the baseline's when it was profiled too: a
    host-bound row (eager launches, Python) has a wall-clock step that moves with the CPU, its GPU time does not."""
    gpu_ms = {r.label: profiles[r.label]["total_gpu_us_per_step"] / 1e3 for r in results
              if "total_gpu_us_per_step" in profiles.get(r.label, {})}
    if not gpu_ms:
        return []
    base = gpu_ms.get(results[0].label)
    parts = [f"{label} {ms:.2f} ms" + (f" ({base / ms:.2f}x)" if base and label != results[0].label else "")
             for label, ms in gpu_ms.items()]
    return [f"GPU time per {_step_name(next(iter(profiles.values())))} step (profiler; x = baseline's / row's): "
            + "; ".join(parts)]


# ------------------------------------------------------------------------------------------------ env / logging
def environment(device: torch.device) -> dict:
    from importlib import metadata

    env = {"torch": torch.__version__, "python": platform.python_version(), "device_type": device.type,
           "device": platform.processor() or platform.machine(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    for pkg in ("timm", "mamba_ssm", "causal_conv1d", "triton"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    return env


def _metric_key(label: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in label)


def log_mlflow(args: argparse.Namespace, env: dict, results: list[RowResult], json_path: Optional[str]) -> None:
    from visionmamba.tracking import Tracker

    tracker = Tracker(enabled=True, tracking_uri=args.mlflow, experiment_name=args.mlflow_experiment,
                      run_name=args.mlflow_run_name or f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker.start(tags={"kind": "benchmark", "device": env["device"]})
    tracker.log_params({**{f"env.{k}": v for k, v in env.items()},
                        **{f"cfg.{k}": v for k, v in vars(args).items() if k not in ("rows",)},
                        "rows": json.dumps([r.label for r in results])})
    metrics = {}
    for r in results:
        key = _metric_key(r.label)
        for phase in ("train", "infer"):
            p = getattr(r, phase)
            if p is None:
                continue
            metrics[f"{key}/{phase}_img_s"] = p.img_s
            metrics[f"{key}/{phase}_step_ms"] = p.step_ms
            if p.peak_mem_gib is not None:
                metrics[f"{key}/{phase}_peak_mem_gib"] = p.peak_mem_gib
                metrics[f"{key}/{phase}_act_mem_gib"] = p.act_mem_gib
        metrics.update({f"{key}/ratio_{k}": v for k, v in r.ratios.items()})
    tracker.log_metrics(metrics, step=0)
    if json_path:
        tracker.log_artifact(json_path)
    tracker.finish()


def _summary(r: RowResult) -> str:
    if r.error:
        return f"ERROR {r.error}"
    parts = [f"backend {r.backend}"]
    for phase in ("train", "infer"):
        p = getattr(r, phase)
        if p is not None:
            mem = f", peak {p.peak_mem_gib:.2f} GiB" if p.peak_mem_gib is not None else ""
            parts.append(f"{phase} {p.img_s:.1f} img/s ({p.step_ms:.2f} ms/step{mem})")
    return "; ".join(parts)


def _write_json(args, env, results, profiles, table) -> dict:
    out = {"env": env, "config": dict(vars(args)), "rows": [asdict(r) for r in results], "profiles": profiles,
           "table": table}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="model[@key=value,...]; the first row is the baseline")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: no autocast)")
    from visionmamba.ops import BACKENDS  # light: the kernels themselves are imported lazily

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernel backend of visionmamba rows without their own backend=")
    p.add_argument("--shuffle", default="default", help="default|on|off|<rate> for rows without their own shuffle=")
    p.add_argument("--compile", action="store_true", help="torch.compile every row (per row: compile=1)")
    p.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interleave", action="store_true",
                   help="keep all rows resident and alternate their timed windows (robust ratios; act memory only)")
    p.add_argument("--gpu-warmup-s", type=float, default=3.0,
                   help="seconds of matmuls before the first row, so the baseline does not meet idle clocks")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    p.add_argument("--mlflow", default=None, metavar="URI", help="log the run to this MLflow tracking URI")
    p.add_argument("--mlflow-experiment", default="benchmark")
    p.add_argument("--mlflow-run-name", default=None)
    p.add_argument("--profile", action="store_true",
                   help="profile train steps (inference steps with --mode infer) and print the top kernels")
    p.add_argument("--profile-rows", nargs="*", default=None, help="labels or model names to profile (default all)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--verbose", action="store_true", help="tracebacks for failing rows")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        # Benchmarks in fp32 use TF32 matmuls, as training would.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    specs = [parse_row(r, args) for r in args.rows]
    env = environment(device)
    warm_up_gpu(device, args.gpu_warmup_s)

    def on_progress(results, profiles):
        # Written as rows finish, so a run cut short still leaves what it measured.
        _write_json(args, env, results, profiles, table=None)

    runner = run_interleaved if args.interleave else run_sequential
    results, profiles = runner(specs, args, device, dtype, on_progress)
    add_ratios(results)
    table = format_table(results, env, args, profiles)
    print("\n" + table, flush=True)
    out = _write_json(args, env, results, profiles, table)
    if args.mlflow:
        log_mlflow(args, env, results, args.json)
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r["error"] for r in result["rows"]) else 0)
