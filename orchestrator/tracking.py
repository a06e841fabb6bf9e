"""MLflow: the study's record.

An experiment per study; in it, per launch, a tree of nested runs written by the driver from Tune's
results (Ray's `MLflowLoggerCallback`):

    launch run (STUDY_TAG)
      configuration run per backbone + searched values (CONFIGURATION_TAG): its params, and once every
      fold has ended, the mean and std over folds of each val/ and test/ metric
        fold run per Tune trial (TRIAL_ID_TAG): curves, final metrics, and the final checkpoint's
        per-scan metrics (CSV), model folder and example overlays as artifacts

A trial has exactly one run however many training workers or retries it has. The default store is a
SQLite file next to the experiment folders.
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
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param, Run
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.utils import flatten_dict

from .results import (
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


class TrialRunsCallback(MLflowLoggerCallback):
    """Ray's MLflow logger writing the launch's tree: configuration runs under the launch's run, a fold run
    per trial under its configuration's run.

    A configuration's run is made when its first fold starts; its summary is logged, and the run ended, when
    all `fold_count` folds have ended. A trial or configuration that already has a run (the driver restarted)
    gets the same run back, not a second one.
    """

    def __init__(
        self, tracking_uri: str, experiment_name: str, parent_run_id: str, strategies: tuple[str, ...], fold_count: int
    ) -> None:
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name, save_artifact=False)
        self._parent_run_id = parent_run_id
        self._strategies = strategies
        self._fold_count = fold_count
        # configuration name -> run id
        self._configuration_runs: dict[str, str] = {}

    def _client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def _configuration_run(self, config: dict[str, Any]) -> str:
        name = config["configuration"]
        if name not in self._configuration_runs:
            client = self._client()
            existing = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=f"tags.`{CONFIGURATION_TAG}` = '{name}' AND tags.`{PARENT_RUN_TAG}` = '{self._parent_run_id}'",
                max_results=1,
            )
            if existing:
                self._configuration_runs[name] = existing[0].info.run_id
            else:
                run_id = client.create_run(
                    self.mlflow_util.experiment_id,
                    run_name=name,
                    tags={PARENT_RUN_TAG: self._parent_run_id, CONFIGURATION_TAG: name},
                ).info.run_id
                # The fold is the one thing the configuration's trials differ in.
                client.log_batch(run_id, params=[Param(key, str(value)) for key, value in config.items() if key != "fold"])
                self._configuration_runs[name] = run_id
        return self._configuration_runs[name]

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            client = self._client()
            existing = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'",
                max_results=1,
            )
            if existing:
                self._trial_runs[trial] = existing[0].info.run_id
                client.update_run(existing[0].info.run_id, status="RUNNING")
            else:
                run = client.create_run(
                    self.mlflow_util.experiment_id,
                    run_name=trial_run_name(trial.config),
                    tags={PARENT_RUN_TAG: self._configuration_run(trial.config), TRIAL_ID_TAG: trial.trial_id},
                )
                self._trial_runs[trial] = run.info.run_id
        super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result.get("epoch", iteration))
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in flatten_dict(result).items()
            if key not in UNTRACKED_RESULT_KEYS
            and not key.startswith("config/")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not math.isnan(value)
        ]
        run_id = self._trial_runs[trial]
        self._client().log_batch(run_id, metrics=metrics)
        if result.get(FINAL_REPORT) and result.get(CHECKPOINT_PATH_KEY):
            self._log_final_checkpoint(run_id, result[CHECKPOINT_PATH_KEY])

    def _log_final_checkpoint(self, run_id: str, checkpoint_path: str) -> None:
        """The final checkpoint's per-scan metrics (as CSV), model folder and example overlays, on the fold run.

        Copied only from storage this driver reads as a folder (local, or shared among the nodes); elsewhere
        the tag is the reference.
        """
        client = self._client()
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

    def log_trial_end(self, trial, failed: bool = False) -> None:
        super().log_trial_end(trial, failed)
        self._end_configuration_when_all_folds_ended(self._configuration_run(trial.config))

    def _end_configuration_when_all_folds_ended(self, run_id: str) -> None:
        client = self._client()
        folds = child_runs(client, self.mlflow_util.experiment_id, run_id)
        if len(folds) < self._fold_count or any(fold.info.status == "RUNNING" for fold in folds):
            return
        outcomes = [outcome for outcome in map(fold_run_outcome, folds) if outcome is not None]
        # Empty unless every fold reached its final evaluation: a partial mean would compare unlike with unlike.
        for configuration in summarise_configurations(outcomes, self._strategies, self._fold_count):
            now = int(time.time() * 1000)
            metrics = []
            for (split, strategy, metric), (mean, std) in configuration.summary.items():
                if not math.isnan(mean):
                    key = f"{split}/{strategy}/{metric}"
                    metrics += [Metric(key, mean, now, 0), Metric(key + FOLD_STD_SUFFIX, std, now, 0)]
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
