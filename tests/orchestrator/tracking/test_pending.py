"""The tracking server goes away in the middle of a study: trials keep reporting, the driver's callback keeps
what it could not write without holding up Tune, and writes it, in order and exactly once, when the server
answers again; at the study's end it waits a bounded time, then names the store and what was not logged.

A real `mlflow server` on 127.0.0.1 is stopped and started again on the same port and store; the callback is
driven with real Tune `Trial` objects, as Tune's controller calls it.
"""

import json
import os
import pickle
import statistics
import time

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from msx.models.fold import MODEL_DIR, SCAN_METRICS_FILE
from msx.orchestrator.tracking.callback import TrialRunsCallback
from msx.orchestrator.tracking.pending import PendingWritesError
from msx.orchestrator.tracking.store import (
    CONFIGURATION_TAG,
    PARENT_RUN_TAG,
    SCAN_METRICS_ARTIFACT,
    STUDY_TAG,
    TRIAL_ID_TAG,
    ensure_experiment,
)
from tests.helpers import free_port

from ..servers import start_mlflow_server, stop_server

EXPERIMENT = "outage"
STRATEGIES = ("mean",)
FOLDS = (1, 2)
EPOCHS = 4
# What one callback call may take while the server is down: Tune's loop must not wait on MLflow's back-off.
CALL_BOUND_S = 3.0


def fold_trial(launch: str, fold: int) -> Trial:
    config = {"backbone": "unet", "fold": fold, "configuration": f"{launch}-unet-c1", "training.lr": 0.001}
    return Trial("msx", config=config, trial_id=f"{launch}_{fold}", stub=True)


def train_loss(fold: int, epoch: int) -> float:
    return 1.0 / epoch + 0.01 * fold


def dsc(fold: int, split: str) -> float:
    return 0.5 + 0.1 * fold + (0.05 if split == "test" else 0.0)


def report(trial: Trial, epoch: int, checkpoints) -> dict:
    """The worker's report of `epoch`; the last one carries the final evaluation and its checkpoint folder."""
    fold = trial.config["fold"]
    result = {"epoch": epoch, "train_loss": train_loss(fold, epoch), "training_iteration": epoch}
    if epoch == EPOCHS:
        folder = checkpoints / trial.trial_id
        (folder / MODEL_DIR).mkdir(parents=True)
        (folder / MODEL_DIR / "weights.pt").write_bytes(trial.trial_id.encode())
        rows = [
            {"split": split, "scan": f"{trial.trial_id}-{split}", "strategy": "mean", "dsc": dsc(fold, split)}
            for split in ("val", "test")
        ]
        (folder / SCAN_METRICS_FILE).write_text(json.dumps(rows))
        result.update(
            {f"{split}/mean/dsc": dsc(fold, split) for split in ("val", "test")}, final=1, checkpoint_path=str(folder)
        )
    return result


def promptly(call, *args, **kwargs) -> None:
    began = time.monotonic()
    call(*args, **kwargs)
    assert time.monotonic() - began < CALL_BOUND_S, call


def assert_launch_recorded_once(
    client: MlflowClient, experiment_id: str, parent_run_id: str, launch: str, downloads
) -> None:
    (configuration,) = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'")
    assert configuration.data.tags[CONFIGURATION_TAG] == f"{launch}-unet-c1"
    assert configuration.info.status == "FINISHED"
    for split in ("val", "test"):
        assert configuration.data.metrics[f"{split}/mean/dsc"] == pytest.approx(
            statistics.fmean(dsc(f, split) for f in FOLDS)
        )
        assert len(client.get_metric_history(configuration.info.run_id, f"{split}/mean/dsc")) == 1
    for fold in FOLDS:
        trial_id = f"{launch}_{fold}"
        (run,) = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'")
        assert run.data.tags[PARENT_RUN_TAG] == configuration.info.run_id
        assert run.info.run_name == f"{launch}-unet-c1-fold{fold}"
        assert run.info.status == "FINISHED"
        assert run.data.params == {
            "backbone": "unet", "fold": str(fold), "configuration": f"{launch}-unet-c1", "training.lr": "0.001"
        }
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted((point.step, point.value) for point in history) == [
            (epoch, pytest.approx(train_loss(fold, epoch))) for epoch in range(1, EPOCHS + 1)
        ]
        assert run.data.metrics["test/mean/dsc"] == pytest.approx(dsc(fold, "test"))
        assert {artifact.path for artifact in client.list_artifacts(run.info.run_id)} == {
            SCAN_METRICS_ARTIFACT, MODEL_DIR
        }
        weights = client.download_artifacts(run.info.run_id, f"{MODEL_DIR}/weights.pt", str(downloads / trial_id))
        with open(weights, "rb") as file:
            assert file.read() == trial_id.encode()


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_writes_held_during_an_outage_land_in_order_and_once_when_the_server_is_back(tmp_path, capsys):
    """Two launches share the server. Launch "kept": its driver lives through the outage and writes what it
    held at its next Tune step. Launch "restarted": its driver dies during the outage; a new one takes over
    with the state Tune saved and writes what the first one held at its first event."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        client = MlflowClient(uri)
        experiment_id = ensure_experiment(uri, EXPERIMENT, tmp_path / "unused")
        parents = {
            launch: client.create_run(experiment_id, run_name=launch, tags={STUDY_TAG: launch}).info.run_id
            for launch in ("kept", "restarted")
        }
        drivers = {
            launch: TrialRunsCallback(uri, EXPERIMENT, parents[launch], STRATEGIES, len(FOLDS), retry_interval_s=0.5)
            for launch in parents
        }
        trials = {launch: [fold_trial(launch, fold) for fold in FOLDS] for launch in parents}
        checkpoints = tmp_path / "checkpoints"

        for launch, driver in drivers.items():
            first, _ = trials[launch]
            driver.log_trial_start(first)
            for epoch in (1, 2):
                driver.log_trial_result(epoch, first, report(first, epoch, checkpoints))
            assert not driver.pending

        stop_server(server)
        for launch, driver in drivers.items():
            first, second = trials[launch]
            for epoch in (3, 4):
                promptly(driver.log_trial_result, epoch, first, report(first, epoch, checkpoints))
            promptly(driver.log_trial_end, first)
            promptly(driver.log_trial_start, second)
            for epoch in (1, 2):
                promptly(driver.log_trial_result, epoch, second, report(second, epoch, checkpoints))
            # Metrics of epochs 3 and 4, the final checkpoint, the first fold's end; the second fold's start and
            # its first two metrics.
            assert len(driver.pending) == 7
        outage_ms = int(time.time() * 1000)
        # What Tune's experiment checkpoint keeps of the dying driver.
        saved = pickle.loads(pickle.dumps(drivers.pop("restarted").get_state()))

        server = start_mlflow_server(tmp_path, port)
        time.sleep(0.5)  # the retry interval
        drivers["kept"].on_step_end(iteration=1, trials=trials["kept"])
        assert not drivers["kept"].pending
        drivers["restarted"] = TrialRunsCallback(
            uri, EXPERIMENT, parents["restarted"], STRATEGIES, len(FOLDS), retry_interval_s=0.5
        )
        drivers["restarted"].set_state(saved)
        # Tune restores its trials as new objects.
        trials["restarted"] = [fold_trial("restarted", fold) for fold in FOLDS]
        for launch, driver in drivers.items():
            _, second = trials[launch]
            for epoch in (3, 4):
                driver.log_trial_result(epoch, second, report(second, epoch, checkpoints))
                assert not driver.pending
            driver.log_trial_end(second)
            driver.on_experiment_end(trials[launch])
            assert not driver.pending

        for launch, parent in parents.items():
            assert_launch_recorded_once(client, experiment_id, parent, launch, tmp_path / "downloads")
            (first_fold,) = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{launch}_1'")
            assert first_fold.info.end_time <= outage_ms  # written late, with the time it happened
        output = capsys.readouterr().out
        assert f"MLflow: tracking store {uri} does not answer" in output
        assert f"MLflow: tracking store {uri} answers again" in output
    finally:
        stop_server(server)


@pytest.mark.timeout(60)
def test_at_the_end_the_driver_waits_a_bounded_time_then_names_the_store_and_what_was_not_logged(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    http_settings = {
        key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    callback = TrialRunsCallback(
        uri, EXPERIMENT, "launch-run-id", STRATEGIES, len(FOLDS), retry_interval_s=60, final_wait_s=2
    )
    trial = fold_trial("lost", 1)
    promptly(callback.log_trial_start, trial)
    for epoch in range(1, EPOCHS + 1):
        promptly(callback.log_trial_result, epoch, trial, report(trial, epoch, tmp_path))
    promptly(callback.log_trial_end, trial)
    assert len(callback.pending) == 1 + EPOCHS + 1 + 1

    began = time.monotonic()
    with pytest.raises(PendingWritesError) as caught:
        callback.on_experiment_end([trial])
    assert 2 <= time.monotonic() - began < 2 + CALL_BOUND_S
    message = str(caught.value)
    assert f"MLflow tracking store {uri} did not answer within 2 s" in message
    assert "7 writes were not logged: lost-unet-c1-fold1: start; lost-unet-c1-fold1: metrics of step 1;" in message
    assert f"lost-unet-c1-fold1: final checkpoint's files ({tmp_path / 'lost_1'})" in message
    assert "lost-unet-c1-fold1: end (FINISHED) and configuration summary." in message
    assert "msx launch --resume" in message
    # Kept for a resumed driver, in order; MLflow's own HTTP settings are the caller's again.
    assert pickle.loads(pickle.dumps(callback.get_state()))["pending"] == list(callback.pending)
    assert {key: os.environ.get(key) for key in http_settings} == http_settings
    assert "waiting up to 2 s for it to answer" in capsys.readouterr().out
