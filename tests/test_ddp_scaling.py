"""The ``distributed:`` config block (DDP knobs, FSDP2 switch) and the global training metrics, on two CPU ranks.

* config: bad values and impossible combinations are ConfigErrors before anything runs;
* the knobs reach the DDP object, and static_graph=true trains the shuffling, drop-path model exactly like the
  default (every parameter is used every step: the graph's parameter set does not change);
* logging: throughput counts every rank's images over the slowest rank's time, the loss is the mean over all
  ranks' samples, and MLflow receives exactly the numbers of the progress line.
"""
from __future__ import annotations

import logging
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import train
from visionmamba import parallel
from visionmamba.parallel import ParallelOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


# ---- config ------------------------------------------------------------------------------------------------------
def test_default_block_is_the_fast_safe_ddp_setting(fw):
    options = train.parallel_options(fw.compose_train("data=synthetic"))
    assert options == ParallelOptions()  # the YAML and the dataclass agree
    assert options.ddp_kwargs() == dict(bucket_cap_mb=25.0, gradient_as_bucket_view=True, static_graph=False,
                                        find_unused_parameters=False, broadcast_buffers=True)
    fsdp = train.parallel_options(fw.compose_train("data=synthetic", "distributed.strategy=fsdp2",
                                                   "distributed.fsdp.param_dtype=bf16"))
    assert fsdp.strategy == "fsdp2" and fsdp.fsdp_param_dtype == "bf16" and fsdp.fsdp_reshard_after_forward


@pytest.mark.parametrize("overrides, message", [
    (["distributed.static_graph=true", "accum_steps=2"], "pytorch/pull/187732"),
    (["distributed.strategy=zero3"], "is not one of ddp, fsdp2"),
    (["distributed.bucket_cap_mb=0"], "bucket_cap_mb must be a number > 0"),
    (["distributed.fsdp.param_dtype=int8"], "fsdp.param_dtype must be null, fp32, bf16 or fp16"),
    (["+distributed.overlap=true"], "unknown distributed option(s): overlap"),
])
def test_bad_distributed_options_are_config_errors(fw, overrides, message):
    cfg = fw.compose_train("data=synthetic", *overrides)
    with pytest.raises(train.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.check_config(cfg)


def test_static_graph_without_accumulation_is_accepted(fw):
    train.check_config(fw.compose_train("data=synthetic", "distributed.static_graph=true"))


def test_fsdp2_on_a_torch_without_fully_shard_is_a_config_error(fw, monkeypatch):
    monkeypatch.setattr(parallel, "fsdp2_available", lambda: False)
    with pytest.raises(train.ConfigError, match=r"needs torch.distributed.fsdp.fully_shard \(torch >= 2.6\)"):
        train.check_config(fw.compose_train("data=synthetic", "distributed.strategy=fsdp2"))


def test_block_modules_of_every_family():
    """FSDP2's units: the outermost *Block modules, which hold most weights of the real-size models."""
    from visionmamba.models import create_model

    expected = {"shufflemamba_base": ("layers.", 24), "vmamba_tiny": ("layers.", 2 + 2 + 5 + 2),
                "mambaout_femto": ("stages.", 3 + 3 + 9 + 3), "local_vim_tiny": ("layers.", 20)}
    for name, (prefix, count) in expected.items():
        with torch.device("meta"):  # shapes only
            model = create_model(name)
        blocks = parallel.block_modules(model)
        names = {module: n for n, module in model.named_modules()}
        assert len(blocks) == count and all(names[b].startswith(prefix) for b in blocks), name
        inside = sum(p.numel() for b in blocks for p in b.parameters())
        assert inside > 0.6 * sum(p.numel() for p in model.parameters()), name  # MambaOut: a 2M MLP head


# ---- DDP knobs on two ranks ----------------------------------------------------------------------------------------
def _knobs_worker(rank: int, port: int, results) -> None:
    from visionmamba.engine import train_one_epoch
    from visionmamba.models import create_model

    _init(rank, port)
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(10 + rank))
    loader = DataLoader(TensorDataset(images, torch.arange(24) % 10), batch_size=4)
    try:
        for label, options in (("default", ParallelOptions()),
                               ("tuned", ParallelOptions(bucket_cap_mb=0.05, static_graph=True,
                                                         broadcast_buffers=False))):
            torch.manual_seed(rank)  # per-rank init, like train.py: DDP must broadcast rank 0's weights
            model = create_model("shufflemamba_test", num_classes=10, img_size=32, shuffle_rate=0.9,
                                 drop_path_rate=0.3)
            ddp = parallel.wrap_ddp(model, torch.device("cpu"), options)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            torch.manual_seed(100 + rank)  # the same shuffle / drop-path draws in both runs
            train_one_epoch(ddp, loader, optimizer, torch.nn.CrossEntropyLoss(), torch.device("cpu"), 0,
                            clip_grad=1.0, progress="none")
            results[(label, rank)] = dict(
                weights=torch.cat([p.detach().flatten() for p in model.parameters()]),
                bucket_bytes=ddp.bucket_bytes_cap, grad_view=ddp.gradient_as_bucket_view,
                static=ddp.static_graph, fired=sum(model.shuffle.fired))
    finally:
        dist.destroy_process_group()


def test_ddp_knobs_reach_ddp_and_static_graph_trains_identically():
    results = mp.Manager().dict()
    mp.spawn(_knobs_worker, args=(_free_port(), results), nprocs=2, join=True)
    default, tuned = results[("default", 0)], results[("tuned", 0)]
    assert (default["bucket_bytes"], default["grad_view"], default["static"]) == (25 * 1024 * 1024, True, False)
    assert (tuned["bucket_bytes"], tuned["grad_view"], tuned["static"]) == (int(0.05 * 1024 * 1024), True, True)
    assert default["fired"] > 0 and tuned["fired"] == default["fired"]  # the layer-wise shuffle did fire
    # static graph (no "graph changed" error with the shuffle and drop path on), small buckets and gradient views
    # give bit-identical updates to the default DDP, and both ranks hold the same replica
    assert torch.equal(tuned["weights"], default["weights"])
    assert torch.equal(results[("tuned", 1)]["weights"], tuned["weights"])


# ---- global training metrics ---------------------------------------------------------------------------------------
class _ConstantLoss(torch.nn.Module):
    """loss = the batch's label (every sample of rank r has label r + 1); the output takes part with weight 0."""

    def forward(self, output, targets):
        return output.sum() * 0.0 + targets.float().mean()


class _TimedModel(torch.nn.Module):
    """Linear model whose forward advances a fake clock by ``seconds`` (rank 0: 0.25 s, rank 1: 1 s per batch)."""

    def __init__(self, clock: list[float], seconds: float):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.clock, self.seconds = clock, seconds

    def forward(self, x):
        self.clock[0] += self.seconds
        return self.linear(x)


def _logging_worker(rank: int, port: int, store: str, results) -> None:
    from visionmamba import engine
    from visionmamba.tracking import Tracker

    _init(rank, port)
    clock = [0.0]
    engine.time = SimpleNamespace(perf_counter=lambda: clock[0])  # this spawned process only
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("visionmamba.engine").addHandler(handler)
    logging.getLogger("visionmamba.engine").setLevel(logging.INFO)
    tracker = Tracker(enabled=rank == 0, tracking_uri=store, experiment_name="global-metrics", run_name="ddp")
    tracker.start()
    logged: list[tuple[dict, int]] = []

    def on_log(metrics, step):
        logged.append((dict(metrics), step))
        tracker.log_metrics(metrics, step)

    # 6 batches of 4 images per rank, labels rank + 1: the loss is 1 on rank 0 and 2 on rank 1 (mean 1.5)
    data = TensorDataset(torch.randn(24, 3), torch.full((24,), rank + 1))
    model = torch.nn.parallel.DistributedDataParallel(_TimedModel(clock, 0.25 if rank == 0 else 1.0))
    try:
        stats = engine.train_one_epoch(model, DataLoader(data, batch_size=4), torch.optim.SGD(model.parameters(),
                                       lr=0.1), _ConstantLoss(), torch.device("cpu"), 0, log_every=3,
                                       on_log=on_log, progress="line")
        tracker.finish()
        results[rank] = dict(logged=logged, stats=stats, lines=lines, run_id=tracker.run_id)
    finally:
        dist.destroy_process_group()


def test_logged_throughput_and_loss_are_global_and_identical_in_mlflow(mlflow_store, fw):
    results = mp.Manager().dict()
    mp.spawn(_logging_worker, args=(_free_port(), mlflow_store, results), nprocs=2, join=True)
    rank0, rank1 = results[0], results[1]
    assert [step for _, step in rank0["logged"]] == [3, 6]
    for metrics, _ in rank0["logged"]:
        # 2 ranks x 3 batches x 4 images in a window; the slowest rank took 3 x 1 s (rank 0 alone: 0.75 s)
        assert metrics["throughput/img_per_s"] == pytest.approx(24 / 3.0)
        assert metrics["throughput/img_per_s_per_gpu"] == pytest.approx(12 / 3.0)
        assert metrics["train/loss"] == pytest.approx(1.5)  # (4 x 1 + 4 x 2) / 8 per update, not rank 0's 1.0
    assert rank1["logged"] == rank0["logged"]  # every rank computes the same global numbers
    assert rank0["stats"]["img_per_s"] == pytest.approx(48 / 6.0) and rank0["stats"]["loss"] == pytest.approx(1.5)

    progress = [line for line in rank0["lines"] if "img/s" in line]
    assert len(progress) == 2 and all("loss 1.5000" in line and "img/s 8 " in line for line in progress), progress
    assert not [line for line in rank1["lines"] if "img/s" in line]  # only rank 0 prints progress

    client, runs = fw.mlflow_runs(mlflow_store, "global-metrics")
    assert [run.info.run_id for run in runs] == [rank0["run_id"]]  # rank 1 opened no run
    for name in ("throughput/img_per_s", "throughput/img_per_s_per_gpu", "train/loss"):
        history = client.get_metric_history(rank0["run_id"], name)
        assert [(m.step, m.value) for m in history] == [(step, metrics[name]) for metrics, step in rank0["logged"]]
