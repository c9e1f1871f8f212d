#!/usr/bin/env python
"""Compare MLflow runs (typically the points of a sweep): a table and a plot.

    python scripts/compare_runs.py --sweep shufflemamba_tiny-imagenet            # runs tagged sweep=<name>
    python scripts/compare_runs.py --tracking-uri sqlite:///mlflow.db --experiment visionmamba --out cmp.png

One row per run: the parameters that differ between the runs (the swept values, e.g. regularizer.shuffle.rate),
best and final val/top1 (and val_ema/top1 when logged), the mean global throughput, and the status. The PNG shows
top-1 against the swept value (when one numeric parameter was swept) and the validation curves of every run; it
is written to --out and logged as an artifact of a "compare" run in the same experiment (tagged with the sweep).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

TOP1 = "val/top1"
TOP1_EMA = "val_ema/top1"
THROUGHPUT = "throughput/img_per_s"
# Params that identify a run rather than describe the experiment: never shown as "swept".
_IDENTITY_PARAMS = ("run_name", "output_dir", "resume", "workers", "progress", "log_every", "device", "data.root",
                    "mlflow.enabled", "mlflow.tracking_uri", "mlflow.experiment_name", "hydra", "run_dir")


def _history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def collect(client, experiment_name: str, sweep: str | None) -> list[dict[str, Any]]:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"error: no MLflow experiment named {experiment_name!r} in this tracking store")
    query = f"tags.sweep = '{sweep}'" if sweep else ""
    runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=5000,
                              order_by=["attributes.start_time ASC"])
    rows = []
    for run in runs:
        if run.data.tags.get("visionmamba.kind") == "compare":
            continue
        top1 = _history(client, run.info.run_id, TOP1)
        if not top1:
            continue  # a run that never evaluated has nothing to compare
        ema = _history(client, run.info.run_id, TOP1_EMA)
        speed = _history(client, run.info.run_id, THROUGHPUT)
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name or run.info.run_id[:8],
            "status": run.info.status,
            "params": dict(run.data.params),
            "best_top1": max(m.value for m in top1),
            "final_top1": top1[-1].value,
            "best_ema_top1": max(m.value for m in ema) if ema else None,
            "img_per_s": sum(m.value for m in speed) / len(speed) if speed else None,
            "curve": [(m.step, m.value) for m in top1],
        })
    return rows


def swept_params(rows: list[dict[str, Any]]) -> list[str]:
    """Parameters whose value differs between runs (the sweep axes). A parameter that only mirrors another one
    (``model.shuffle_rate`` resolved from ``${regularizer.shuffle.rate}``) is shown once, under the name that was
    swept rather than the model's copy."""
    keys = set().union(*(r["params"] for r in rows)) if rows else set()
    varying = []
    for key in sorted(keys):
        if key.startswith(_IDENTITY_PARAMS):
            continue
        if len({r["params"].get(key) for r in rows}) > 1:
            varying.append(key)
    kept, seen = [], set()
    for key in sorted(varying, key=lambda k: (k.startswith("model."), k)):
        values = tuple(r["params"].get(key) for r in rows)
        if values not in seen:
            seen.add(values)
            kept.append(key)
    return sorted(kept)


def _as_number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_table(rows: list[dict[str, Any]], axes: list[str]) -> str:
    header = ["run", *axes, "best top1", "final top1", "best EMA top1", "img/s", "status"]
    lines = [header]
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append([r["name"], *(str(r["params"].get(a, "-")) for a in axes), fmt(r["best_top1"]),
                      fmt(r["final_top1"]), fmt(r["best_ema_top1"]),
                      "-" if r["img_per_s"] is None else f"{r['img_per_s']:.1f}", r["status"]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], axes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    numeric_axis = next((a for a in axes if all(_as_number(r["params"].get(a)) is not None for r in rows)), None)
    ncols = 2 if numeric_axis else 1
    fig, panels = plt.subplots(1, ncols, figsize=(6 * ncols, 4.2), squeeze=False)
    if numeric_axis:
        ax = panels[0][0]
        points = sorted((_as_number(r["params"][numeric_axis]), r["best_top1"], r["final_top1"]) for r in rows)
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", label="best")
        ax.plot(xs, [p[2] for p in points], "s--", label="final")
        ax.set_xlabel(numeric_axis)
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(f"top-1 vs {numeric_axis}")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = panels[0][-1]
    for r in rows:
        label = ", ".join(f"{a.split('.')[-1]}={r['params'].get(a)}" for a in axes) or r["name"]
        steps, values = zip(*r["curve"])
        ax.plot(steps, values, marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("validation curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="visionmamba")
    parser.add_argument("--sweep", default=None, help="only runs tagged sweep=<value> (train.py -m sets it)")
    parser.add_argument("--out", default="compare_runs.png", help="PNG path")
    parser.add_argument("--no-log", action="store_true", help="do not log the table/PNG to MLflow")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    rows = collect(client, args.experiment, args.sweep)
    if not rows:
        print("error: no run with validation metrics matches", file=sys.stderr)
        return 1
    axes = swept_params(rows)
    numeric = next((a for a in axes if all(_as_number(r["params"].get(a)) is not None for r in rows)), None)
    if numeric:
        rows.sort(key=lambda r: _as_number(r["params"][numeric]))
    table = format_table(rows, axes)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(rows, axes, args.out)
    print(f"\nwrote {args.out}")
    if not args.no_log:
        experiment_id = client.get_experiment_by_name(args.experiment).experiment_id
        tags = {"visionmamba.kind": "compare", **({"sweep": args.sweep} if args.sweep else {})}
        run = client.create_run(experiment_id, run_name=f"compare-{args.sweep or 'all'}", tags=tags)
        client.log_artifact(run.info.run_id, args.out)
        client.log_text(run.info.run_id, table + "\n", "compare_runs.txt")
        best = max(rows, key=lambda r: r["best_top1"])
        client.log_metric(run.info.run_id, "best/top1", best["best_top1"])
        client.set_terminated(run.info.run_id)
        print(f"logged to MLflow run {run.info.run_id} ({args.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
