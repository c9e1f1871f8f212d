"""End to end on CPU: train.py learns digits, writes one run dir with checkpoints; validate.py reproduces its
numbers; a re-run auto-resumes (same MLflow run) and refuses a changed config."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from visionmamba.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, load_weights
from visionmamba.engine import train_one_epoch


def test_training_learns_and_writes_one_run_dir(trained_run):
    final, run_dir = trained_run.final, trained_run.run_dir
    assert final["val/top1"] > 50.0, f"digits top-1 {final['val/top1']:.1f}% (chance is 10%)"
    assert final["epoch"] == 2 and final["global_step"] == 2 * (1437 // 64)
    assert final["best/epoch"] in (1, 2)
    assert [p.name for p in (trained_run.cwd / "outputs").iterdir()] == ["e2e"]
    # (as training left it: the fixture lists it before validate.py writes its summary there)
    assert trained_run.checkpoint_files == ["best.pth", "epoch_0001.pth", "epoch_0002.pth"]
    for name in ("config.yaml", "train.log", "mlflow_run.json", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).is_file(), name
    assert "eta" in trained_run.output and "img/s" in trained_run.output  # the periodic progress line

    state = torch.load(run_dir / "checkpoints" / "epoch_0002.pth", map_location="cpu", weights_only=True)
    assert {"model", "model_ema", "optimizer", "scheduler", "scaler", "epoch", "global_step", "config",
            "rng"} <= set(state)
    assert state["epoch"] == 2 and state["model_name"] == "vim_test" and state["scaler"] is None  # fp32: no scaler
    root = Path(state["config"]["data"]["root"])  # recorded absolute, so validate.py works from anywhere
    assert root.is_absolute() and root.name == "digits"


def test_validate_reproduces_training_metrics(trained_run):
    """``python validate.py checkpoint=<run>/checkpoints/epoch_0002.pth workers=0`` (run by the fixture)."""
    proc = trained_run.validated
    assert proc.returncode == 0, f"validate.py exited with {proc.returncode}:\n{proc.stdout[-6000:]}"
    checkpoint = trained_run.run_dir / "checkpoints" / "epoch_0002.pth"
    summary = json.loads(checkpoint.with_name("epoch_0002.val.json").read_text())
    # model, data, precision and eval batch size all come from the checkpoint's recorded config
    assert summary["top1"] == pytest.approx(trained_run.final["val/top1"], abs=1e-9)
    assert summary["top5"] == pytest.approx(trained_run.final["val/top5"], abs=1e-9)
    assert summary["loss"] == pytest.approx(trained_run.final["val/loss"], rel=1e-5)
    assert summary["num_samples"] == 360 and summary["weights"] == "model" and summary["model"] == "vim_test"
    assert "top-1" in proc.stdout


def _resume_sequence(getfixture):
    """The three commands of the resume test below, in a directory and MLflow store of their own (conftest's
    ``runs_ahead`` starts them when the session starts), with what the test checks between them."""
    fw, cwd = getfixture("fw"), getfixture("tmp_path_factory").mktemp("resume")
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    args = ["train.py", *fw.synthetic_args("resumable"), *fw.tracking_args(store, "resume")]
    run_dir = cwd / "outputs" / "resumable"

    def run_dir_state():
        return sorted((run_dir / "checkpoints").iterdir()), (run_dir / "config.yaml").read_text()

    def job(run_script) -> SimpleNamespace:
        first = run_script([*args, "epochs=1"], cwd)
        before_refused = run_dir_state()
        refused = run_script([*args, "epochs=2", "optimizer.base_lr=1e-3"], cwd, check=False)
        after_refused = run_dir_state()
        second = run_script([*args, "epochs=2"], cwd)
        return SimpleNamespace(run_dir=run_dir, store=store, first=first, before_refused=before_refused,
                               refused=refused, after_refused=after_refused, second=second)

    return job


RUNS_AHEAD = {"resume_sequence": _resume_sequence}


@pytest.fixture(scope="module")
def resume_sequence(runs_ahead, request) -> SimpleNamespace:
    return runs_ahead.result("resume_sequence", _resume_sequence, request.getfixturevalue)


def test_rerun_resumes_refuses_changes_and_keeps_one_mlflow_run(resume_sequence, fw):
    seq, run_dir = resume_sequence, resume_sequence.run_dir
    assert "resuming" not in seq.first.stdout

    # Same run_name, another experiment: one error line, exit status 2, nothing in the run dir touched.
    checkpoints, snapshot = seq.before_refused
    refused = seq.refused
    assert refused.returncode == 2 and "Traceback" not in refused.stdout
    errors = [line for line in refused.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and "optimizer.base_lr" in errors[0] and "run_name" in errors[0], refused.stdout
    assert seq.after_refused[0] == checkpoints  # sorted((run_dir / "checkpoints").iterdir()) after the refused run
    assert seq.after_refused[1] == snapshot  # (run_dir / "config.yaml").read_text() after the refused run

    # The same command with more epochs continues at epoch 1 (3 updates of 32 images were done).
    second = seq.second
    assert "resuming from" in second.stdout and "at epoch 1 (update 3)" in second.stdout
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["epoch"] == 2 and final["global_step"] == 6

    client, runs = fw.mlflow_runs(seq.store, "resume")
    assert len(runs) == 1, "a resumed job must continue its MLflow run, not open another"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val/top1")) == [1, 2]
    assert runs[0].info.status == "FINISHED"
    assert json.loads(runs[0].data.tags["resume.changed_params"]) == {"epochs": "2"}


def test_gradient_accumulation_equals_one_big_batch():
    """accum_steps=2 over batches of 4 gives the update of one batch of 8 (the loss is averaged, not summed)."""
    data = TensorDataset(torch.randn(32, 6, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 4)
    weights = []
    for batch_size, accum_steps in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        stats = train_one_epoch(model, DataLoader(data, batch_size=batch_size), optimizer,
                                torch.nn.CrossEntropyLoss(), torch.device("cpu"), 0, accum_steps=accum_steps,
                                clip_grad=10.0, progress="none")
        assert stats["num_updates"] == 4
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_checkpoint_rotation_and_corrupt_newest(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2, save_every=3)
    for epoch in range(1, 7):
        manager.save({"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, epoch=epoch,
                     is_best=epoch == 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "epoch_0003.pth", "epoch_0005.pth",
                                                          "epoch_0006.pth"]  # last 2, every 3rd, best
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["epoch"] == 4 and best["model"]["w"].tolist() == [4.0, 4.0]

    newest = tmp_path / "epoch_0006.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a write cut short
    with caplog.at_level(logging.WARNING, logger="visionmamba.checkpoint"):
        path, state = manager.find_latest()
    assert path.name == "epoch_0005.pth" and state["epoch"] == 5
    assert any("epoch_0006.pth" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_weights(torch.nn.Linear(2, 1), tmp_path / "epoch_0005.pth", use_ema=True)
