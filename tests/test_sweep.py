"""Shuffle-rate sweeps: ``train.py -m`` runs every point (one run dir and MLflow run each, one experiment, the
``sweep`` tag), ``scripts/compare_runs.py`` turns them into a table and a PNG logged to MLflow, and the same sweep
works under torchrun (every rank runs the jobs in the same order; one process group per job).

The points train one short epoch on synthetic images: what is checked is the bookkeeping, not the accuracy.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from visionmamba import distributed

RATES = ["0", "0.3", "0.6"]
SWEEP = "shuffle_sweep"


def sweep_args(run_name: str, store: str, experiment: str) -> list[str]:
    return ["model=shufflemamba_test", "experiment=digits_quickstart", "epochs=1", "data=synthetic",
            "data.img_size=32", "data.num_classes=10", "data.train_length=192", "data.val_length=64", "workers=0",
            "progress=none", f"run_name={run_name}", f"mlflow.tracking_uri={store}",
            f"mlflow.experiment_name={experiment}"]


def _sweep_run(getfixture):
    """The commands behind ``sweep`` (conftest's ``runs_ahead`` starts them when the session starts): the sweep, then
    scripts/compare_runs.py over it. The MLflow store is their own: the session's shared one may be written by a
    test running meanwhile."""
    fw, cwd, compare_cwd = (getfixture("fw"), getfixture("tmp_path_factory").mktemp("sweep"),
                            getfixture("tmp_path_factory").mktemp("compare"))
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    png = compare_cwd / "compare" / "sweep.png"

    def job(run_script) -> SimpleNamespace:
        run_script(["train.py", "-m", f"regularizer.shuffle.rate={','.join(RATES)}",
                    *sweep_args(SWEEP, store, "sweeps")], cwd, timeout=600)
        compared = run_script(["scripts/compare_runs.py", "--sweep", SWEEP, "--tracking-uri", store,
                               "--experiment", "sweeps", "--out", str(png)], compare_cwd,
                              check=False)  # its exit status is test_compare_runs_...'s to check
        return SimpleNamespace(cwd=cwd, store=store, compared=compared, png=png)

    return job


RUNS_AHEAD = {"sweep": _sweep_run}


@pytest.fixture(scope="module")
def sweep(runs_ahead, request) -> SimpleNamespace:
    """The 3-point sweep, then ``scripts/compare_runs.py --sweep ... --out <dir>/compare/sweep.png`` over it
    (checked by test_compare_runs_prints_a_row_per_point_and_logs_a_png)."""
    return runs_ahead.result("sweep", _sweep_run, request.getfixturevalue)


def test_every_point_runs_in_one_experiment_with_the_sweep_tag(sweep, fw):
    jobs = sorted(p.name for p in (sweep.cwd / "outputs" / SWEEP).iterdir() if p.is_dir())
    assert jobs == [f"regularizer.shuffle.rate={r}" for r in RATES]
    for job in jobs:
        assert (sweep.cwd / "outputs" / SWEEP / job / "final_metrics.json").is_file()
    _, runs = fw.mlflow_runs(sweep.store, "sweeps")
    runs = [r for r in runs if r.data.tags.get("visionmamba.kind") != "compare"]  # compare_runs.py's own run
    assert len(runs) == 3 and {r.data.tags["sweep"] for r in runs} == {SWEEP}
    assert sorted(r.data.params["regularizer.shuffle.rate"] for r in runs) == RATES
    assert {r.data.params["model.name"] for r in runs} == {"shufflemamba_test"}
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_compare_runs_prints_a_row_per_point_and_logs_a_png(sweep, fw):
    from PIL import Image

    png, proc = sweep.png, sweep.compared  # compare_runs.py, run by the fixture
    assert proc.returncode == 0, f"scripts/compare_runs.py exited with {proc.returncode}:\n{proc.stdout[-6000:]}"
    output = proc.stdout
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    table = lines[header:header + 5]
    assert set(table[1]) <= {"-", " "}
    rows = table[2:]
    assert len(rows) == 3 and lines[header + 5].strip() == "", output
    columns = table[0].split()
    # one swept column (model.shuffle_rate merely mirrors it), then the metrics
    assert columns[:2] == ["run", "regularizer.shuffle.rate"] and "img/s" in columns
    client, runs = fw.mlflow_runs(sweep.store, "sweeps")
    points = [r for r in runs if r.data.tags.get("visionmamba.kind") != "compare"]
    by_rate = {r.data.params["regularizer.shuffle.rate"]: r for r in points}
    for rate, row in zip(RATES, rows):  # sorted by the swept value
        cells = row.split()
        assert cells[0] == f"{SWEEP}/regularizer.shuffle.rate={rate}" and cells[1] == rate
        top1 = [m.value for m in client.get_metric_history(by_rate[rate].info.run_id, "val/top1")]
        assert cells[2] == f"{max(top1):.2f}" and cells[3] == f"{top1[-1]:.2f}"
        assert float(cells[5]) > 0 and cells[6] == "FINISHED"

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
        image.verify()
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).ndim == 3

    # logged to MLflow: a "compare" run tagged with the sweep, holding the PNG and the table
    compare = [r for r in fw.mlflow_runs(sweep.store, "sweeps")[1] if r.data.tags.get("visionmamba.kind") == "compare"]
    assert len(compare) == 1 and compare[0].data.tags["sweep"] == SWEEP
    artifacts = {a.path for a in client.list_artifacts(compare[0].info.run_id)}
    assert {"sweep.png", "compare_runs.txt"} <= artifacts
    assert re.search(r"logged to MLflow run [0-9a-f]{32}", output)


@pytest.mark.skipif(not hasattr(distributed, "_GROUPS_SET_UP"), reason=(
    "needs a fresh store prefix per process group in visionmamba/distributed.py (issue-4 report): without it the "
    "second job of a torchrun sweep can read the first job's gloo addresses and fail or hang"))
def test_sweep_under_torchrun_runs_each_point_once_on_all_ranks(tmp_path, mlflow_store, fw):
    """``torchrun --nproc_per_node=N train.py -m ...``: Hydra's basic launcher runs the jobs one after the other
    in every rank, in the same order, so each job is one DDP run (one run dir, one MLflow run, world_size N)."""
    fw.run_script(["train.py", "-m", "regularizer.shuffle.rate=0,0.5",
                   *sweep_args("ddp_sweep", mlflow_store, "ddp_sweeps"), "data.train_length=128", "batch_size=32"],
                  tmp_path, timeout=300, torchrun_nproc=2)
    jobs = sorted(p.name for p in (tmp_path / "outputs" / "ddp_sweep").iterdir() if p.is_dir())
    assert jobs == ["regularizer.shuffle.rate=0", "regularizer.shuffle.rate=0.5"]
    _, runs = fw.mlflow_runs(mlflow_store, "ddp_sweeps")
    assert len(runs) == 2 and {r.data.tags["world_size"] for r in runs} == {"2"}
    assert {r.data.tags["sweep"] for r in runs} == {"ddp_sweep"}
    assert {r.data.params["derived.global_batch"] for r in runs} == {"64"}
