#!/usr/bin/env python
"""Multi-GPU training throughput of registered models under DDP / FSDP2 settings, and its scaling efficiency.

Driver mode (no torchrun around it): launches ``torchrun --standalone --nproc_per_node K`` once per K of ``--nproc``
and prints one table::

    python scripts/benchmark_ddp.py shufflemamba_tiny shufflemamba_base --nproc 1 2 4 --batch-size 128 \\
        --backend cuda --json ddp_bench.json

Worker mode (under your own torchrun, one K)::

    torchrun --nproc_per_node 4 scripts/benchmark_ddp.py shufflemamba_tiny shufflemamba_base --batch-size 128

Measured per model and setting: zero_grad + forward + cross-entropy + backward (+ gradient all-reduce or FSDP2's
all-gathers / reduce-scatters) + AdamW step, bf16 autocast (``--dtype``), random inputs and labels, ``--batch-size``
images per GPU; scripts/benchmark.py's timing (``--warmup`` steps, then ``--repeats`` windows of ``--iters`` steps,
CUDA events on a GPU) on every rank. A window's global time is the slowest rank's; the reported step time is the
median window, so global img/s = K x batch / that time.

Settings (``--grid``): ``full`` = every DDP combination of bucket_cap_mb 25/100/200 x gradient_as_bucket_view
off/on x static_graph off/on, plus FSDP2 (fp32 and bf16 parameters); ``oat`` = PyTorch's DDP defaults, then one
knob changed at a time, this repository's defaults and FSDP2 (faster); or ``--settings`` with explicit labels such as
``ddp:bucket=100,view=1,static=0`` / ``fsdp2`` / ``fsdp2:param_dtype=bf16,reshard=0``. Rows marked ``*`` are the
conf/train.yaml defaults.

Scaling efficiency = img/s(K) / (K x img/s(1)), where img/s(1) is the same model trained by one process without any
wrapper, measured in the same invocation: by the K=1 launch in driver mode, else by rank 0 alone (the other ranks
wait) before the K-rank settings.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

import benchmark as bench  # noqa: E402  (scripts/benchmark.py: model building and timing helpers)
from visionmamba.parallel import ParallelOptions  # noqa: E402
from visionmamba.utils import COMPILE_MODES  # noqa: E402

log = logging.getLogger("benchmark_ddp")

SINGLE = "single (no wrapper)"
_DEFAULTS = ParallelOptions()  # conf/train.yaml's distributed block
_DDP_KEYS = {"bucket": ("bucket_cap_mb", float), "view": ("gradient_as_bucket_view", bool),
             "static": ("static_graph", bool)}
_FSDP_KEYS = {"param_dtype": ("fsdp_param_dtype", str), "reduce_dtype": ("fsdp_reduce_dtype", str),
              "reshard": ("fsdp_reshard_after_forward", bool)}


# ------------------------------------------------------------------------------------------------ settings
def setting_label(options: ParallelOptions) -> str:
    if options.strategy == "fsdp2":
        parts = [f"param_dtype={options.fsdp_param_dtype}"] if options.fsdp_param_dtype else []
        parts += [] if options.fsdp_reshard_after_forward else ["reshard=0"]
        return "fsdp2" + (":" + ",".join(parts) if parts else "")
    return (f"ddp:bucket={options.bucket_cap_mb:g},view={int(options.gradient_as_bucket_view)},"
            f"static={int(options.static_graph)}")


def parse_setting(text: str) -> ParallelOptions:
    """``ddp:bucket=100,view=1,static=0`` / ``fsdp2:param_dtype=bf16,reshard=0`` -> ParallelOptions; keys left out
    keep PyTorch's DDP defaults (bucket 25, no gradient views, no static graph) resp. our FSDP2 defaults."""
    strategy, _, rest = text.partition(":")
    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"setting {text!r}: expected ddp:... or fsdp2:...")
    keys = _DDP_KEYS if strategy == "ddp" else _FSDP_KEYS
    values: dict[str, Any] = {"strategy": strategy}
    if strategy == "ddp":
        values.update(bucket_cap_mb=25.0, gradient_as_bucket_view=False, static_graph=False)  # PyTorch's defaults
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"setting {text!r}: expected key=value with key in {', '.join(keys)}, got {item!r}")
        field, kind = keys[key]
        if kind is bool:
            if value not in ("0", "1", "true", "false"):
                raise ValueError(f"setting {text!r}: {key} must be 0 or 1, got {value!r}")
            values[field] = value in ("1", "true")
        else:
            values[field] = kind(value)
    return ParallelOptions(**values)


def settings_grid(name: str) -> list[ParallelOptions]:
    pytorch_default = parse_setting("ddp")
    if name == "full":
        ddp = [parse_setting(f"ddp:bucket={b},view={v},static={s}")
               for b in (25, 100, 200) for v in (0, 1) for s in (0, 1)]
        return ddp + [parse_setting("fsdp2"), parse_setting("fsdp2:param_dtype=bf16")]
    if name == "oat":  # one knob at a time from PyTorch's defaults, then ours
        grid = [pytorch_default, parse_setting("ddp:bucket=100"), parse_setting("ddp:bucket=200"),
                parse_setting("ddp:view=1"), parse_setting("ddp:static=1"), _DEFAULTS, parse_setting("fsdp2")]
        return list(dict.fromkeys(grid))  # ours may coincide with one of the others
    raise ValueError(f"unknown grid {name!r}: full | oat")


def is_repo_default(options: ParallelOptions) -> bool:
    return options == _DEFAULTS


# ------------------------------------------------------------------------------------------------ worker
def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(model_name: str, options: Optional[ParallelOptions], args, device: torch.device, dtype,
             world: int, rank: int) -> dict[str, Any]:
    """One model under one setting (None: one process, no wrapper) on this rank; this rank's timing windows."""
    from visionmamba import parallel

    spec = bench.RowSpec(model_name, args.backend, args.shuffle, args.compile, model_name, args.warmup, args.iters,
                         args.repeats)
    result = bench.RowResult(label=model_name, model=model_name, family="?")
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs: seconds faster per row for the large models
        model = bench.build_model(spec, argparse.Namespace(img_size=args.img_size, num_classes=args.num_classes,
                                                           device=device), result)
    knobs: dict[str, Any] = {}
    train_model = model
    if options is not None and options.strategy == "ddp":
        train_model = parallel.wrap_ddp(model, device, options)
        knobs = dict(bucket_bytes_cap=train_model.bucket_bytes_cap,
                     gradient_as_bucket_view=train_model.gradient_as_bucket_view,
                     static_graph=train_model.static_graph)  # what the DDP object really got
    elif options is not None:
        parallel.shard_model(model, device, options)
        knobs = dict(sharded_units=len(parallel.block_modules(model)) + 1)
    if args.compile:  # around the DDP / FSDP2 wrapper, as train.py does (DDP's optimizer splits at buckets)
        train_model = torch.compile(train_model, mode=args.compile_mode)
    generator = torch.Generator(device="cpu").manual_seed(args.seed + rank)  # every rank its own batch
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    step, optimizer = bench.make_train_step(train_model, images, labels, device, dtype)
    phase = bench.time_steps(step, device, args.warmup, args.iters, args.repeats, args.batch_size)
    out = dict(windows=phase.step_ms_windows, peak_mem_gib=phase.peak_mem_gib, params_m=result.params_m,
               backend=result.backend, knobs=knobs)
    if args.profile:  # this rank's GPU busy fraction and top kernels (all-reduce kernels included)
        out["profile"] = bench.profile_steps(step, device, args.profile_steps, args.profile_top)
    optimizer.zero_grad(set_to_none=True)
    del step, optimizer, train_model, model
    _release(device)
    return out


def _row(model_name: str, label: str, nproc: int, per_rank: list[dict], batch: int, default: bool) -> dict:
    """Global numbers from every rank's windows: a window lasts as long as its slowest rank."""
    windows = [max(ms) for ms in zip(*(r["windows"] for r in per_rank))]
    phase = bench.phase_from_windows(windows, batch * nproc, None, None)
    peaks = [r["peak_mem_gib"] for r in per_rank if r["peak_mem_gib"] is not None]
    first = per_rank[0]
    return dict(model=model_name, setting=label, nproc=nproc, repo_default=default, img_s=phase.img_s,
                img_s_per_gpu=phase.img_s / nproc, step_ms=phase.step_ms, step_ms_windows=windows,
                spread=phase.spread, peak_mem_gib=max(peaks) if peaks else None, params_m=first["params_m"],
                backend=first["backend"], knobs=first["knobs"], efficiency=None, baseline_img_s=None, error=None,
                profiles=[r["profile"] for r in per_rank if "profile" in r])


def _print_profiles(row: dict) -> None:
    for rank, prof in enumerate(row.get("profiles") or []):
        bench.print_profile(f"{row['model']} {row['setting']} x{row['nproc']}, rank {rank}", prof)


def run_worker(args) -> list[dict]:
    """Every rank of a torchrun job (or a plain single process): measure, rank 0 collects and writes."""
    from visionmamba.distributed import all_gather_object, barrier, cleanup, init_distributed

    dist_info = init_distributed(args.device)
    device, world, rank = dist_info.device, dist_info.world_size, dist_info.rank
    dtype = bench.DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    settings = [parse_setting(s) for s in args.settings] if args.settings else settings_grid(args.grid)
    env = environment(device, world)
    bench.warm_up_gpu(device, args.gpu_warmup_s)
    rows: list[dict] = []

    def save() -> None:  # after every row, so a job cut short (OOM on one rank kills all) keeps what it measured
        if rank == 0 and args.worker_json:
            Path(args.worker_json).write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))

    try:
        for model_name in args.models:
            if world == 1 or not args.no_baseline:
                if rank == 0:  # the 1-process baseline; the other ranks wait
                    log.info("%s: one process, no wrapper", model_name)
                    single = _measure(model_name, None, args, device, dtype, 1, 0)
                    rows.append(_row(model_name, SINGLE, 1, [single], args.batch_size, False))
                    _print_profiles(rows[-1])
                    save()
                barrier()
            if world == 1:
                continue
            for options in settings:
                label = setting_label(options)
                if rank == 0:
                    log.info("%s: %s on %d ranks", model_name, label, world)
                mine = _measure(model_name, options, args, device, dtype, world, rank)
                per_rank = all_gather_object(mine)
                if rank == 0:
                    rows.append(_row(model_name, label, world, per_rank, args.batch_size, is_repo_default(options)))
                    log.info("%s %s: %.1f img/s", model_name, label, rows[-1]["img_s"])
                    _print_profiles(rows[-1])
                    save()
    finally:
        save()
        cleanup()
    return rows if rank == 0 else []


# ------------------------------------------------------------------------------------------------ driver
def _worker_command(args, nproc: int, worker_json: str, no_baseline: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), *args.models, "--batch-size", str(args.batch_size), "--img-size",
           str(args.img_size), "--num-classes", str(args.num_classes), "--dtype", args.dtype, "--backend",
           args.backend, "--shuffle", args.shuffle, "--warmup", str(args.warmup), "--iters", str(args.iters),
           "--repeats", str(args.repeats), "--device", args.device, "--seed", str(args.seed), "--grid", args.grid,
           "--gpu-warmup-s", str(args.gpu_warmup_s), "--worker-json", worker_json, "--profile-steps",
           str(args.profile_steps), "--profile-top", str(args.profile_top)]
    cmd += ["--compile", "--compile-mode", args.compile_mode] if args.compile else []
    cmd += ["--profile"] if args.profile else []
    if args.settings:
        cmd += ["--settings", *args.settings]
    if no_baseline:
        cmd.append("--no-baseline")
    return cmd


def run_driver(args) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    env: dict = {}
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            worker_json = str(Path(tmp) / "rows.json")
            # with a K=1 launch in the list, it provides the baseline; otherwise every launch measures its own
            cmd = _worker_command(args, nproc, worker_json, no_baseline=1 in args.nproc and nproc > 1)
            log.info("launching: %s", " ".join(cmd))
            env_vars = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            proc = subprocess.run(cmd, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            sys.stdout.write(proc.stdout)
            got = json.loads(Path(worker_json).read_text()) if Path(worker_json).is_file() else {"rows": []}
            env = env or got.get("env", {})
            rows += got["rows"]
            if proc.returncode != 0:
                tail = " | ".join(proc.stdout.strip().splitlines()[-3:])[-500:]
                rows.append(dict(model="*", setting=f"torchrun --nproc_per_node {nproc}", nproc=nproc,
                                 error=f"exit status {proc.returncode} after {len(got['rows'])} rows: {tail}"))
    return rows, env


# ------------------------------------------------------------------------------------------------ output
def add_efficiency(rows: list[dict]) -> None:
    baselines = {r["model"]: r["img_s"] for r in rows if r.get("setting") == SINGLE and not r.get("error")}
    for r in rows:
        if r.get("error") or r["model"] not in baselines:
            continue
        r["baseline_img_s"] = baselines[r["model"]]
        r["efficiency"] = r["img_s"] / (r["nproc"] * baselines[r["model"]])


def environment(device: torch.device, world: int) -> dict:
    env = bench.environment(device)
    env.update(cpu_cores=os.cpu_count(), cpu_cores_usable=len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else os.cpu_count(), hostname=platform.node(), world_size=world)
    if device.type == "cuda":
        env["gpus_visible"] = torch.cuda.device_count()
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - informational only
            env["nccl"] = None
    return env


def format_table(rows: list[dict], env: dict, args) -> str:
    lines = [f"device: {env.get('device')} ({env.get('gpus_visible', '-')} visible) | torch {env.get('torch')} | "
             f"cuda {env.get('cuda')} | nccl {env.get('nccl', '-')} | {env.get('cpu_cores_usable')} CPU cores | "
             f"batch {args.batch_size}/GPU | {args.img_size} px | {args.dtype} | backend {args.backend}"
             f"{' | torch.compile ' + args.compile_mode if getattr(args, 'compile', False) else ''} | warmup "
             f"{args.warmup}, median of {args.repeats} x {args.iters} iters | eff. = img/s / (GPUs x 1-GPU img/s) | "
             "* = conf/train.yaml default"]
    head = (f"{'model':22s} {'setting':34s} {'GPUs':>4s} {'img/s':>9s} {'img/s/GPU':>9s} {'eff.':>6s} "
            f"{'ms/step':>8s} {'spread':>6s} {'peak GiB':>8s}")
    lines += [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model'][:22]:22s} {r['setting'][:34]:34s} {r['nproc']:4d} ERROR {r['error']}")
            continue
        setting = r["setting"] + (" *" if r.get("repo_default") else "")
        eff = f"{r['efficiency']:6.3f}" if r.get("efficiency") is not None else f"{'-':>6s}"
        peak = f"{r['peak_mem_gib']:8.2f}" if r.get("peak_mem_gib") is not None else f"{'-':>8s}"
        lines.append(f"{r['model'][:22]:22s} {setting[:34]:34s} {r['nproc']:4d} {r['img_s']:9.1f} "
                     f"{r['img_s_per_gpu']:9.1f} {eff} {r['step_ms']:8.2f} {100 * r['spread']:5.1f}% {peak}")
    best = {}
    for r in rows:
        if not r.get("error") and r["setting"] != SINGLE:
            key = (r["model"], r["nproc"])
            if key not in best or r["img_s"] > best[key]["img_s"]:
                best[key] = r
    for (model, nproc), r in best.items():
        eff = f", efficiency {r['efficiency']:.3f}" if r.get("efficiency") is not None else ""
        lines.append(f"best on {nproc} GPUs for {model}: {r['setting']} ({r['img_s']:.1f} img/s{eff})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="registered model names, e.g. shufflemamba_tiny shufflemamba_base")
    p.add_argument("--nproc", type=int, nargs="+", default=None,
                   help="driver mode: launch torchrun with each of these process counts (e.g. 1 2 4)")
    p.add_argument("--batch-size", type=int, default=128, help="images per GPU (per process)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default="bf16", help="autocast dtype (fp32: none)")
    from visionmamba.ops import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto", help="selective-scan kernels (cuda, fast, ...)")
    p.add_argument("--shuffle", default="default", help="layer-wise shuffle: default|on|off|<rate>")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--grid", choices=("full", "oat"), default="full", help="which settings (see above)")
    p.add_argument("--settings", nargs="+", default=None, help="explicit settings instead of --grid")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-warmup-s", type=float, default=3.0)
    p.add_argument("--json", default=None, help="write the rows, environment and table as JSON here")
    p.add_argument("--no-baseline", action="store_true", help="skip the 1-process baseline of a K-rank run")
    p.add_argument("--compile", action="store_true", help="torch.compile the (wrapped) model, as train.py compile=true")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile a few steps on every rank: GPU busy %% and the top kernels")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-top", type=int, default=12)
    p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)  # driver <-> worker hand-over
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for text in args.settings or []:
        parse_setting(text)  # fail before launching anything
    under_torchrun = "WORLD_SIZE" in os.environ
    if args.nproc and not under_torchrun:
        rows, env = run_driver(args)
    else:
        if args.nproc:
            log.warning("--nproc is ignored under torchrun (this job has %s processes)", os.environ["WORLD_SIZE"])
        rows = run_worker(args)
        if int(os.environ.get("RANK", "0")) != 0:
            return {}
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if (
            args.device != "cpu" and torch.cuda.is_available()) else torch.device("cpu")
        env = environment(device, int(os.environ.get("WORLD_SIZE", "1")))
        if args.worker_json:  # driven: the driver prints the table
            return {"env": env, "rows": rows}
    add_efficiency(rows)
    table = format_table(rows, env, args)
    print("\n" + table, flush=True)
    out = {"env": env, "config": {k: v for k, v in vars(args).items() if k != "worker_json"}, "rows": rows,
           "table": table, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r.get("error") for r in result.get("rows", [])) else 0)
