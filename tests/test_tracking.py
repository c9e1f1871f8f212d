"""MLflow tracking against a real sqlite store: what a training run records, the one-run-per-job rule across
restarts, and that a missing or disabled tracking server never stops training."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import train
from visionmamba.tracking import Tracker, flatten_config

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_METRICS = ("train/loss", "train/lr", "throughput/img_per_s", "throughput/img_per_s_per_gpu",
                 "memory/max_allocated_gb")
EVAL_METRICS = ("val/top1", "val/top5", "val/loss", "val_ema/top1", "val_ema/top5", "val_ema/loss")


def test_training_run_records_params_metrics_tags_and_artifacts(trained_run, fw):
    client, runs = fw.mlflow_runs(trained_run.cwd)  # the default store: sqlite:///mlflow.db in the launch dir
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    assert run.info.run_id == trained_run.final["mlflow_run_id"]

    params = run.data.params
    assert params["model.name"] == "vim_test" and params["data.name"] == "digits" and params["epochs"] == "2"
    assert params["optimizer.base_lr"] == "0.002" and params["derived.lr"] == "0.002"
    assert params["derived.global_batch"] == "64" and params["derived.world_size"] == "1"
    assert params["regularizer.mixup.mixup_alpha"] == "0.0"  # nested keys flattened with dots

    tags = run.data.tags
    assert tags["model"] == "vim_test" and tags["world_size"] == "1" and tags["kernel_backend"] == "ref"
    assert tags["run_dir"] == str(trained_run.run_dir.resolve())
    assert "git_commit" in tags  # this checkout is a git repository

    for name in TRAIN_METRICS:  # one point per log interval (log_every=10 of 22 steps: steps 10, 20, 22, ...)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == [10, 20, 22, 32, 42, 44], (name, steps)
    for name in EVAL_METRICS:  # one point per evaluated epoch
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    assert run.data.metrics["val/top1"] == trained_run.final["val/top1"]
    assert abs(run.data.metrics["model/params_m"] - 0.17729) < 1e-3  # vim_test with a 10-class head
    assert 0 < run.data.metrics["model/gmacs"] < 0.01

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "final_metrics.json", str(trained_run.cwd / "dl"))
    assert json.loads(open(local).read())["val/top1"] == trained_run.final["val/top1"]


def test_unreachable_tracking_server_warns_once_and_training_completes(tmp_path, monkeypatch, caplog, fw):
    monkeypatch.chdir(tmp_path)
    cfg = fw.compose_train(*fw.synthetic_args("offline"), "epochs=2", "mlflow.tracking_uri=http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING):
        final = train.train(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "visionmamba.tracking"]
    assert sum("is unavailable" in m for m in warnings) == 1, warnings
    assert any("could not be delivered" in m for m in warnings)  # the loss is reported, not silent
    assert final["epoch"] == 2 and final["mlflow_run_id"] is None
    assert (tmp_path / "outputs" / "offline" / "checkpoints" / "epoch_0002.pth").is_file()


def _two_point_sweep(getfixture):
    """``train.py -m`` over 2 shuffle rates, in a directory and MLflow store of its own (conftest's ``runs_ahead``
    starts it when the session starts)."""
    fw, cwd = getfixture("fw"), getfixture("tmp_path_factory").mktemp("tracking-sweep")
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    args = ["train.py", "-m", *fw.synthetic_args("sweep"), "epochs=1", "regularizer.shuffle.rate=0,0.5",
            f"mlflow.tracking_uri={store}", "mlflow.experiment_name=sweep"]

    def job(run_script) -> tuple[Path, str]:
        run_script(args, cwd)
        return cwd, store

    return job


RUNS_AHEAD = {"two_point_sweep": _two_point_sweep}


@pytest.fixture(scope="module")
def two_point_sweep(runs_ahead, request):
    return runs_ahead.result("two_point_sweep", _two_point_sweep, request.getfixturevalue)


def test_sweep_gives_each_job_its_own_run_dir_and_mlflow_run(two_point_sweep, fw):
    cwd, store = two_point_sweep
    jobs = sorted(p.name for p in (cwd / "outputs" / "sweep").iterdir() if p.is_dir())
    assert jobs == ["regularizer.shuffle.rate=0", "regularizer.shuffle.rate=0.5"]  # named by the swept values only
    _, runs = fw.mlflow_runs(store, "sweep")
    assert sorted(r.info.run_name for r in runs) == [f"sweep/{job}" for job in jobs]
    assert {r.data.tags["sweep"] for r in runs} == {"sweep"}
    assert sorted(r.data.params["model.shuffle_rate"] for r in runs) == ["0", "0.5"]


def test_mlflow_disabled_creates_no_store(tmp_path, monkeypatch, caplog, fw):
    """In-process through train.train(), as a library user would call it (no Hydra run, same rules)."""
    monkeypatch.chdir(tmp_path)
    cfg = fw.compose_train(*fw.synthetic_args("untracked"), "epochs=1", "mlflow.enabled=false")
    final = train.train(cfg)
    assert final["epoch"] == 1 and final["mlflow_run_id"] is None
    assert (tmp_path / "outputs" / "untracked" / "checkpoints" / "epoch_0001.pth").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "outputs" / "untracked" / "mlflow_run.json").exists()

    # Running the finished job again trains nothing and changes nothing.
    with caplog.at_level(logging.INFO, logger="train"):
        again = train.train(cfg)
    assert any("run already complete" in r.getMessage() for r in caplog.records)
    assert again["epoch"] == 1 and again["global_step"] == final["global_step"]
    assert sorted(p.name for p in (tmp_path / "outputs" / "untracked" / "checkpoints").iterdir()) == [
        "best.pth", "epoch_0001.pth"]


def test_tracker_reopens_its_run_and_records_changed_params(tmp_path, mlflow_store, fw):
    state = tmp_path / "mlflow_run.json"

    def tracker() -> Tracker:
        return Tracker(enabled=True, tracking_uri=mlflow_store, experiment_name="tracker-unit", run_name="unit",
                       state_file=state)

    first = tracker()
    first.start(tags={"model": "vim_test", "skipped": None})
    first.log_params(flatten_config({"optimizer": {"lr": 0.1, "betas": [0.9, 0.95]}, "epochs": 1}))
    first.log_metrics({"train/loss": 2.5}, step=1)
    first.finish("KILLED")  # e.g. preempted

    second = tracker()
    second.start()
    assert second.run_id == first.run_id and second.resumed
    second.log_params(flatten_config({"optimizer": {"lr": 0.1, "betas": [0.9, 0.95]}, "epochs": 3, "new": None}))
    second.log_metrics({"train/loss": 1.5}, step=2)
    second.finish()

    client, runs = fw.mlflow_runs(mlflow_store, "tracker-unit")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "vim_test" and "skipped" not in run.data.tags
    assert run.data.params == {"optimizer.lr": "0.1", "optimizer.betas": "[0.9, 0.95]", "epochs": "1",
                               "new": "null"}
    assert json.loads(run.data.tags["resume.changed_params"]) == {"epochs": "3"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.5, 1.5]


def test_tracker_buffers_while_the_server_is_away(tmp_path, caplog):
    tracker = Tracker(enabled=True, tracking_uri="http://127.0.0.1:9", experiment_name="x", run_name="y",
                      state_file=tmp_path / "state.json", retry_after_s=3600)
    with caplog.at_level(logging.WARNING, logger="visionmamba.tracking"):
        tracker.start(tags={"model": "m"})
        for step in range(5):
            tracker.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step)  # inside the back-off: no network call
        tracker.finish()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is unavailable" in m for m in messages) == 1
    assert any("10 metric values" in m and "could not be delivered" in m for m in messages)
    assert tracker.run_id is None and not (tmp_path / "state.json").exists()


def test_disabled_tracker_is_inert(tmp_path):
    tracker = Tracker(enabled=False, tracking_uri=f"sqlite:///{tmp_path / 'never.db'}", experiment_name="x",
                      run_name="y", state_file=tmp_path / "state.json")
    assert tracker.start(tags={"a": 1}) is None
    tracker.log_metrics({"m": 1.0}, 0)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []
