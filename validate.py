"""Evaluate a checkpoint: top-1/top-5/loss and img/s, through the same `engine.evaluate` that train.py uses.

    python validate.py checkpoint=outputs/vim_test-digits/checkpoints/best.pth
    python validate.py checkpoint=best.pth use_ema=true data.root=/data/imagenet data.crop_pct=1.0
    torchrun --nproc_per_node=8 validate.py checkpoint=... model=vim_tiny data=imagefolder data.root=/data/imagenet

Model and data default to the config recorded in the checkpoint; `model=`/`data=` groups or single
`model.*`/`data.*` keys override it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from train import ConfigError, build_data, build_model, reported_user_errors
from visionmamba.checkpoint import load_weights, read_checkpoint_info
from visionmamba.distributed import cleanup, init_distributed
from visionmamba.engine import amp_dtype_for, evaluate
from visionmamba.utils import setup_logging

log = logging.getLogger("validate")


@hydra.main(config_path="conf", config_name="validate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported_user_errors():
        validate(cfg)


def fill_from_run_config(cfg: DictConfig, run_cfg: dict[str, Any] | None) -> None:
    """Complete ``model``/``data`` from the training run's recorded config: every non-null value given on the
    command line wins, the rest is taken as recorded. A ``data.img_size`` / ``data.num_classes`` given without its
    ``model.*`` counterpart carries over to the model (as the model files' ``${data.*}`` interpolations do in
    training), so ``data.img_size=256`` evaluates a model built for 256 px (position embeddings resized on load).
    Precision and eval batch size default to the run's too."""
    run_cfg = run_cfg or {}
    with open_dict(cfg):
        given_data: dict[str, Any] = {}
        for group in ("data", "model"):  # data first: model files interpolate ${data.img_size} / ${data.num_classes}
            given = {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items() if v is not None}
            if group == "data":
                given_data = given
            else:
                for key in ("img_size", "num_classes"):
                    if key in given_data and key not in given:
                        given[key] = given_data[key]
            merged = {**run_cfg.get(group, {}), **given}
            if not merged.get("name"):
                raise ConfigError(f"{cfg.checkpoint} records no {group} config: pass {group}=NAME")
            cfg[group] = merged
        if cfg.precision is None:
            cfg.precision = run_cfg.get("precision", "bf16")
        if cfg.batch_size is None:
            cfg.batch_size = run_cfg.get("eval_batch_size", 256)


def validate(cfg: DictConfig) -> dict[str, Any]:
    dist_info = init_distributed(cfg.device)
    setup_logging(dist_info.rank)
    try:
        checkpoint, info = read_checkpoint_info(cfg.checkpoint, trust_pickle=cfg.trust_checkpoint)
        fill_from_run_config(cfg, info["config"])
        model = build_model(cfg.model)
        # strict: in evaluation a classifier that does not fit is an error, not something to drop
        report = load_weights(model, cfg.checkpoint, use_ema=cfg.use_ema, checkpoint=checkpoint)
        model.to(dist_info.device)
        _, loader = build_data(cfg.data, None, "val", batch_size=cfg.batch_size, workers=cfg.workers,
                               distributed=dist_info.is_distributed, device=dist_info.device)
        metrics = evaluate(model, loader, dist_info.device, amp_dtype=amp_dtype_for(cfg.precision),
                           progress=cfg.progress, desc="validate")
        summary = {
            "checkpoint": str(Path(cfg.checkpoint).resolve()), "weights": report.weights, "format": info["format"],
            "model": cfg.model.name, "epoch": info["epoch"], "resized": report.resized, **metrics,
            "dataset": cfg.data.name, "root": cfg.data.get("root"), "img_size": cfg.data.img_size,
            "crop_pct": cfg.data.crop_pct, "precision": cfg.precision, "batch_size": cfg.batch_size,
            "world_size": dist_info.world_size,
        }
        if dist_info.is_main:
            _report(cfg, summary)
        return summary
    finally:
        cleanup()


def _report(cfg: DictConfig, summary: dict[str, Any]) -> None:
    print(f"{summary['model']} ({summary['weights']}, epoch {summary['epoch']}) on {summary['dataset']} "
          f"val, {summary['num_samples']} images at {summary['img_size']} px: top-1 {summary['top1']:.3f}  "
          f"top-5 {summary['top5']:.3f}  loss {summary['loss']:.4f}  {summary['img_per_s']:.1f} img/s", flush=True)
    checkpoint = Path(cfg.checkpoint)
    output = Path(cfg.output) if cfg.output else checkpoint.with_name(
        f"{checkpoint.stem}.val{'_ema' if cfg.use_ema else ''}.json")
    try:
        output.write_text(json.dumps(summary, indent=2))
    except OSError as exc:  # e.g. a read-only directory of downloaded weights: fall back to the launch dir
        log.warning("cannot write %s (%s); writing %s instead", output, exc, output.name)
        output = Path(output.name)
        output.write_text(json.dumps(summary, indent=2))
    log.info("summary written to %s", output)


if __name__ == "__main__":
    main()
