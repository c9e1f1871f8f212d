"""torchrun on CPU (gloo): one run directory, one MLflow run, identical replicas, exact distributed evaluation,
and a collective non-finite-loss decision that never hangs."""
from __future__ import annotations

import json
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset



def _ddp_run(getfixture):
    """The commands behind ``ddp_run`` (conftest's ``runs_ahead`` starts them when the session starts): training,
    then validate.py on its checkpoint, both under torchrun. The MLflow store is their own: the session's shared one
    may be written by a test running meanwhile."""
    fw, cwd, data_root = getfixture("fw"), getfixture("tmp_path_factory").mktemp("ddp"), getfixture("digits_root")
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    # 16 images x 2 micro-steps x 2 ranks: the global batch of the single-process run, through DDP's no_sync path
    args = ["train.py", *fw.fast_train_args(data_root), "batch_size=16", "accum_steps=2", "clip_grad=1.0",
            "eval_batch_size=32", "epochs=1", "run_name=ddp", *fw.tracking_args(store, "ddp")]
    run_dir = cwd / "outputs" / "ddp"

    def job(run_script) -> SimpleNamespace:
        proc = run_script(args, cwd, timeout=600, torchrun_nproc=2)
        # its exit status is test_torchrun_validate_is_exact_and_matches_training's to check
        validated = run_script(["validate.py", f"checkpoint={run_dir / 'checkpoints' / 'epoch_0001.pth'}",
                                "use_ema=true", "workers=0", "batch_size=50", f"data.root={data_root}"], cwd,
                               check=False, torchrun_nproc=2)
        final = json.loads((run_dir / "final_metrics.json").read_text())
        return SimpleNamespace(cwd=cwd, run_dir=run_dir, final=final, output=proc.stdout, store=store,
                               data_root=data_root, validated=validated)

    return job


RUNS_AHEAD = {"ddp_run": _ddp_run}


@pytest.fixture(scope="module")
def ddp_run(runs_ahead, request) -> SimpleNamespace:
    """``torchrun --nproc_per_node=2 train.py``: vim_test, one epoch of digits, global batch 64; then
    ``torchrun --nproc_per_node=2 validate.py`` on its checkpoint's EMA weights."""
    return runs_ahead.result("ddp_run", _ddp_run, request.getfixturevalue)


def test_one_run_dir_one_mlflow_run_identical_replicas(ddp_run, fw):
    assert [p.name for p in (ddp_run.cwd / "outputs").iterdir()] == ["ddp"]
    assert sorted(p.name for p in ddp_run.run_dir.iterdir()) == [
        ".hydra", "checkpoints", "config.yaml", "final_metrics.json", "mlflow_run.json", "train.log"]
    log_text = (ddp_run.run_dir / "train.log").read_text()
    assert "world_size=2" in log_text and "[rank 1]" not in log_text  # rank 1 writes no log file of its own

    digests = ddp_run.final["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "DDP replicas diverged"
    assert ddp_run.final["global_step"] == (1437 // 2 // 16) // 2  # 718 images per rank, 44 micro-batches
    assert ddp_run.final["val/top1"] > 30.0

    client, runs = fw.mlflow_runs(ddp_run.store, "ddp")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["world_size"] == "2" and run.data.params["derived.global_batch"] == "64"
    per_gpu = client.get_metric_history(run.info.run_id, "throughput/img_per_s_per_gpu")[-1].value
    total = client.get_metric_history(run.info.run_id, "throughput/img_per_s")[-1].value
    assert total == pytest.approx(2 * per_gpu)


def test_torchrun_validate_is_exact_and_matches_training(ddp_run):
    """Two ranks score disjoint shards of the 360 val images: no padding duplicates, same numbers as training.
    (``torchrun --nproc_per_node=2 validate.py checkpoint=... use_ema=true workers=0 batch_size=50 data.root=...``
    is run by the fixture.)"""
    proc = ddp_run.validated
    assert proc.returncode == 0, f"validate.py exited with {proc.returncode}:\n{proc.stdout[-6000:]}"
    checkpoint = ddp_run.run_dir / "checkpoints" / "epoch_0001.pth"
    summary = json.loads(checkpoint.with_name("epoch_0001.val_ema.json").read_text())
    assert summary["world_size"] == 2 and summary["num_samples"] == 360 and summary["weights"] == "model_ema"
    assert summary["top1"] == pytest.approx(ddp_run.final["val_ema/top1"], abs=1e-9)
    assert summary["loss"] == pytest.approx(ddp_run.final["val_ema/loss"], rel=1e-5)


# ---- collective non-finite handling, in-process with two gloo ranks ---------------------------------------------
class _PoisonOnRank(torch.nn.Module):
    """A linear model whose loss turns NaN on one rank at one step (a bad sample on one GPU)."""

    def __init__(self, poisoned_rank: int, poisoned_call: int):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.poisoned_rank, self.poisoned_call, self.calls = poisoned_rank, poisoned_call, 0

    def forward(self, x):
        self.calls += 1
        out = self.linear(x)
        if dist.get_rank() == self.poisoned_rank and self.calls == self.poisoned_call:
            out = out * float("nan")
        return out


def _nonfinite_worker(rank: int, port: int, results):
    from torch.nn.parallel import DistributedDataParallel

    from visionmamba.engine import NonFiniteLossError, train_one_epoch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    data = TensorDataset(torch.randn(24, 4, generator=torch.Generator().manual_seed(rank)), torch.arange(24) % 3)
    loader = DataLoader(data, batch_size=4)
    try:
        for policy in ("skip", "stop"):
            torch.manual_seed(0)
            model = _PoisonOnRank(poisoned_rank=1, poisoned_call=3)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            try:
                stats = train_one_epoch(DistributedDataParallel(model), loader, optimizer,
                                        torch.nn.CrossEntropyLoss(), torch.device("cpu"), 0, nonfinite=policy,
                                        progress="none")
                weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
                results[(policy, rank)] = ("ok", stats["skipped_steps"], stats["num_updates"], weights)
            except NonFiniteLossError as exc:
                results[(policy, rank)] = ("stopped", str(exc))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_nan_on_one_rank_gets_the_same_decision_on_both():
    """Rank 1 alone sees a NaN loss at its third step: with nonfinite=skip both ranks drop that update and stay
    identical; with nonfinite=stop both raise. Neither hangs (a hang would end in pytest's timeout)."""
    results = mp.Manager().dict()
    mp.spawn(_nonfinite_worker, args=(_free_port(), results), nprocs=2, join=True)
    (status0, skipped0, updates0, weights0), (status1, skipped1, updates1, weights1) = (
        results[("skip", 0)], results[("skip", 1)])
    assert status0 == status1 == "ok" and skipped0 == skipped1 == 1 and updates0 == updates1 == 6
    assert weights0 == weights1 and all(math.isfinite(w) for w in weights0)  # the NaN never reached the weights
    assert results[("stop", 0)][0] == results[("stop", 1)][0] == "stopped"
    assert "non-finite loss" in results[("stop", 0)][1]
