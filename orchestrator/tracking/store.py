"""MLflow: the study's record, and the tracking store it lives in.

An experiment per study; in it, per launch, a tree of nested runs written by the driver from Tune's
events (TrialRunsCallback, a Tune logger callback):

    launch run (STUDY_TAG)
      configuration run per backbone + searched values (CONFIGURATION_TAG): its params, and once every
      fold has ended, the mean and std over folds of each val/ and test/ metric
        fold run per Tune trial (TRIAL_ID_TAG): curves, final metrics, and the final checkpoint's
        per-scan metrics (CSV), model folder and example overlays as artifacts

A trial has exactly one run however many training workers or retries it has. The default store is a
SQLite file next to the experiment folders. This module names the record's tags and artifacts, reaches the store,
and reads a launch's runs back; callback.py writes them.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient

from ..results import TrialOutcome, outcome_from_result
from ..trial import FINAL_REPORT, TrialConfig

# Progress bars for copying a handful of checkpoint files only clutter the study's terminal output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TRIAL_ID_TAG = "msx.trial_id"
CONFIGURATION_TAG = "msx.configuration"
STUDY_TAG = "msx.study"
# The launch run's provenance: the cohort it read, that data's fingerprint, the code that ran.
DATA_ROOT_TAG = "msx.data_root"
DATA_FINGERPRINT_TAG = "msx.data_fingerprint"
CODE_VERSION_TAG = "msx.code_version"
# Where a fold's final checkpoint lives, also when it is on storage the driver cannot read.
CHECKPOINT_TAG = "msx.checkpoint_path"
# MLflow's own tag for nesting: the UI draws the tree from it.
PARENT_RUN_TAG = "mlflow.parentRunId"
SCAN_METRICS_ARTIFACT = "scan_metrics.csv"
SPEC_ARTIFACT = "spec.json"
# A configuration run's metric `val/mean/dsc` is the mean over folds; this suffix marks the std.
FOLD_STD_SUFFIX = "_std"
# The search's record (tracking/summaries.py::log_search_record): its summary on the launch run, whether the time
# budget cut it short; on each configuration run its status (complete, pruned, ...), the rung that pruned it and
# its folds' mean validation Dice at each rung.
SEARCH_ARTIFACT = "search_summary.json"
CUT_SHORT_TAG = "msx.cut_short"
CONFIGURATION_STATUS_TAG = "msx.configuration_status"
PRUNED_AT_TAG = "msx.pruned_at_epoch"
RUNG_METRIC = "rung/val_dice"


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


def fold_run_outcome(run: Run) -> TrialOutcome | None:
    """A fold run's final evaluation as results.py takes it; None for a trial that did not reach it.

    The worker marks its final report with FINAL_REPORT, a key the callback leaves out with Tune's bookkeeping;
    the split metrics come with that report only, so they mark a trial that finished.
    """
    params, metrics = run.data.params, run.data.metrics
    if not any(key.startswith(("val/", "test/")) for key in metrics):
        return None
    return outcome_from_result(TrialConfig.from_tune(params), {**metrics, FINAL_REPORT: 1})


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
        max_results=SEARCH_MAX_RESULTS_THRESHOLD,
    )


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
        tags=[mlflow.entities.RunTag(DATA_ROOT_TAG, data_root)],
    )
    client.log_dict(run_id, spec_dict, SPEC_ARTIFACT)
