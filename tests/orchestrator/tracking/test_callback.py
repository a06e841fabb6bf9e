"""The tracking callback logs the epochs a report carries besides its own at their own epochs, in the report's
write: the worker reports at validations only, and MLflow's curves still have a point per epoch. A real SQLite
MLflow store; the callback is driven with real (stub) Tune `Trial` objects, as Tune's controller calls it."""

import math

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from msx.orchestrator.tracking.callback import TrialRunsCallback
from msx.orchestrator.tracking.store import TRIAL_ID_TAG, ensure_experiment
from msx.orchestrator.trial import (
    BEST_VALIDATION_DICE,
    EARLIER_EPOCHS,
    EPOCH,
    LEARNING_RATE,
    REPLAYED_REPORT,
    STARTUP_PREFIX,
    TRAIN_LOSS,
)

EXPERIMENT = "batched"


def started_trial(tmp_path):
    """A SQLite store with a launch run, the callback writing under it, and one trial it heard start."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, EXPERIMENT, tmp_path / "artifacts")
    client = MlflowClient(uri)
    parent = client.create_run(experiment_id, run_name="launch").info.run_id
    callback = TrialRunsCallback(uri, EXPERIMENT, parent, ("mean",), fold_count=1)
    trial = Trial("msx", config={"backbone": "unet", "fold": 1, "configuration": "unet-c1"}, trial_id="t_1", stub=True)
    callback.log_trial_start(trial)
    return client, experiment_id, callback, trial


def test_epochs_carried_by_a_report_are_logged_at_their_own_epochs(tmp_path):
    client, experiment_id, callback, trial = started_trial(tmp_path)
    # A NaN loss (epoch 2 here) is left out of the record, as a report's own NaN loss is; its learning rate is kept.
    first = {
        EPOCH: 3, TRAIN_LOSS: 0.3, LEARNING_RATE: 3e-3, BEST_VALIDATION_DICE: 0.4, "training_iteration": 1,
        EARLIER_EPOCHS: [(1, 1.0, 1e-3), (2, math.nan, 2e-3)], f"{STARTUP_PREFIX}first_epoch_s": 9.5,
    }
    second = {EPOCH: 6, TRAIN_LOSS: 0.1, LEARNING_RATE: 6e-3, BEST_VALIDATION_DICE: 0.5, "training_iteration": 2,
              EARLIER_EPOCHS: [[4, 0.25, 4e-3], [5, 0.2, 5e-3]]}  # as JSON gives them back: lists
    callback.log_trial_result(1, trial, first)
    callback.log_trial_result(2, trial, second)
    assert not callback.pending

    (run,) = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = 't_1'")
    run_id = run.info.run_id
    loss = sorted((p.step, p.value) for p in client.get_metric_history(run_id, TRAIN_LOSS))
    assert loss == [(1, 1.0), (3, 0.3), (4, 0.25), (5, 0.2), (6, 0.1)]
    lr = sorted((p.step, p.value) for p in client.get_metric_history(run_id, LEARNING_RATE))
    assert lr == [(epoch, pytest.approx(1e-3 * epoch)) for epoch in range(1, 7)]
    # Validation and start-up figures stay at the report's own epoch; the carried list is no metric of its own.
    assert [(p.step, p.value) for p in client.get_metric_history(run_id, BEST_VALIDATION_DICE)] == [(3, 0.4), (6, 0.5)]
    assert [p.step for p in client.get_metric_history(run_id, f"{STARTUP_PREFIX}first_epoch_s")] == [3]
    assert not any(key.startswith(EARLIER_EPOCHS) for key in run.data.metrics)


def test_a_replayed_report_is_logged_only_when_its_epoch_is_not_in_the_run_yet(tmp_path):
    client, experiment_id, callback, trial = started_trial(tmp_path)

    callback.log_trial_result(1, trial, {EPOCH: 2, BEST_VALIDATION_DICE: 0.4, TRAIN_LOSS: 0.3})
    # The same epoch again, from a run resumed at its checkpoint: already recorded.
    callback.log_trial_result(2, trial, {EPOCH: 2, BEST_VALIDATION_DICE: 0.4, TRAIN_LOSS: 0.3, REPLAYED_REPORT: 1})
    # An epoch whose first delivery was lost (the study was interrupted while it was on its way): recorded now.
    callback.log_trial_result(3, trial, {EPOCH: 4, BEST_VALIDATION_DICE: 0.5, TRAIN_LOSS: 0.2, REPLAYED_REPORT: 1})
    assert not callback.pending

    (run,) = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = 't_1'")
    history = [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, BEST_VALIDATION_DICE)]
    assert sorted(history) == [(2, 0.4), (4, 0.5)]
    assert REPLAYED_REPORT not in run.data.metrics
