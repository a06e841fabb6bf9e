"""A configuration's leave-one-subject-out summary on its MLflow run, once every fold has ended; the search's
record (pruned, cut short, rung scores) on the launch's and the configurations' runs."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from ..results import summarise_configurations
from ..study.search_record import SearchSummary, write_summary
from .store import (
    CONFIGURATION_STATUS_TAG,
    CUT_SHORT_TAG,
    FOLD_STD_SUFFIX,
    PRUNED_AT_TAG,
    RUNG_METRIC,
    SEARCH_ARTIFACT,
    child_runs,
    fold_run_outcome,
)


def end_configuration_when_all_folds_ended(
    client: MlflowClient, experiment_id: str, run_id: str, strategies: tuple[str, ...], fold_count: int, time_ms: int
) -> None:
    """Once all `fold_count` fold runs under configuration run `run_id` have ended: the mean and std over folds of
    every val/ and test/ metric, and the run ended (FAILED if a fold failed)."""
    folds = child_runs(client, experiment_id, run_id)
    if len(folds) < fold_count or any(fold.info.status == "RUNNING" for fold in folds):
        return
    outcomes = [outcome for outcome in map(fold_run_outcome, folds) if outcome is not None]
    # Empty unless every fold reached its final evaluation: a partial mean would compare unlike with unlike.
    for configuration in summarise_configurations(outcomes, strategies, fold_count):
        metrics = []
        for (split, strategy, metric), (mean, std) in configuration.summary.items():
            if not math.isnan(mean):
                key = f"{split}/{strategy}/{metric}"
                # The last fold's end as the time: made again, the summary adds no second point.
                metrics += [Metric(key, mean, time_ms, 0), Metric(key + FOLD_STD_SUFFIX, std, time_ms, 0)]
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FAILED" if any(fold.info.status == "FAILED" for fold in folds) else "FINISHED")


def log_search_record(
    client: MlflowClient, launch_run_id: str, configuration_runs: dict[str, str], summary: SearchSummary
) -> None:
    """The summary on the launch's run (artifact, epochs, cut short) and each configuration's status and rung
    scores on its own run (`configuration_runs`: configuration name -> run id)."""
    client.log_batch(
        launch_run_id,
        metrics=[
            Metric("epochs_trained", summary.epochs_trained, _now_ms(), 0),
            Metric("epochs_full_grid", summary.epochs_full_grid, _now_ms(), 0),
        ],
        tags=[RunTag(CUT_SHORT_TAG, str(summary.cut_short).lower())],
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / SEARCH_ARTIFACT
        write_summary(path, summary)
        client.log_artifact(launch_run_id, str(path))
    for configuration in summary.configurations:
        run_id = configuration_runs.get(configuration.name)
        if run_id is None:
            continue
        tags = [RunTag(CONFIGURATION_STATUS_TAG, configuration.status)]
        if configuration.status == "pruned" and configuration.last_rung is not None:
            tags.append(RunTag(PRUNED_AT_TAG, str(configuration.last_rung)))
        metrics = [
            Metric(RUNG_METRIC, value, int(1000 * (configuration.decided_at or 0)) or _now_ms(), epoch)
            for epoch, value in configuration.rung_means.items()
            if not math.isnan(value)
        ]
        client.log_batch(run_id, metrics=metrics, tags=tags)


def _now_ms() -> int:
    return int(time.time() * 1000)
