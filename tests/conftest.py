"""Shared fixtures for the framework tests: config composition, and train.py / validate.py run as real processes.

Everything runs on CPU and writes only below pytest's tmp directories: each script runs with its working
directory in a tmp dir (Hydra outputs, the sqlite MLflow store and its artifacts land there) and the digits
dataset is prepared once per session in a tmp dir too.

Test modules get the helpers through the ``fw`` fixture rather than ``from conftest import ...``: tests/gpu has a
conftest of its own, and two modules named ``conftest`` cannot both be imported by name.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# One BLAS/OpenMP thread per process: the CI box has 2 cores, and oversubscribed OpenMP (2 torchrun ranks x N
# threads, or a busy machine) is slower by orders of magnitude than one thread per process.
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """In-process training in the framework tests runs single-threaded too (see _THREAD_ENV)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(_THREAD_ENV, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def run_script(args: list[str], cwd: Path, *, timeout: float = 300, check: bool = True,
               torchrun_nproc: int = 0) -> subprocess.CompletedProcess:
    """``python <REPO>/<args[0]> args[1:]`` (or under ``torchrun --standalone``) in ``cwd``; stdout+stderr merged."""
    script, *overrides = args
    launcher = [sys.executable]
    if torchrun_nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}"]
    proc = subprocess.run([*launcher, str(REPO / script), *overrides], cwd=cwd, env=script_env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def compose_train(*overrides: str, hydra: bool = False):
    """conf/train.yaml composed in-process with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    import train  # noqa: F401  (registers the config's resolvers)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The bundled digits dataset (32 px JPEG ImageFolder), prepared once for the whole session."""
    from visionmamba.data import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("data") / "digits")


def fast_train_args(digits_root: Path) -> list[str]:
    """The README quick start (vim_test on digits, learns visibly in one epoch), on the session's digits copy."""
    return ["experiment=digits_quickstart", f"data.root={digits_root}", "workers=0", "progress=line"]


def synthetic_args(run_name: str) -> list[str]:
    """A few-second run on random tensors (no files): for behaviour that does not need learning."""
    return [
        "model=vim_test", "data=synthetic", "data.img_size=32", "data.num_classes=10", "data.train_length=96",
        "data.val_length=32", "regularizer=none", "precision=fp32", "workers=0", "batch_size=32",
        "progress=line", f"run_name={run_name}",
    ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_root) -> SimpleNamespace:
    """``vim_test`` trained for 2 epochs on digits by ``python train.py`` (shared by the e2e and MLflow tests)."""
    cwd = tmp_path_factory.mktemp("e2e")
    args = ["train.py", *fast_train_args(digits_root), "epochs=2", "run_name=e2e"]
    proc = run_script(args, cwd, timeout=600)
    run_dir = cwd / "outputs" / "e2e"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return SimpleNamespace(cwd=cwd, run_dir=run_dir, final=final, args=args, output=proc.stdout)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One sqlite store for the session's other tests (creating a store costs seconds); tests keep apart by
    experiment name. ``trained_run`` alone uses the default ``sqlite:///mlflow.db`` in its own directory."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def tracking_args(store: str, experiment: str) -> list[str]:
    return [f"mlflow.tracking_uri={store}", f"mlflow.experiment_name={experiment}"]


def mlflow_runs(store: str, experiment: str = "visionmamba"):
    """(client, runs of ``experiment``) in a sqlite store; ``store`` is a URI or a launch dir with mlflow.db."""
    from mlflow.tracking import MlflowClient

    uri = store if str(store).startswith("sqlite:") else f"sqlite:///{Path(store) / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return client, client.search_runs([found.experiment_id])


@pytest.fixture(scope="session")
def fw() -> SimpleNamespace:
    """The framework-test helpers of this file, as one object."""
    return SimpleNamespace(REPO=REPO, CONF=CONF, run_script=run_script, compose_train=compose_train,
                           fast_train_args=fast_train_args, synthetic_args=synthetic_args,
                           tracking_args=tracking_args, mlflow_runs=mlflow_runs, script_env=script_env)


# ---- reliability tests (tests/test_reliability.py): scripts run in the background, to be signalled or killed ----
def spawn_script(args: list[str], cwd: Path, log_path: Path, *, torchrun_nproc: int = 0,
                 extra_launcher_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """Like :func:`run_script`, but returns at once: stdout+stderr go to ``log_path`` (a file, so a chatty process
    never blocks on a full pipe). The caller owns the process: wait for it, signal it or kill it. It leads a process
    group of its own (``os.killpg(proc.pid, ...)`` also ends torchrun's workers and DataLoader workers)."""
    script, *overrides = args
    launcher = [sys.executable]
    if torchrun_nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}",
                     *extra_launcher_args]
    out = open(log_path, "w")  # noqa: SIM115 - closed when the process is reaped, by the child's exit
    try:
        return subprocess.Popen([*launcher, str(REPO / script), *overrides], cwd=cwd, env=script_env(),
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finally:
        out.close()  # the child holds its own copy of the descriptor


@pytest.fixture(scope="session")
def spawn():
    """:func:`spawn_script` for the tests."""
    return spawn_script
