"""MLflow tracking for one training job: global rank 0 only, one run per job, the same run again on resume.

A tracking server that is down or slow never stops training: the first failure is reported once, calls are
buffered and retried after ``retry_after_s`` seconds, then at doubling intervals (at most 15 minutes, so a
black-holed server costs a bounded share of the run), and whatever still cannot be delivered when the job ends is
reported with a count (never dropped silently). Delivery is synchronous on purpose: no thread is alive when the
DataLoader forks its workers.

Step convention: ``train/*``, ``throughput/*`` and ``memory/*`` use the optimizer-update count as step;
``val/*`` and ``val_ema/*`` use the number of completed epochs, so validation curves of runs with different batch
sizes line up.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from .utils import flatten_config

__all__ = ["Tracker", "flatten_config", "git_commit"]

log = logging.getLogger(__name__)

# MLflow's HTTP client retries 7 times with exponential backoff (minutes) before it gives up; we retry ourselves,
# so keep each attempt short. Users can still override these through the environment.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

_MAX_PENDING = 200_000  # buffered metric values kept while the server is away; older ones are counted and dropped
_MAX_RETRY_S = 900.0


def git_commit(path: str | os.PathLike) -> Optional[str]:
    """HEAD commit of the repository holding ``path`` (suffixed ``-dirty`` with local changes), or None."""
    try:
        cwd = str(Path(path).resolve().parent if Path(path).is_file() else path)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """One MLflow run, created (or reopened) by :meth:`start`.

    Args:
        enabled: False (or a non-zero rank) turns every method into a no-op.
        state_file: JSON file in the run directory remembering the run id; a re-run of the same job reopens that
            run instead of creating a second one (as long as the tracking URI is unchanged).
    """

    def __init__(self, *, enabled: bool, tracking_uri: str, experiment_name: str, run_name: str,
                 state_file: Optional[str | os.PathLike] = None, retry_after_s: float = 60.0):
        self.enabled = bool(enabled)
        if self.enabled and tracking_uri.startswith(("http://", "https://")):
            # urllib3 logs every retry of an unreachable server; the one warning of _report says it better
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.state_file = Path(state_file) if state_file else None
        self.retry_after_s = retry_after_s
        self.run_id: Optional[str] = None
        self.resumed = False
        self._client = None
        self._failures = 0
        self._dropped = 0
        self._next_retry = 0.0
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._pending_metrics: list[tuple[str, float, int, int]] = []
        self._pending_artifacts: list[tuple[str, Optional[str]]] = []

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self, tags: Optional[Mapping[str, Any]] = None) -> Optional[str]:
        """Create or reopen the run; returns its id (None when disabled or the server is unreachable for now)."""
        if not self.enabled:
            return None
        if tags:
            self._pending_tags.update({k: str(v) for k, v in tags.items() if v is not None})
        self._flush(force=True)
        return self.run_id

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is buffered and close the run (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        if not self.enabled:
            return
        self._flush(force=True)
        if self.run_id is not None and self._client is not None:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as exc:  # noqa: BLE001 - tracking must never end the job
                self._report(exc)
        metrics, params = len(self._pending_metrics), len(self._pending_params) + len(self._pending_tags)
        artifacts = len(self._pending_artifacts)
        if metrics or params or artifacts or self._dropped:
            log.warning("MLflow: %d metric values, %d params/tags and %d artifacts could not be delivered to %s "
                        "(%d more metric values dropped while buffering); the run directory keeps the checkpoints, "
                        "final_metrics.json and train.log", metrics, params, artifacts, self.tracking_uri,
                        self._dropped)

    # ---- logging ---------------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            self._pending_params.update({k: str(v) for k, v in params.items()})
            self._flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            self._pending_tags.update({k: str(v) for k, v in tags.items() if v is not None})
            self._flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self._pending_metrics.extend((k, float(v), now, int(step)) for k, v in metrics.items())
        overflow = len(self._pending_metrics) - _MAX_PENDING
        if overflow > 0:
            if not self._dropped:
                log.warning("MLflow: %d metric values are buffered for %s, the most kept: dropping the oldest from "
                            "now on (counted; the total is reported when the run ends)", _MAX_PENDING,
                            self.tracking_uri)
            del self._pending_metrics[:overflow]
            self._dropped += overflow
        self._flush()

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._pending_artifacts.append((str(path), artifact_path))
            self._flush()

    # ---- delivery --------------------------------------------------------------------------------------------
    def _flush(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._next_retry:
            return  # the server failed recently: keep buffering instead of stalling every step on a timeout
        try:
            if self.run_id is None:
                self._open_run()
            self._deliver()
        except Exception as exc:  # noqa: BLE001 - any MLflow/network error: warn once, buffer, retry later
            self._report(exc)
            backoff = min(self.retry_after_s * 2 ** (self._failures - 1), _MAX_RETRY_S)
            self._next_retry = time.monotonic() + backoff
            return
        if self._failures:
            log.warning("MLflow at %s is reachable again; buffered data delivered", self.tracking_uri)
            self._failures = 0

    def _open_run(self) -> None:
        from mlflow.tracking import MlflowClient  # imported lazily: `import mlflow` costs seconds

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        previous = self._read_state()
        if previous is not None:
            try:
                run = self._client.get_run(previous)
                if run.info.lifecycle_stage == "active":
                    self._client.update_run(previous, status="RUNNING")
                    self.run_id, self.resumed = previous, True
                    log.info("MLflow: continuing run %s (%s)", previous, self.tracking_uri)
                    return
            except Exception as exc:  # noqa: BLE001 - deleted run or other store: start a fresh one
                if "RESOURCE_DOES_NOT_EXIST" not in str(exc) and "not found" not in str(exc).lower():
                    raise
            log.warning("MLflow: run %s recorded in %s no longer exists; starting a new run", previous,
                        self.state_file)
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self._client.create_experiment(self.experiment_name))
        run = self._client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        self._write_state()
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.experiment_name, self.tracking_uri)

    def _deliver(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self.resumed and self._pending_params:
            # Params are immutable in MLflow: on resume send only the new ones; changed values go in a tag.
            logged = self._client.get_run(self.run_id).data.params
            changed = {k: v for k, v in self._pending_params.items() if k in logged and logged[k] != v}
            if changed:
                self._pending_tags["resume.changed_params"] = json.dumps(changed)[:5000]
            self._pending_params = {k: v for k, v in self._pending_params.items() if k not in logged}
        while self._pending_params or self._pending_tags:
            params = list(self._pending_params.items())[:100]
            tags = list(self._pending_tags.items())[:100 - len(params)] if len(params) < 100 else []
            self._client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params],
                                   tags=[RunTag(k, v) for k, v in tags])
            for k, _ in params:
                del self._pending_params[k]
            for k, _ in tags:
                del self._pending_tags[k]
        while self._pending_metrics:
            batch = self._pending_metrics[:1000]
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in batch])
            del self._pending_metrics[:len(batch)]
        while self._pending_artifacts:
            path, artifact_path = self._pending_artifacts[0]
            if Path(path).exists():
                self._client.log_artifact(self.run_id, path, artifact_path)
            else:
                log.warning("MLflow: artifact %s vanished before upload", path)
            self._pending_artifacts.pop(0)

    def _report(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures == 1:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("MLflow at %s is unavailable (%s: %s); training continues, logging is buffered and "
                        "retried in %.0fs, then less and less often", self.tracking_uri, type(exc).__name__,
                        first_line[:200], self.retry_after_s)

    def _read_state(self) -> Optional[str]:
        if self.state_file is None or not self.state_file.is_file():
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if state.get("tracking_uri") != self.tracking_uri:
            return None  # another store: its run ids mean nothing here
        return state.get("run_id")

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tracking_uri": self.tracking_uri, "experiment_name": self.experiment_name,
                                   "run_id": self.run_id}, indent=2))
        os.replace(tmp, self.state_file)
