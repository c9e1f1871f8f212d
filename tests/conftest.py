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
import queue
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

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


def _command(args: list[str], torchrun_nproc: int = 0, extra_launcher_args: tuple[str, ...] = ()) -> list[str]:
    """``python <REPO>/<args[0]> args[1:]``, or under ``torchrun --standalone`` (with ``extra_launcher_args``)."""
    script, *overrides = args
    launcher = [sys.executable]
    if torchrun_nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}",
                     *extra_launcher_args]
    return [*launcher, str(REPO / script), *overrides]


def _checked(args: list[str], proc: subprocess.CompletedProcess, check: bool = True) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited with {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def run_script(args: list[str], cwd: Path, *, timeout: float = 300, check: bool = True,
               torchrun_nproc: int = 0) -> subprocess.CompletedProcess:
    """``python <REPO>/<args[0]> args[1:]`` (or under ``torchrun --standalone``) in ``cwd``; stdout+stderr merged."""
    proc = subprocess.run(_command(args, torchrun_nproc), cwd=cwd, env=script_env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _checked(args, proc, check)


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


# ---- long script runs of shared fixtures, started ahead of the tests that need them ------------------------------
# Jobs that RunsAhead may start early: fixture name -> make(getfixturevalue) -> job, where a job is a callable that
# takes a ``run_script``, runs its scripts with it and returns the fixture's value. This file's fixtures are here; a
# test module declares its own in a module-level ``RUNS_AHEAD``.
RUNS_AHEAD: dict[str, Callable] = {}


class RunsAhead:
    """The long script runs behind session/module fixtures, started in the background as the session starts.

    Most of the suite keeps one of the CI box's 2 cores busy (one thread per process, see _THREAD_ENV). The runs of
    fixtures such as ``trained_run`` or test_multistage's ``two_stage`` therefore start on the other core as soon as
    the session starts, one at a time, in the order in which the session's tests first need them, at the lowest CPU
    priority (a test that needs both cores, e.g. under torchrun, gets them), and the fixture only waits for the
    result: the same commands in the same kind of directory, with the same checks (a failed run fails the fixture's
    tests with its output, as before). Their processes run in a process group of their own, ended if the session
    stops first. A fixture whose job was not planned (``VM_TESTS_RUN_AHEAD=0``, or no test of the session needed it
    when it started) runs it itself, with the plain :func:`run_script`.
    """

    def __init__(self):
        self._planned: dict[str, Future] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._env = script_env()  # as the session starts: a test may change os.environ while a job runs

    def plan(self, makers: list[tuple[str, Callable]], getfixture: Callable[[str], object]) -> None:
        """Start the jobs ``[(fixture name, make), ...]`` in this order (each made now, in the main thread)."""
        for key, make in makers:
            job, future = make(getfixture), Future()
            self._planned[key] = future
            self._jobs.put((job, future))
        if makers:
            threading.Thread(target=self._work, name="runs-ahead", daemon=True).start()

    def result(self, key: str, make: Callable, getfixture: Callable[[str], object]) -> object:
        """Fixture ``key``'s value: the planned job's result, or that of ``make(getfixture)``'s job, run now
        (``getfixture``: the calling fixture's ``request.getfixturevalue``)."""
        if key in self._planned:
            return self._planned[key].result()
        return make(getfixture)(run_script)

    def _work(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job(self._run_script))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the fixture that waits for it
                future.set_exception(exc)

    def _run_script(self, args: list[str], cwd: Path, *, timeout: float = 300, check: bool = True,
                    torchrun_nproc: int = 0) -> subprocess.CompletedProcess:
        """:func:`run_script`, in a process group of its own that :meth:`close` can end, and at the lowest CPU
        priority: the tests running meanwhile (torchrun ones use both cores) take the CPU first."""
        command = _command(args, torchrun_nproc)
        with self._lock:
            if self._closed:
                raise RuntimeError("the test session ended before this run started")
            proc = subprocess.Popen([*_NICE, *command], cwd=cwd, env=self._env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, **_OWN_GROUP)
            self._running.add(proc)
        try:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                raise
        finally:
            with self._lock:
                self._running.discard(proc)
        return _checked(args, subprocess.CompletedProcess(command, proc.returncode, output), check)

    def close(self) -> None:
        """End what still runs or waits (a session cut short, e.g. by -x or Ctrl-C)."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for future in self._planned.values():
            future.cancel()
        for proc in running:
            _kill_group(proc)


_NICE = ["nice", "-n", "19"] if shutil.which("nice") else []  # nice execs the command: same process, same group
# A process group of its own, but not a session of its own: Linux's autogroup scheduling shares the CPU out between
# sessions first, so a new session would take half the CPU whatever its nice value.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _needs(item: pytest.Item, fixture: str) -> bool:
    """Will ``item`` set up ``fixture``? (Not if it is skipped unconditionally at collection.)"""
    if fixture not in getattr(item, "fixturenames", ()):
        return False
    if item.get_closest_marker("skip") is not None:
        return False
    return not any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


@pytest.fixture(scope="session", autouse=True)
def runs_ahead(request) -> RunsAhead:
    """The session's :class:`RunsAhead`, planned from the collected tests before the first one runs."""
    ahead = RunsAhead()
    first_need: dict[str, tuple[int, Callable]] = {}
    if os.environ.get("VM_TESTS_RUN_AHEAD", "1") != "0":
        for index, item in enumerate(request.session.items):
            for key, make in {**RUNS_AHEAD, **getattr(getattr(item, "module", None), "RUNS_AHEAD", {})}.items():
                if key not in first_need and _needs(item, key):
                    first_need[key] = (index, make)
    ahead.plan([(key, make) for key, (_, make) in sorted(first_need.items(), key=lambda kv: kv[1][0])],
               request.getfixturevalue)
    yield ahead
    ahead.close()


def _trained_run(getfixture) -> Callable:
    """The commands behind ``trained_run``: training, then validate.py on its last checkpoint."""
    cwd = getfixture("tmp_path_factory").mktemp("e2e")
    args = ["train.py", *fast_train_args(getfixture("digits_root")), "epochs=2", "run_name=e2e"]
    run_dir = cwd / "outputs" / "e2e"

    def job(run_script) -> SimpleNamespace:
        trained = run_script(args, cwd, timeout=600)
        checkpoint_files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # before validate.py's JSON
        validated = run_script(["validate.py", f"checkpoint={run_dir / 'checkpoints' / 'epoch_0002.pth'}",
                                "workers=0"], cwd, check=False)  # its exit status is test_train_e2e's to check
        final = json.loads((run_dir / "final_metrics.json").read_text())
        return SimpleNamespace(cwd=cwd, run_dir=run_dir, final=final, args=args, output=trained.stdout,
                               checkpoint_files=checkpoint_files, validated=validated)

    return job


RUNS_AHEAD["trained_run"] = _trained_run


@pytest.fixture(scope="session")
def trained_run(runs_ahead, request) -> SimpleNamespace:
    """``vim_test`` trained for 2 epochs on digits by ``python train.py`` (shared by the e2e and MLflow tests), then
    ``python validate.py checkpoint=<run>/checkpoints/epoch_0002.pth workers=0`` (checked by test_train_e2e)."""
    return runs_ahead.result("trained_run", _trained_run, request.getfixturevalue)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One sqlite store for the session's other tests (creating a store costs seconds); tests keep apart by
    experiment name. ``trained_run`` uses the default ``sqlite:///mlflow.db`` in its own directory, and the other
    jobs of ``runs_ahead`` a store in theirs: they run while other tests write this one."""
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
    out = open(log_path, "w")  # noqa: SIM115 - closed when the process is reaped, by the child's exit
    try:
        return subprocess.Popen(_command(args, torchrun_nproc, extra_launcher_args), cwd=cwd, env=script_env(),
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finally:
        out.close()  # the child holds its own copy of the descriptor


@pytest.fixture(scope="session")
def spawn():
    """:func:`spawn_script` for the tests."""
    return spawn_script
