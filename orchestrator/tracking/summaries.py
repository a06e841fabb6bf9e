"""A configuration's leave-one-subject-out summary on its MLflow run, once every fold has ended."""

from __future__ import annotations

import math

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ..results import summarise_configurations
from .store import FOLD_STD_SUFFIX, child_runs, fold_run_outcome


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
