#!/usr/bin/env python
"""Run a multi-stage recipe (conf/multistage/<name>.yaml): every stage in sequence, each its own run.

    python scripts/run_stages.py shufflemamba_reg_base --nproc-per-node 8 data.root=/data/imagenet
    python scripts/run_stages.py shufflemamba_reg_base --nnodes 4 --node-rank $RANK --rdzv-endpoint host0:29500 \
        data.root=/data/imagenet            # N nodes: the same command on every node
    python scripts/run_stages.py digits_two_stage                       # CPU example, one process

A stage is `train.py experiment=<stage experiment> run_name=<recipe>-<stage>` plus the stage's own overrides and
the extra overrides given here (they apply to every stage). ``init_from: previous`` hands the previous stage's run
directory to ``init_from=`` (its newest checkpoint, raw weights unless the experiment sets init_from_ema).
All stages log to the same MLflow experiment with the tags ``recipe`` and ``stage``. Re-running the command skips
stages that finished (their run directory holds final_metrics.json) and resumes the interrupted one (train.py's
auto-resume), so a crashed or preempted multi-week recipe continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES_DIR = ROOT / "conf" / "multistage"


def load_recipe(name: str) -> list[dict]:
    path = STAGES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in STAGES_DIR.glob("*.yaml"))
        raise SystemExit(f"error: no multi-stage recipe {name!r}; known: {', '.join(known)}")
    stages = yaml.safe_load(path.read_text()).get("stages") or []
    for i, stage in enumerate(stages):
        if "name" not in stage or "experiment" not in stage:
            raise SystemExit(f"error: {path}: stage {i} needs 'name' and 'experiment'")
        if stage.get("init_from") not in (None, "previous"):
            raise SystemExit(f"error: {path}: stage {stage['name']}: init_from must be 'previous' or absent")
        if i == 0 and stage.get("init_from") == "previous":
            raise SystemExit(f"error: {path}: the first stage has no previous stage")
    return stages


def _override_value(overrides: list[str], key: str, default: str) -> str:
    for item in overrides:
        if item.startswith(f"{key}="):
            return item.split("=", 1)[1]
    return default


def stage_commands(recipe: str, stages: list[dict], args, extra: list[str]) -> list[tuple[str, Path, list[str]]]:
    output_dir = Path(_override_value(extra, "output_dir", "outputs"))

    def launcher(stage_name: str) -> list[str]:
        if args.nproc_per_node <= 1 and args.nnodes <= 1:
            return [sys.executable, str(ROOT / "train.py")]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}",
               f"--nnodes={args.nnodes}"]
        if args.nnodes > 1:  # one rendezvous per stage: a stage never joins the previous stage's group
            cmd += [f"--node_rank={args.node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={args.rdzv_endpoint}",
                    f"--rdzv_id={args.rdzv_id or recipe}-{stage_name}"]
        else:
            cmd.append("--standalone")
        return cmd + [str(ROOT / "train.py")]

    commands, previous = [], None
    for stage in stages:
        run_name = f"{recipe}-{stage['name']}"
        cmd = launcher(stage["name"]) + [f"experiment={stage['experiment']}", f"run_name={run_name}",
                                         f"++mlflow.tags.recipe={recipe}", f"++mlflow.tags.stage={stage['name']}"]
        if stage.get("init_from") == "previous":
            cmd.append(f"init_from={previous}")
        cmd += list(stage.get("overrides") or []) + extra
        run_dir = output_dir / run_name
        commands.append((stage["name"], run_dir, cmd))
        previous = run_dir
    return commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s RECIPE [options] [hydra overrides ...]")
    parser.add_argument("recipe", help="name of conf/multistage/<recipe>.yaml")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--rdzv-endpoint", default="localhost:29500")
    parser.add_argument("--rdzv-id", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, extra = parser.parse_known_args(argv)
    for item in extra:
        if item.lstrip("+~").split("=", 1)[0] in ("run_name", "experiment", "init_from"):
            parser.error(f"{item}: set per stage by conf/multistage/{args.recipe}.yaml (run names are "
                         f"<recipe>-<stage>, each stage starts from the previous one); use output_dir= to move them")
    stages = load_recipe(args.recipe)
    commands = stage_commands(args.recipe, stages, args, extra)
    for name, run_dir, cmd in commands:
        done = (run_dir / "final_metrics.json").is_file()
        state = "done, skipped" if done else ("would run" if args.dry_run else "running")
        print(f"[{args.recipe}] stage {name}: {state} ({run_dir})", flush=True)
        if args.dry_run:
            print("  " + shlex.join(cmd))
            continue
        if done:
            continue
        result = subprocess.run(cmd, cwd=os.getcwd())
        if result.returncode != 0:
            print(f"[{args.recipe}] stage {name} failed with exit status {result.returncode}; "
                  "re-run the same command to resume it", file=sys.stderr)
            return result.returncode
    final = commands[-1][1] / "final_metrics.json"
    if not args.dry_run and final.is_file():
        metrics = json.loads(final.read_text())
        print(f"[{args.recipe}] all {len(commands)} stages done: final model in {commands[-1][1]}/checkpoints "
              f"(val top-1 {metrics.get('val/top1', float('nan')):.2f} after epoch {metrics.get('epoch')})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
