"""Reliability on CPU: kill -9 and re-run (bit-identical with workers=0), SIGTERM / SIGUSR1 preemption (single
process, and one rank of a 2-rank torchrun --max-restarts job), corrupt JPEGs during training, bad input (one error
line, exit status 2, the existing run directory untouched), mid-epoch resume of the loader, MLflow metrics that
cannot be delivered. What test_train_e2e / test_ddp / test_tracking already cover is not repeated here."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

import train
from visionmamba import tracking
from visionmamba.checkpoint import CheckpointManager
from visionmamba.data import CorruptImageError, build_loader
from visionmamba.tracking import Tracker

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------ helpers
def wait_for(condition, proc: subprocess.Popen, log_path: Path, what: str, timeout: float = 240.0) -> None:
    """Poll ``condition()`` until true; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{log_path.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()[-6000:]}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float = 300.0) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"no exit within {timeout}s:\n{log_path.read_text()[-6000:]}") from None
    return log_path.read_text()


def stop(*procs: subprocess.Popen) -> None:
    """SIGKILL the process groups of spawned scripts still running (their workers included)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)


def assert_same(a, b, path: str = "checkpoint") -> None:
    """Exact (bitwise) equality of nested checkpoint content."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_untouched(directory: Path, before: dict[str, bytes]) -> None:
    """Every file as it was; only train.log may have grown (Hydra appends the error line to the run's log)."""
    after = snapshot(directory)
    assert set(after) == set(before), f"files added/removed: {sorted(set(after) ^ set(before))}"
    for name, content in before.items():
        if name == "train.log":
            assert after[name].startswith(content), "train.log was rewritten, not appended to"
        else:
            assert after[name] == content, f"{name} was modified"


def timing(name: str, seconds: float) -> None:
    print(f"[timing] {name}: {seconds:.1f}s")


# ------------------------------------------------------------------------- kill -9 mid-epoch, re-run, compare
# 1437 digits train images at 16 px in batches of 128: 11 updates per epoch, a step checkpoint every 3 updates.
def _digits_args(root: Path, run_name: str) -> list[str]:
    return ["train.py", "experiment=digits_quickstart", f"data.root={root}", "data.img_size=16", "batch_size=128",
            "workers=0", "progress=line", "log_every=2", "epochs=2", "checkpoint_every_steps=3",
            "mlflow.enabled=false", f"run_name={run_name}"]


_TIMING_KEYS = ("train/epoch_img_per_s", "val/img_per_s", "val_ema/img_per_s")


def test_kill9_mid_epoch_and_rerun_is_bit_identical_to_an_uninterrupted_run(tmp_path, digits_root, spawn, fw):
    """workers=0: the re-run continues at the same sample with the same RNG streams, so weights, EMA, optimizer,
    scheduler, RNG states and every non-timing metric equal those of an uninterrupted run, bit for bit."""
    start = time.perf_counter()
    straight = spawn(_digits_args(digits_root, "straight"), tmp_path, tmp_path / "straight.log")
    killed_log = tmp_path / "killed.log"
    killed = spawn(_digits_args(digits_root, "killed"), tmp_path, killed_log)
    checkpoints = tmp_path / "outputs" / "killed" / "checkpoints"
    try:
        wait_for(lambda: (checkpoints / "epoch_0000_step_000006.pth").exists(), killed, killed_log,
                 "the second step checkpoint")
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert killed.returncode == -signal.SIGKILL
        newest = CheckpointManager(checkpoints).list_epoch_files()[-1]
        assert newest.name.startswith("epoch_0000_step_"), newest  # killed mid-epoch 1
        (checkpoints / ".epoch_0000_step_000009.pth.tmp4242").write_bytes(b"half a checkpoint")  # a cut-short write

        rerun = fw.run_script(_digits_args(digits_root, "killed"), tmp_path)
        assert f"resuming from {newest}" in rerun.stdout and "updates into that epoch" in rerun.stdout
        assert "removed 1 unfinished checkpoint write" in rerun.stdout
        assert not list(checkpoints.glob(".*tmp*"))
        finish(straight, tmp_path / "straight.log")
        assert straight.returncode == 0, (tmp_path / "straight.log").read_text()[-4000:]
    finally:
        stop(killed, straight)
    timing("kill -9 + re-run vs uninterrupted", time.perf_counter() - start)

    a = torch.load(tmp_path / "outputs" / "straight" / "checkpoints" / "epoch_0002.pth", weights_only=True)
    b = torch.load(checkpoints / "epoch_0002.pth", weights_only=True)
    for key in ("model", "model_ema", "optimizer", "scheduler", "scaler", "rng", "epoch", "step_in_epoch",
                "global_step", "best_top1", "best_epoch"):
        assert_same(a[key], b[key], key)
    assert a["global_step"] == 22 and b["step_in_epoch"] == 0
    for key in set(a["metrics"]) - set(_TIMING_KEYS):  # losses and accuracies; throughput is wall-clock
        assert a["metrics"][key] == b["metrics"][key], key

    final_a = json.loads((tmp_path / "outputs" / "straight" / "final_metrics.json").read_text())
    final_b = json.loads((tmp_path / "outputs" / "killed" / "final_metrics.json").read_text())
    for key in set(final_a) - set(_TIMING_KEYS) - {"run_dir"}:
        assert final_a[key] == final_b[key], key
    assert final_a["val/top1"] > 50.0  # it did learn


# -------------------------------------------------------------------------------------------------- preemption
def test_sigterm_checkpoints_exits_143_and_the_rerun_resumes(tmp_path, spawn, fw):
    """SIGTERM to every process of a run (the main process and its DataLoader worker, which must ignore it) mid-epoch
    -> the current update finishes, a step checkpoint is written, exit status 143; the same command resumes it.
    (Reopening the same MLflow run on resume is test_train_e2e's; the KILLED status is not checked here.)"""
    start = time.perf_counter()
    # 320 samples / 32 = 10 updates per epoch
    args = ["train.py", *fw.synthetic_args("preempted"), "data.train_length=320", "log_every=2", "epochs=2",
            "workers=1", "mlflow.enabled=false"]
    log_path = tmp_path / "first.log"
    proc = spawn(args, tmp_path, log_path)
    try:
        wait_for(lambda: "[2/10]" in log_path.read_text(), proc, log_path, "the second update")
        os.killpg(proc.pid, signal.SIGTERM)  # like a scheduler: every process of the job, the loader worker too
        output = finish(proc, log_path, timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 143, output[-4000:]
    assert "preempted by SIGTERM" in output and "re-run the same command to resume" in output
    assert "Traceback" not in output
    checkpoints = tmp_path / "outputs" / "preempted" / "checkpoints"
    files = CheckpointManager(checkpoints).list_epoch_files()
    assert len(files) == 1 and files[0].name.startswith("epoch_0000_step_"), files  # the preemption checkpoint

    rerun = fw.run_script(args, tmp_path)
    assert f"resuming from {files[0]}" in rerun.stdout and "updates into that epoch" in rerun.stdout
    final = json.loads((tmp_path / "outputs" / "preempted" / "final_metrics.json").read_text())
    assert final["epoch"] == 2 and final["global_step"] == 20
    timing("SIGTERM + re-run", time.perf_counter() - start)


def _pid_of_rank(parent: int, rank: int) -> int | None:
    for child in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def test_sigusr1_on_one_rank_under_torchrun_max_restarts(tmp_path, spawn, fw):
    """2 gloo ranks; only rank 1 gets SIGUSR1. Both ranks agree at the same update (the flag rides the per-step
    all-reduce), one checkpoint is written, both exit 138, torchrun restarts them (--max-restarts=1), they resume
    mid-epoch and the job ends with status 0 and identical replicas."""
    start = time.perf_counter()
    args = ["train.py", *fw.synthetic_args("elastic"), "data.train_length=320", "batch_size=16", "log_every=2",
            "epochs=1", "mlflow.enabled=false"]
    log_path = tmp_path / "torchrun.log"
    proc = spawn(args, tmp_path, log_path, torchrun_nproc=2, extra_launcher_args=("--max-restarts=1",))
    try:
        wait_for(lambda: "[2/10]" in log_path.read_text(), proc, log_path, "the second update")
        rank1 = _pid_of_rank(proc.pid, 1)
        assert rank1 is not None, "no rank-1 worker under torchrun"
        os.kill(rank1, signal.SIGUSR1)
        output = finish(proc, log_path, timeout=240)
    finally:
        stop(proc)
    assert proc.returncode == 0, output[-6000:]
    assert output.count("preempted by SIGUSR1") == 2  # rank 0 (no signal of its own) and rank 1
    assert "exitcode: 138" in output  # what torchrun saw before restarting the workers
    assert "updates into that epoch" in output
    final = json.loads((tmp_path / "outputs" / "elastic" / "final_metrics.json").read_text())
    assert final["epoch"] == 1 and final["global_step"] == 10
    assert len(set(final["replica_digests"])) == 1
    timing("torchrun SIGUSR1 + restart", time.perf_counter() - start)


# ------------------------------------------------------------------------------------ corrupt JPEGs in training
@pytest.fixture
def small_imagefolder(tmp_path, digits_root) -> Path:
    """6 train / 2 val digits per class, as an ImageNet-layout folder (60 train images: batches of 20 use all)."""
    root = tmp_path / "small"
    for split, count in (("train", 6), ("val", 2)):
        for cls in sorted(p.name for p in (digits_root / split).iterdir() if p.is_dir()):
            (root / split / cls).mkdir(parents=True)
            for image in sorted((digits_root / split / cls).iterdir())[:count]:
                shutil.copy(image, root / split / cls / image.name)
    return root


def _imagefolder_args(root: Path, run_name: str) -> list[str]:
    return ["model=vim_test", "data=imagefolder", f"data.root={root}", "data.num_classes=10", "data.img_size=32",
            "data.crop_pct=1.0", "regularizer=none", "precision=fp32", "workers=0", "batch_size=20", "epochs=1",
            "progress=none", f"run_name={run_name}"]


def test_corrupt_jpeg_is_skipped_counted_and_strict_fails(small_imagefolder, tmp_path, monkeypatch, caplog,
                                                          mlflow_store, fw):
    bad = sorted((small_imagefolder / "train" / "3").iterdir())[0]
    bad.write_bytes(b"this is not a jpeg")
    truncated = sorted((small_imagefolder / "train" / "7").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    monkeypatch.chdir(tmp_path)
    # An explicit artifact location: MLflow caches the store per URI with its default artifact root ("./mlruns")
    # resolved against the cwd of whichever test first opened it, which may be the repository.
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=mlflow_store).create_experiment("corrupt", artifact_location=str(tmp_path / "artifacts"))

    cfg = fw.compose_train(*_imagefolder_args(small_imagefolder, "corrupt"), *fw.tracking_args(mlflow_store, "corrupt"))
    with caplog.at_level(logging.WARNING, logger="train"):
        final = train.train(cfg)
    assert final["epoch"] == 1 and final["global_step"] == 3  # training went on through both files
    assert final["data/unreadable_images"] == 2
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warnings) == 1 and "2 unreadable image file(s)" in warnings[0] and "train 2, val 0" in warnings[0]
    client, runs = fw.mlflow_runs(mlflow_store, "corrupt")
    history = client.get_metric_history(runs[0].info.run_id, "data/unreadable_images")
    assert [(m.step, m.value) for m in history] == [(1, 2.0)]
    assert (tmp_path / "artifacts").is_dir()

    caplog.clear()
    strict = fw.compose_train(*_imagefolder_args(small_imagefolder, "strict"), "data.strict=true",
                              "mlflow.enabled=false")
    with caplog.at_level(logging.ERROR, logger="train"), pytest.raises(SystemExit) as exited:
        with train.reported_user_errors():
            train.train(strict)
    assert exited.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and "Cannot decode image" in errors[0] and "\n" not in errors[0], errors


def test_a_strict_error_raised_in_a_loader_worker_is_one_line():
    """PyTorch re-raises a worker's exception as the same type with "Caught X in DataLoader worker process N" and
    the worker's traceback as its message: the error line keeps the original message only."""
    from torch._utils import ExceptionWrapper

    try:
        raise CorruptImageError("Cannot decode image '/data/train/a/1.jpg' (OSError: truncated).")
    except CorruptImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CorruptImageError) as excinfo:
        wrapped.reraise()
    assert "Traceback" in str(excinfo.value)
    assert train.user_error_message(excinfo.value) == "Cannot decode image '/data/train/a/1.jpg' (OSError: truncated)."


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, fw) -> SimpleNamespace:
    """A finished 1-epoch run ``outputs/keep`` whose files must survive every bad re-run untouched."""
    cwd = tmp_path_factory.mktemp("existing")
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        train.train(fw.compose_train(*fw.synthetic_args("keep"), "data.train_length=64", "epochs=1",
                                     "mlflow.enabled=false"))
        torch.set_num_threads(before)
    finally:
        os.chdir(previous)
    run_dir = cwd / "outputs" / "keep"
    (run_dir / "train.log").write_text("[earlier] the first run's log\n")  # as Hydra would have written it
    return SimpleNamespace(cwd=cwd, run_dir=run_dir, files=snapshot(run_dir))


def _layout(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.jpg`` with the given image counts (0 = an empty class folder)."""
    from PIL import Image

    for split, classes in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for cls, count in classes.items():
            (root / split / cls).mkdir()
            for i in range(count):
                Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / split / cls / f"{i}.jpg")
    return root


BAD_DATA = {
    "missing root": (lambda tmp: tmp / "nowhere", "does not exist"),
    "empty root": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "Split folder .* is missing"),
    "no class folders": (lambda tmp: _layout(tmp / "d", {"train": {}, "val": {}}), "has no class folders"),
    "empty class folder": (lambda tmp: _layout(tmp / "d", {"train": {"a": 1, "b": 0}, "val": {"a": 1, "b": 1}}),
                           "Class folder .*b.* has no images"),
    "train/val class mismatch": (lambda tmp: _layout(tmp / "d", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}),
                                 r"differ: only in train: \['b'\], only in val: \['c'\]"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_root_is_one_error_line_and_touches_nothing(case, existing_run, tmp_path, monkeypatch, caplog, fw):
    make_root, match = BAD_DATA[case]
    root = make_root(tmp_path)
    monkeypatch.chdir(existing_run.cwd)
    cfg = fw.compose_train(*_imagefolder_args(root, "keep"), "data.num_classes=2", "mlflow.enabled=false")
    _assert_user_error(cfg, match, caplog)
    assert_untouched(existing_run.run_dir, existing_run.files)


BAD_MODEL = {
    "unknown model name": (["model.name=vim_tinyy"], r"unknown model 'vim_tinyy'\. Did you mean vim_tiny.*"
                                                     r"Registered models: .*vim_test"),
    "image smaller than a patch": (["data.img_size=4"], r"img_size=4 is smaller than one patch \(8 px\)"),
    "too few patches for the registers": (["model=shufflemamba_reg_test", "data.img_size=16"],
                                          r"4 registers need at least 5: use img_size >= 24"),
    "data smaller than the model's patch": (["model.img_size=32", "data.img_size=4"],
                                            r"data\.img_size=4 does not fit model=vim_test: .*smaller than one patch"),
    "negative step interval": (["checkpoint_every_steps=-1"], r"checkpoint_every_steps must be an integer >= 0"),
    "unknown compile mode": (["compile=fastest"], r"compile='fastest' is not one of false, true, default, "
                                                  r"reduce-overhead"),
    "CUDA graphs with gradient accumulation": (["compile=reduce-overhead", "accum_steps=2"],
                                               r"compile=reduce-overhead \(CUDA graphs\) cannot accumulate gradients"),
}


@pytest.mark.parametrize("case", list(BAD_MODEL))
def test_bad_model_or_option_is_one_error_line_and_touches_nothing(case, existing_run, monkeypatch, caplog, fw):
    overrides, match = BAD_MODEL[case]
    monkeypatch.chdir(existing_run.cwd)
    cfg = fw.compose_train(*fw.synthetic_args("keep"), *overrides, "mlflow.enabled=false")
    _assert_user_error(cfg, match, caplog)
    assert_untouched(existing_run.run_dir, existing_run.files)


def test_init_from_a_checkpoint_of_another_architecture(existing_run, tmp_path, monkeypatch, caplog, fw):
    from visionmamba.models import create_model

    foreign = tmp_path / "vmamba_test.pth"
    torch.save(create_model("vmamba_test", num_classes=10, img_size=32).state_dict(), foreign)
    monkeypatch.chdir(existing_run.cwd)
    cfg = fw.compose_train(*fw.synthetic_args("keep"), f"init_from={foreign}", "mlflow.enabled=false")
    _assert_user_error(cfg, r"vmamba_test\.pth does not fit .*vim_test", caplog)
    assert_untouched(existing_run.run_dir, existing_run.files)


def _assert_user_error(cfg, match: str, caplog) -> None:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="train"), pytest.raises(SystemExit) as exited:
        with train.reported_user_errors():
            train.train(cfg)
    assert exited.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1, errors
    assert re.search(match, errors[0].splitlines()[0]), errors[0]


def test_command_line_errors_are_one_line_exit_2_and_touch_nothing(existing_run, fw, spawn):
    """The real entry points: Hydra composition errors (unknown option, unknown group choice), a dataset error
    (train.log only grows), and validate.py given a checkpoint of another architecture."""
    start = time.perf_counter()
    base = ["train.py", *fw.synthetic_args("keep"), "mlflow.enabled=false"]
    checkpoint = existing_run.run_dir / "checkpoints" / "epoch_0001.pth"
    cases = {
        "unknown option": ([*base, "epoch=3"],
                           r"^error: unknown config option 'epoch' \(did you mean epochs.*\); valid keys at the top "
                           r"level: .*epochs.*\(\+epoch=\.\.\. adds a new key on purpose\)$"),
        "unknown group choice": ([*base, "model=vim_tinyy"],
                                 r"^error: unknown model=vim_tinyy \(did you mean vim_tiny.*\); valid model options: "
                                 r".*vim_test"),
        "missing data root": (["train.py", *_imagefolder_args(existing_run.cwd / "nowhere", "keep"),
                               "mlflow.enabled=false"],
                              r"error: Dataset root .*nowhere' does not exist"),
        "other architecture": (["validate.py", f"checkpoint={checkpoint}", "model=vmamba_test", "workers=0"],
                               r"error: checkpoint .*epoch_0001\.pth does not fit model vmamba_test"),
    }
    names = list(cases)
    for pair in (names[:2], names[2:]):  # two at a time: the box has 2 cores
        procs = {name: spawn(cases[name][0], existing_run.cwd, existing_run.cwd / f"{name}.log") for name in pair}
        for name, proc in procs.items():
            output = finish(proc, existing_run.cwd / f"{name}.log", timeout=120)
            assert proc.returncode == 2, (name, output[-3000:])
            errors = [line for line in output.splitlines() if "error:" in line]
            assert len(errors) == 1, (name, errors, output[-3000:])
            assert re.search(cases[name][1], errors[0]), (name, errors[0])
            assert "Traceback" not in output, name
    assert not list(checkpoint.parent.glob("*.json"))  # validate.py wrote no summary
    assert_untouched(existing_run.run_dir, existing_run.files)
    timing("4 command-line errors", time.perf_counter() - start)


@pytest.mark.parametrize(("override", "expected"), [
    ("optimizer.bse_lr=1", r"unknown config option 'optimizer.bse_lr' \(did you mean base_lr.*\); valid keys of "
                           r"optimizer: name, base_lr, "),
    ("data=imagefolderr", r"unknown data=imagefolderr \(did you mean imagefolder or imagefolder_gpu\?\); valid data "
                          r"options: digits, imagefolder, imagefolder_gpu, synthetic"),
    ("epochs=[1", r"cannot parse the override 'epochs=\[1': no viable alternative"),
])
def test_config_composition_errors_read_as_one_line(override, expected, fw):
    from hydra.errors import ConfigCompositionException, OverrideParseException

    with pytest.raises((ConfigCompositionException, OverrideParseException)) as excinfo:
        fw.compose_train(override)
    message = train.describe_config_error(excinfo.value)
    assert "\n" not in message and re.search(expected, message), message


# ------------------------------------------------------------------------------------- mid-epoch loader resume
@pytest.mark.parametrize("workers", [0, 1])
def test_loader_skips_consumed_batches_without_loading_them(workers):
    """After restoring the generators of the epoch's start, ``skip_next_batches(k)`` yields exactly the batches
    k.. of the uninterrupted pass (same order, same worker seeds); the pass after that is a full one again."""
    from visionmamba.utils import get_loader_rng_state, set_loader_rng_state

    class Recorded(TensorDataset):
        loaded: list[int] = []

        def __getitem__(self, index):
            Recorded.loaded.append(index)
            return super().__getitem__(index)

    data = Recorded(torch.arange(40).float()[:, None], torch.arange(40))

    def make():
        return build_loader(data, batch_size=4, is_training=True, num_workers=workers, seed=3,
                            persistent_workers=True)

    reference = make()
    at_epoch_start = get_loader_rng_state(reference)
    full = [t.tolist() for _, t in reference]
    assert len(full) == 10

    resumed = make()
    set_loader_rng_state(resumed, at_epoch_start)
    Recorded.loaded.clear()
    resumed.skip_next_batches(6)
    assert len(resumed) == 10  # the epoch's length is unchanged: callers count steps from its start
    rest = [t.tolist() for _, t in resumed]
    assert rest == full[6:]
    if workers == 0:  # (a worker's loads happen in its own process)
        assert sorted(Recorded.loaded) == sorted(i for batch in full[6:] for i in batch)  # nothing else decoded
    for key, state in get_loader_rng_state(reference).items():  # both generators where a full pass leaves them
        assert torch.equal(get_loader_rng_state(resumed)[key], state), key
    second = [t.tolist() for _, t in resumed]
    assert len(second) == 10 and second == [t.tolist() for _, t in reference]  # next epoch: full, same order


def test_step_checkpoints_sort_rotate_and_stale_writes_are_removed(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2, save_every=1)
    manager.save({"model": {}, "epoch": 1}, epoch=1, is_best=False)
    for step in (3, 6):
        manager.save({"model": {}, "epoch": 1}, epoch=1, step=step, is_best=False)
    manager.save({"model": {}, "epoch": 2}, epoch=2, is_best=False)
    # epoch_0001 stays (save_every=1), the last two rolling files stay, epoch_0001_step_3 goes;
    # a step file is never a permanent snapshot
    assert [p.name for p in manager.list_epoch_files()] == ["epoch_0001.pth", "epoch_0001_step_000006.pth",
                                                            "epoch_0002.pth"]
    manager.save({"model": {}, "epoch": 2}, epoch=2, step=4, is_best=False)
    assert [p.name for p in manager.list_epoch_files()] == ["epoch_0001.pth", "epoch_0002.pth",
                                                            "epoch_0002_step_000004.pth"]
    assert manager.find_latest()[0].name == "epoch_0002_step_000004.pth"

    (tmp_path / ".epoch_0003.pth.tmp123").write_bytes(b"x")
    (tmp_path / ".best.pth.tmp9").write_bytes(b"x")
    (tmp_path / "notes.tmp1").write_bytes(b"keep me")
    with caplog.at_level(logging.WARNING):
        removed = manager.remove_stale_temp_files()
    assert sorted(p.name for p in removed) == [".best.pth.tmp9", ".epoch_0003.pth.tmp123"]
    assert (tmp_path / "notes.tmp1").exists()


# ------------------------------------------------------------------------------------------------------ MLflow
def test_mlflow_buffer_overflow_and_undelivered_metrics_are_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "_MAX_PENDING", 5)
    tracker = Tracker(enabled=True, tracking_uri="http://127.0.0.1:9", experiment_name="x", run_name="y",
                      state_file=tmp_path / "state.json", retry_after_s=3600)
    with caplog.at_level(logging.WARNING, logger="visionmamba.tracking"):
        tracker.start()
        for step in range(4):
            tracker.log_metrics({"train/loss": 1.0, "train/lr": 0.1, "throughput/img_per_s": 9.0}, step)
        tracker.finish("KILLED")
    messages = [r.getMessage() for r in caplog.records]
    overflow = [m for m in messages if "dropping the oldest" in m]
    assert len(overflow) == 1 and "5 metric values are buffered" in overflow[0]  # said once, when it starts
    final = [m for m in messages if "could not be delivered" in m]
    assert len(final) == 1 and "5 metric values" in final[0] and "7 more metric values dropped" in final[0]
