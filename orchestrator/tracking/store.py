"""MLflow: the study's record.

An experiment per study; in it, per launch, a tree of nested runs written by the driver from Tune's
events (TrialRunsCallback, a Tune logger callback):

    launch run (STUDY_TAG)
      configuration run per backbone + searched values (CONFIGURATION_TAG): its params, and once every
      fold has ended, the mean and std over folds of each val/ and test/ metric
        fold run per Tune trial (TRIAL_ID_TAG): curves, final metrics, and the final checkpoint's
        per-scan metrics (CSV), model folder and example overlays as artifacts

A trial has exactly one run however many training workers or retries it has. The default store is a
SQLite file next to the experiment folders. A store that stops answering during a study delays the record,
not the training: the callback keeps what it could not write and writes it, in order, once the store answers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
import requests
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.logger import LoggerCallback
from ray.tune.utils import flatten_dict

from ..results import (
    FINAL_REPORT,
    MODEL_DIR,
    OVERLAY_DIR,
    SCAN_METRICS_FILE,
    TrialOutcome,
    outcome_from_result,
    summarise_configurations,
)

# Progress bars for copying a handful of checkpoint files only clutter the study's terminal output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TRIAL_ID_TAG = "msx.trial_id"
CONFIGURATION_TAG = "msx.configuration"
STUDY_TAG = "msx.study"
# Where a fold's final checkpoint lives, also when it is on storage the driver cannot read.
CHECKPOINT_TAG = "msx.checkpoint_path"
# MLflow's own tag for nesting: the UI draws the tree from it.
PARENT_RUN_TAG = "mlflow.parentRunId"
SCAN_METRICS_ARTIFACT = "scan_metrics.csv"
# A configuration run's metric `val/mean/dsc` is the mean over folds; this suffix marks the std.
FOLD_STD_SUFFIX = "_std"
# Tune's bookkeeping numbers that say nothing about the model.
UNTRACKED_RESULT_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration", "time_since_restore",
    "iterations_since_restore", "done", "final",
}


@contextmanager
def tracking_uri_scope(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API on `tracking_uri`, then the caller's setting back.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to child processes; left in place it
    would point every later command of the process at this store.
    """
    previous_uri = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def default_tracking_uri(storage: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(storage / 'mlflow.db').resolve()}"


def check_tracking_server(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError unless an HTTP tracking server answers its health check.

    A study fails fast here, before Ray starts, rather than training for hours and losing its record:
    MLflow's client would retry every later call with back-off. Local stores (SQLite, files) need no check.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    health = f"{tracking_uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as error:
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    raise ConnectionError(
        f"MLflow tracking server {tracking_uri} is unreachable ({reason}); start it, or leave out --tracking-uri "
        "and MLFLOW_TRACKING_URI to use the local SQLite store (Ray was not started)"
    )


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path) -> str:
    """The experiment's id; created with its artifacts under the storage folder if it does not exist."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None if tracking_uri.startswith("http") else (artifact_root / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def trial_run_name(config: dict[str, Any]) -> str:
    return f"{config['configuration']}-fold{config['fold']}"


def fold_run_outcome(run: Run) -> TrialOutcome | None:
    """A fold run's final evaluation as results.py takes it; None for a trial that did not reach it.

    The worker marks its final report with FINAL_REPORT, a key the callback leaves out with Tune's bookkeeping;
    the split metrics come with that report only, so they mark a trial that finished.
    """
    params, metrics = run.data.params, run.data.metrics
    if not any(key.startswith(("val/", "test/")) for key in metrics):
        return None
    return outcome_from_result(params, {**metrics, FINAL_REPORT: 1})


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
        max_results=SEARCH_MAX_RESULTS_THRESHOLD,
    )


def write_scan_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The worker's per-scan rows (split, scan, strategy, then every metric) as one CSV table."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["split", "scan", "strategy"])
        writer.writeheader()
        writer.writerows(rows)


# ---- the driver's writes ---------------------------------------------------------------------------
# Each Tune event becomes one write, made at once when the store answers and otherwise kept, in order, until
# it does. A write names runs by trial id or configuration, never by run id: a run whose creation is still
# pending has none yet.


@dataclass(frozen=True)
class OpenTrialRun:
    """A trial started: its configuration's run and its own, found (by tag) or made, its config as params."""

    trial_id: str
    config: dict[str, Any]

    def describe(self) -> str:
        return f"{trial_run_name(self.config)}: start"


@dataclass(frozen=True)
class LogTrialMetrics:
    trial_id: str
    run_name: str
    step: int
    # Timestamps fixed when Tune reported them: a replayed batch that had reached the store adds nothing.
    metrics: tuple[Metric, ...]

    def describe(self) -> str:
        return f"{self.run_name}: metrics of step {self.step}"


@dataclass(frozen=True)
class LogFinalCheckpoint:
    trial_id: str
    run_name: str
    checkpoint_path: str

    def describe(self) -> str:
        return f"{self.run_name}: final checkpoint's files ({self.checkpoint_path})"


@dataclass(frozen=True)
class CloseTrialRun:
    """A trial ended: its run's status, then its configuration's summary if that was its last fold."""

    trial_id: str
    config: dict[str, Any]
    status: str
    end_time_ms: int

    def describe(self) -> str:
        return f"{trial_run_name(self.config)}: end ({self.status}) and configuration summary"


TrackingWrite = OpenTrialRun | LogTrialMetrics | LogFinalCheckpoint | CloseTrialRun

# MLflow's HTTP client retries a request 7 times with back-off factor 2 and waits 120 s for each answer:
# while a server is down every write would hold Tune's loop for minutes. The driver's writes fail fast
# instead and wait in the pending queue. Uploads of a model may take the server a while to store.
REQUEST_TIMEOUT_S = 10
UPLOAD_TIMEOUT_S = 60
# How often the end of a study asks a store that does not answer again, within its bounded wait.
FINAL_RETRY_PAUSE_S = 5.0
# Errors that say a write did not reach the store, as opposed to the store refusing it.
UNREACHABLE_ERRORS = (
    ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
)


@contextmanager
def fail_fast_http(timeout_s: int) -> Iterator[None]:
    """MLflow's HTTP client with one retry and `timeout_s` per request; a user's own MLFLOW_HTTP_REQUEST_* win.

    MLflow reads these variables at every request, so they bind the requests made inside the block only.
    """
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    added = {key: value for key, value in settings.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def store_unavailable(error: BaseException) -> bool:
    """Whether `error` says the tracking store did not answer (down, unreachable, or a SQLite file locked
    by another writer), so that the same write may succeed later."""
    return any(
        isinstance(cause, UNREACHABLE_ERRORS)
        or (isinstance(cause, MlflowException) and cause.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE))
        for cause in _error_chain(error)
    )


def _root_cause(error: BaseException) -> str:
    *_, innermost = _error_chain(error)
    return str(innermost)


class PendingWritesError(ConnectionError):
    """The tracking store did not take the study's pending writes within the wait at the study's end."""


class TrialRunsCallback(LoggerCallback):
    """Tune's events as the launch's tree in MLflow: configuration runs under the launch's run, a fold run per
    trial under its configuration's run.

    A configuration's run is made when its first fold starts; its summary is logged, and the run ended, when
    all `fold_count` folds have ended. A trial or configuration that already has a run (the driver restarted,
    or a write whose answer was lost is made again) gets the same run back, not a second one.

    A store that does not answer does not stop the study: the write is kept, with every later one, in a
    pending queue and the trials train on. The queue is made, oldest first, at the next Tune event once
    `retry_interval_s` has passed since the last failure (so an outage costs Tune's loop one fast-failing
    request per interval), and is part of Tune's saved experiment state, so a resumed driver makes it too.
    At the end of the experiment the driver waits up to `final_wait_s` for the store, then raises
    PendingWritesError naming the store and what it did not take.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        parent_run_id: str,
        strategies: tuple[str, ...],
        fold_count: int,
        retry_interval_s: float = 30.0,
        final_wait_s: float = 300.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._parent_run_id = parent_run_id
        self._strategies = strategies
        self._fold_count = fold_count
        self._retry_interval_s = retry_interval_s
        self._final_wait_s = final_wait_s
        # Oldest first.
        self._pending: list[TrackingWrite] = []
        # What the store has told this driver: the experiment's id, and run ids by trial id and by configuration.
        self._experiment_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._configuration_runs: dict[str, str] = {}
        # time.monotonic() before which a store that failed is not asked again; None while it answers.
        self._next_attempt: float | None = None

    @property
    def pending(self) -> tuple[TrackingWrite, ...]:
        return tuple(self._pending)

    # ---- Tune's events

    def log_trial_start(self, trial) -> None:
        self._write(OpenTrialRun(trial.trial_id, dict(trial.config)))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result.get("epoch", iteration))
        now = int(time.time() * 1000)
        metrics = tuple(
            Metric(key, float(value), now, step)
            for key, value in flatten_dict(result).items()
            if key not in UNTRACKED_RESULT_KEYS
            and not key.startswith("config/")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not math.isnan(value)
        )
        run_name = trial_run_name(trial.config)
        self._write(LogTrialMetrics(trial.trial_id, run_name, step, metrics))
        if result.get(FINAL_REPORT) and result.get(CHECKPOINT_PATH_KEY):
            self._write(LogFinalCheckpoint(trial.trial_id, run_name, result[CHECKPOINT_PATH_KEY]))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self._write(CloseTrialRun(trial.trial_id, dict(trial.config), "FAILED" if failed else "FINISHED", int(time.time() * 1000)))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        # A store that came back gets the queue without waiting for a trial's next event.
        self._flush()

    def on_experiment_end(self, trials: list, **info) -> None:
        if not self._pending:
            return
        print(
            f"MLflow: {len(self._pending)} writes to {self.tracking_uri} are pending; waiting up to "
            f"{self._final_wait_s:.0f} s for it to answer",
            flush=True,
        )
        deadline = time.monotonic() + self._final_wait_s
        while True:
            self._flush(force=True)
            remaining = deadline - time.monotonic()
            if not self._pending or remaining <= 0:
                break
            time.sleep(min(FINAL_RETRY_PAUSE_S, remaining))
        if self._pending:
            listed = "; ".join(write.describe() for write in self._pending[:10])
            more = f"; and {len(self._pending) - 10} more" if len(self._pending) > 10 else ""
            raise PendingWritesError(
                f"MLflow tracking store {self.tracking_uri} did not answer within {self._final_wait_s:.0f} s of the "
                f"study's end; {len(self._pending)} writes were not logged: {listed}{more}. They are kept in Tune's "
                "saved experiment state: once the store answers, resuming the study (msx launch --resume) logs them."
            )

    # Tune saves this with the experiment's state and gives it back to a resumed driver.
    def get_state(self) -> dict[str, Any]:
        return {"pending": list(self._pending)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._pending = list(state["pending"])

    # ---- the store

    def _write(self, write: TrackingWrite) -> None:
        self._pending.append(write)
        self._flush()

    def _flush(self, force: bool = False) -> None:
        """Make the pending writes, oldest first, until the store does not answer; a store that did not answer
        is asked again only `retry_interval_s` later, unless `force`."""
        if not self._pending or (not force and self._next_attempt is not None and time.monotonic() < self._next_attempt):
            return
        client = MlflowClient(self.tracking_uri)
        while self._pending:
            write = self._pending[0]
            try:
                with fail_fast_http(UPLOAD_TIMEOUT_S if isinstance(write, LogFinalCheckpoint) else REQUEST_TIMEOUT_S):
                    self._apply(client, write)
            except Exception as error:
                if not store_unavailable(error):
                    # A write the store refuses would block every later one: the study stops, as on any error.
                    self._pending.pop(0)
                    raise
                if self._next_attempt is None:
                    print(
                        f"MLflow: tracking store {self.tracking_uri} does not answer ({_root_cause(error)}); trials "
                        "keep training and their record waits here, to be logged in order once the store answers",
                        flush=True,
                    )
                self._next_attempt = time.monotonic() + self._retry_interval_s
                return
            self._pending.pop(0)
        if self._next_attempt is not None:
            print(f"MLflow: tracking store {self.tracking_uri} answers again; the pending writes are logged", flush=True)
            self._next_attempt = None

    def _apply(self, client: MlflowClient, write: TrackingWrite) -> None:
        match write:
            case OpenTrialRun():
                self._open_trial_run(client, write)
            case LogTrialMetrics():
                client.log_batch(self._trial_run(client, write.trial_id), metrics=list(write.metrics))
            case LogFinalCheckpoint():
                self._log_final_checkpoint(client, self._trial_run(client, write.trial_id), write.checkpoint_path)
            case CloseTrialRun():
                client.set_terminated(self._trial_run(client, write.trial_id), write.status, end_time=write.end_time_ms)
                self._end_configuration_when_all_folds_ended(client, self._configuration_run(client, write.config), write.end_time_ms)

    def _experiment(self, client: MlflowClient) -> str:
        if self._experiment_id is None:
            self._experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        return self._experiment_id

    def _find_run(self, client: MlflowClient, filter_string: str) -> str | None:
        runs = client.search_runs([self._experiment(client)], filter_string=filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def _configuration_run(self, client: MlflowClient, config: dict[str, Any]) -> str:
        name = config["configuration"]
        if name not in self._configuration_runs:
            run_id = self._find_run(
                client, f"tags.`{CONFIGURATION_TAG}` = '{name}' AND tags.`{PARENT_RUN_TAG}` = '{self._parent_run_id}'"
            )
            if run_id is None:
                run_id = client.create_run(
                    self._experiment(client),
                    run_name=name,
                    tags={PARENT_RUN_TAG: self._parent_run_id, CONFIGURATION_TAG: name},
                ).info.run_id
            # Also for a run found: the write that made it may have failed before its params were logged.
            # The fold is the one thing the configuration's trials differ in.
            client.log_batch(run_id, params=[Param(key, str(value)) for key, value in config.items() if key != "fold"])
            self._configuration_runs[name] = run_id
        return self._configuration_runs[name]

    def _trial_run(self, client: MlflowClient, trial_id: str) -> str:
        if trial_id not in self._trial_runs:
            run_id = self._find_run(client, f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'")
            if run_id is None:
                raise LookupError(f"trial {trial_id} has no MLflow run in experiment {self.experiment_name!r}")
            self._trial_runs[trial_id] = run_id
        return self._trial_runs[trial_id]

    def _open_trial_run(self, client: MlflowClient, write: OpenTrialRun) -> None:
        configuration_run = self._configuration_run(client, write.config)
        run_id = self._trial_runs.get(write.trial_id) or self._find_run(client, f"tags.`{TRIAL_ID_TAG}` = '{write.trial_id}'")
        if run_id is None:
            run_id = client.create_run(
                self._experiment(client),
                run_name=trial_run_name(write.config),
                tags={PARENT_RUN_TAG: configuration_run, TRIAL_ID_TAG: write.trial_id},
            ).info.run_id
        else:
            # The trial runs again (its driver restarted, or Tune retries it): so does its run.
            client.update_run(run_id, status="RUNNING")
        self._trial_runs[write.trial_id] = run_id
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in write.config.items()])

    def _log_final_checkpoint(self, client: MlflowClient, run_id: str, checkpoint_path: str) -> None:
        """The final checkpoint's per-scan metrics (as CSV), model folder and example overlays, on the fold run.

        Copied only from storage this driver reads as a folder (local, or shared among the nodes); elsewhere
        the tag is the reference.
        """
        client.set_tag(run_id, CHECKPOINT_TAG, checkpoint_path)
        folder = Path(checkpoint_path)
        if not folder.is_dir():
            return
        with tempfile.TemporaryDirectory() as scratch:
            table = Path(scratch) / SCAN_METRICS_ARTIFACT
            write_scan_metrics_csv(table, json.loads((folder / SCAN_METRICS_FILE).read_text()))
            client.log_artifact(run_id, str(table))
        client.log_artifacts(run_id, str(folder / MODEL_DIR), MODEL_DIR)
        if (folder / OVERLAY_DIR).is_dir():
            client.log_artifacts(run_id, str(folder / OVERLAY_DIR), OVERLAY_DIR)

    def _end_configuration_when_all_folds_ended(self, client: MlflowClient, run_id: str, time_ms: int) -> None:
        folds = child_runs(client, self._experiment(client), run_id)
        if len(folds) < self._fold_count or any(fold.info.status == "RUNNING" for fold in folds):
            return
        outcomes = [outcome for outcome in map(fold_run_outcome, folds) if outcome is not None]
        # Empty unless every fold reached its final evaluation: a partial mean would compare unlike with unlike.
        for configuration in summarise_configurations(outcomes, self._strategies, self._fold_count):
            metrics = []
            for (split, strategy, metric), (mean, std) in configuration.summary.items():
                if not math.isnan(mean):
                    key = f"{split}/{strategy}/{metric}"
                    # The last fold's end as the time: made again, the summary adds no second point.
                    metrics += [Metric(key, mean, time_ms, 0), Metric(key + FOLD_STD_SUFFIX, std, time_ms, 0)]
            client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id, "FAILED" if any(fold.info.status == "FAILED" for fold in folds) else "FINISHED")


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested spec dictionaries as MLflow params: {"training.lr": 1e-4, ...}."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else key, inner))
        return flat
    return {prefix: value}


def log_study_start(run_id: str, tracking_uri: str, spec_dict: dict[str, Any], data_root: str) -> None:
    client = MlflowClient(tracking_uri)
    client.log_batch(
        run_id,
        params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten("", spec_dict).items()],
        tags=[mlflow.entities.RunTag("msx.data_root", data_root)],
    )
    client.log_dict(run_id, spec_dict, "spec.json")
