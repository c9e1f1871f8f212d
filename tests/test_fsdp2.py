"""distributed.strategy=fsdp2 (FSDP2 ``fully_shard`` per block) through train.py on two CPU ranks (gloo).

FSDP2 runs on CPU with gloo in this torch, so the whole path is tested here, in-process in two spawned ranks (one
start-up for several jobs): FSDP2 from scratch for one epoch, resumed to two, against a DDP run of the same seed;
and DDP resuming FSDP2's checkpoint. The jobs use gradient accumulation (FSDP2's no-sync), gradient clipping (on
DTensors), an EMA (sharded like the model) and an evaluation shard one batch shorter on one rank (lockstep forwards).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from visionmamba.parallel import fsdp2_available

CONF = Path(__file__).resolve().parents[1] / "conf"
pytestmark = pytest.mark.skipif(not fsdp2_available(), reason="this torch has no torch.distributed.fsdp.fully_shard")

# 64 train images = one update of 16 x 2 micro-batches x 2 ranks per epoch; 35 val images with eval batches of 17:
# rank 0 scores 18 images in two batches, rank 1 17 in one (so rank 1 must pad one forward under FSDP2).
TRAIN_ARGS = [
    "model=vim_test", "data=synthetic", "data.img_size=32", "data.num_classes=10", "data.train_length=64",
    "data.val_length=35", "eval_batch_size=17", "regularizer=none", "regularizer.ema.enabled=true",
    "regularizer.ema.decay=0.5", "precision=fp32", "workers=0", "batch_size=16", "accum_steps=2", "clip_grad=0.5",
    "progress=none", "optimizer.scale_lr=false", "optimizer.base_lr=3e-3", "optimizer.schedule.warmup_epochs=0",
    "optimizer.schedule.min_lr=3e-3",  # a constant lr: the same for a 1-epoch run and a 2-epoch run
    "log_every=1", "mlflow.enabled=false", "epochs=2",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train_jobs(rank: int, jobs: list[tuple], output_dir: str, results) -> None:
    """Rank ``rank`` of a 2-rank world: run each (run_name, port, overrides, start_from) job with train.train, in
    order; ``start_from`` (a run name or None) puts that run's epoch-1 checkpoint into the new run directory first,
    so the job resumes it. results[(job index, rank)] = (final metrics, the job's ``train`` log messages)."""
    torch.set_num_threads(1)
    from hydra import compose, initialize_config_dir

    import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for index, (run_name, port, overrides, start_from) in enumerate(jobs):
        if start_from and rank == 0:  # only rank 0 looks for checkpoints (and tells the others which to load)
            (Path(output_dir) / run_name / "checkpoints").mkdir(parents=True)
            shutil.copy(Path(output_dir) / start_from / "checkpoints" / "epoch_0001.pth",
                        Path(output_dir) / run_name / "checkpoints")
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per job: the previous group is gone
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[*TRAIN_ARGS, f"output_dir={output_dir}", f"run_name={run_name}",
                                              *overrides])
        messages = _Messages()
        logging.getLogger("train").addHandler(messages)
        try:
            final = train.train(cfg)
        finally:
            logging.getLogger("train").removeHandler(messages)
        results[(index, rank)] = (final, messages.lines)


def _checkpoint(output_dir: Path, run: str, name: str = "epoch_0002.pth") -> dict:
    return torch.load(output_dir / run / "checkpoints" / name, map_location="cpu", weights_only=True)


def _assert_states_close(a: dict, b: dict, what: str, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m: f"{what} {key}: {m}")


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    """{run name: (final metrics of rank 0, of rank 1, rank 0's log messages)} of four 2-epoch jobs, and their dir."""
    out = tmp_path_factory.mktemp("fsdp2")
    fsdp2 = "distributed.strategy=fsdp2"
    jobs = [("ddp", _free_port(), [], None),
            ("fsdp2", _free_port(), [fsdp2], None),  # evaluates model and EMA twice in one process
            ("fsdp2_from_ddp", _free_port(), [fsdp2], "ddp"),  # resumes DDP's epoch-1 checkpoint under FSDP2
            ("ddp_from_fsdp2", _free_port(), [], "fsdp2")]  # and the other way round
    results = mp.Manager().dict()
    mp.spawn(_train_jobs, args=(jobs, str(out), results), nprocs=2, join=True)
    return out, {job[0]: (results[(i, 0)][0], results[(i, 1)][0], results[(i, 0)][1]) for i, job in enumerate(jobs)}


def test_fsdp2_trains_like_ddp(fsdp2_runs):
    out, runs = fsdp2_runs
    (ddp, _, ddp_log), (fsdp2, fsdp2_rank1, fsdp2_log) = runs["ddp"], runs["fsdp2"]
    assert any("distributed: fsdp2 (fully_shard per block" in line for line in fsdp2_log)
    assert any("distributed: ddp (bucket_cap_mb=25.0, gradient_as_bucket_view=True" in line for line in ddp_log)
    assert fsdp2["epoch"] == ddp["epoch"] == 2 and fsdp2["global_step"] == ddp["global_step"] == 2
    # model + EMA gathered in full on every rank: the same digest everywhere
    assert len(set(fsdp2["replica_digests"])) == 1 and len(set(ddp["replica_digests"])) == 1
    # the second evaluation sees the updated weights (no stale gathered root parameters), rank 1's shorter shard
    # is padded without being counted, and every rank reports the same global numbers
    for key in ("train/epoch_loss", "val/loss", "val/top1", "val_ema/loss", "val_ema/top1"):
        assert fsdp2[key] == pytest.approx(ddp[key], rel=1e-5, abs=1e-5), key
        assert fsdp2_rank1[key] == fsdp2[key], key

    ddp_state, fsdp2_state = _checkpoint(out, "ddp"), _checkpoint(out, "fsdp2")
    # the checkpoint is the same file as DDP's: full weights, EMA and AdamW moments keyed by parameter index
    _assert_states_close(fsdp2_state["model"], ddp_state["model"], "model")
    _assert_states_close(fsdp2_state["model_ema"], ddp_state["model_ema"], "model_ema")
    assert fsdp2_state["optimizer"]["param_groups"] == ddp_state["optimizer"]["param_groups"]
    assert fsdp2_state["optimizer"]["state"].keys() == ddp_state["optimizer"]["state"].keys()
    for index, entry in ddp_state["optimizer"]["state"].items():
        _assert_states_close(fsdp2_state["optimizer"]["state"][index], entry, f"optimizer state {index}")
    assert (fsdp2_state["epoch"], fsdp2_state["global_step"]) == (2, 2)
    first = _checkpoint(out, "fsdp2", "epoch_0001.pth")  # the weights moved: not two untouched initialisations
    assert (first["model"]["head.weight"] - fsdp2_state["model"]["head.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("run", ["fsdp2_from_ddp", "ddp_from_fsdp2"])
def test_resume_across_strategies(fsdp2_runs, run):
    """Epoch 1 under one strategy, epoch 2 under the other: the same weights, EMA and optimizer state as DDP for
    both epochs (a lost or mis-sharded AdamW state would show at the 1e-4 level)."""
    out, runs = fsdp2_runs
    (resumed, _, log_lines), ddp = runs[run], runs["ddp"][0]
    assert any("resuming from" in line and "epoch_0001.pth" in line for line in log_lines)
    assert any("changed since the checkpoint: distributed.strategy" in line for line in log_lines)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 2
    assert resumed["val/loss"] == pytest.approx(ddp["val/loss"], rel=1e-5)
    resumed_state, ddp_state = _checkpoint(out, run), _checkpoint(out, "ddp")
    for part in ("model", "model_ema"):
        _assert_states_close(resumed_state[part], ddp_state[part], part)
    for index, entry in ddp_state["optimizer"]["state"].items():
        _assert_states_close(resumed_state["optimizer"]["state"][index], entry, f"optimizer state {index}")
