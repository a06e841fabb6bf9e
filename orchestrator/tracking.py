"""MLflow: the study's record.

One parent run per launch; one child run per Tune trial, written by the driver from Tune's results
(Ray's `MLflowLoggerCallback`), so a trial has exactly one run however many training workers or retries
it has. The default store is a SQLite file next to the experiment folders.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.utils import flatten_dict

# Progress bars for copying a handful of checkpoint files only clutter the study's terminal output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TRIAL_ID_TAG = "msx.trial_id"
STUDY_TAG = "msx.study"
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


class TrialRunsCallback(MLflowLoggerCallback):
    """Ray's MLflow logger with runs nested under the study's parent run and named after the trial.

    A trial that already has a run (the driver restarted) gets the same run back, not a second one.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, parent_run_id: str) -> None:
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name, save_artifact=False)
        self._parent_run_id = parent_run_id

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            client = MlflowClient(self.tracking_uri)
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
                    tags={"mlflow.parentRunId": self._parent_run_id, TRIAL_ID_TAG: trial.trial_id},
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
        MlflowClient(self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)


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
