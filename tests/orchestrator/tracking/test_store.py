"""Several drivers writing to one default (SQLite) MLflow store at the same time lose nothing.

Eight OS processes, each a launch as run_study makes it: its launch run, then its TrialRunsCallback fed real
Tune `Trial` objects (two folds interleaved, a report per epoch, a final report with a checkpoint), all in one
experiment of one `sqlite:///.../mlflow.db`, started together.
"""

import json
import multiprocessing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from msx.models.fold import MODEL_DIR, SCAN_METRICS_FILE
from msx.orchestrator.tracking.callback import TrialRunsCallback
from msx.orchestrator.tracking.store import (
    CONFIGURATION_TAG,
    PARENT_RUN_TAG,
    SCAN_METRICS_ARTIFACT,
    STUDY_TAG,
    TRIAL_ID_TAG,
    ensure_experiment,
)

EXPERIMENT = "concurrent"
WRITERS = 8
FOLDS = (1, 2)
EPOCHS = 30
STRATEGIES = ("mean",)


def train_loss(writer: int, fold: int, epoch: int) -> float:
    return 1.0 / epoch + 0.01 * writer + 0.001 * fold


def scan_rows(writer: int, fold: int) -> list[dict]:
    return [
        {"split": split, "scan": f"w{writer}-f{fold}-{split}", "strategy": "mean", "dsc": 0.5 + 0.01 * writer}
        for split in ("val", "test")
    ]


def write_launch(tracking_uri: str, experiment_id: str, writer: int, storage: str, start) -> None:
    """One driver: a launch run, then every Tune event of its trials through the tracking callback."""
    client = MlflowClient(tracking_uri)
    start.wait()
    launch = f"launch-{writer}"
    parent = client.create_run(experiment_id, run_name=launch, tags={STUDY_TAG: launch}).info.run_id
    callback = TrialRunsCallback(
        tracking_uri, EXPERIMENT, parent, STRATEGIES, len(FOLDS), retry_interval_s=0.5, final_wait_s=30
    )
    trials = [
        Trial(
            "msx",
            config={
                "backbone": "unet", "fold": fold, "configuration": f"w{writer}-unet-c1", "training.lr": 1e-3 * writer
            },
            trial_id=f"w{writer}_{fold}",
            stub=True,
        )
        for fold in FOLDS
    ]
    for trial in trials:
        callback.log_trial_start(trial)
    for epoch in range(1, EPOCHS + 1):
        for trial in trials:
            fold = trial.config["fold"]
            report = {"epoch": epoch, "train_loss": train_loss(writer, fold, epoch), "training_iteration": epoch}
            if epoch == EPOCHS:
                checkpoint = Path(storage) / "checkpoints" / trial.trial_id
                (checkpoint / MODEL_DIR).mkdir(parents=True)
                (checkpoint / MODEL_DIR / "weights.pt").write_bytes(bytes([writer, fold]) * 1000)
                rows = scan_rows(writer, fold)
                (checkpoint / SCAN_METRICS_FILE).write_text(json.dumps(rows))
                report.update(
                    {f"{row['split']}/mean/dsc": row["dsc"] for row in rows}, final=1, checkpoint_path=str(checkpoint)
                )
            callback.log_trial_result(epoch, trial, report)
    for trial in trials:
        callback.log_trial_end(trial)
    callback.on_experiment_end(trials)
    assert not callback.pending
    client.set_terminated(parent, "FINISHED")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_parallel_drivers_on_one_sqlite_store_lose_no_run_metric_or_artifact(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # As a launch does before Ray starts: the store and the experiment exist before anyone writes.
    experiment_id = ensure_experiment(tracking_uri, EXPERIMENT, tmp_path / "mlartifacts")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WRITERS)
    writers = [
        context.Process(target=write_launch, args=(tracking_uri, experiment_id, writer, str(tmp_path), start))
        for writer in range(WRITERS)
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=150)
    assert [process.exitcode for process in writers] == [0] * WRITERS

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], max_results=1000)
    assert len(runs) == WRITERS * (1 + 1 + len(FOLDS))
    by_id = {run.info.run_id: run for run in runs}
    launches = {run.data.tags[STUDY_TAG]: run for run in runs if STUDY_TAG in run.data.tags}
    assert sorted(launches) == sorted(f"launch-{writer}" for writer in range(WRITERS))
    configurations = [run for run in runs if CONFIGURATION_TAG in run.data.tags]
    assert len(configurations) == WRITERS
    for configuration in configurations:
        writer = int(configuration.data.tags[CONFIGURATION_TAG].split("-")[0][1:])
        assert by_id[configuration.data.tags[PARENT_RUN_TAG]].data.tags[STUDY_TAG] == f"launch-{writer}"
        assert configuration.info.status == "FINISHED"
        assert configuration.data.metrics["test/mean/dsc"] == pytest.approx(0.5 + 0.01 * writer)

    folds = {run.data.tags[TRIAL_ID_TAG]: run for run in runs if TRIAL_ID_TAG in run.data.tags}
    assert sorted(folds) == sorted(f"w{writer}_{fold}" for writer in range(WRITERS) for fold in FOLDS)
    for trial_id, run in folds.items():
        writer, fold = (int(part) for part in trial_id[1:].split("_"))
        assert run.info.status == "FINISHED"
        assert by_id[run.data.tags[PARENT_RUN_TAG]].data.tags[CONFIGURATION_TAG] == f"w{writer}-unet-c1"
        assert run.data.params == {
            "backbone": "unet", "fold": str(fold), "configuration": f"w{writer}-unet-c1",
            "training.lr": str(1e-3 * writer)
        }
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted((point.step, point.value) for point in history) == [
            (epoch, pytest.approx(train_loss(writer, fold, epoch))) for epoch in range(1, EPOCHS + 1)
        ]
        assert run.data.metrics["val/mean/dsc"] == pytest.approx(0.5 + 0.01 * writer)
        artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
        assert artifacts == {SCAN_METRICS_ARTIFACT, MODEL_DIR}
        weights = client.download_artifacts(
            run.info.run_id, f"{MODEL_DIR}/weights.pt", str(tmp_path / "downloads" / trial_id)
        )
        with open(weights, "rb") as file:
            assert file.read() == bytes([writer, fold]) * 1000
