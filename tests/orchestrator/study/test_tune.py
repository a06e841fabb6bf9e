"""Real Tune runs on a local Ray: the configuration search and its scheduler with a cheap trainable, and the
MLflow record that real trials (Ray Train workers on a tiny synthetic cohort) leave through the tracking callback."""

import csv
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from ray import tune

from msx.models.checkpoint import WEIGHTS_FILE
from msx.models.data.folds import resolve_folds
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.engine import InferenceConfig
from msx.models.fold import MODEL_DIR, OVERLAY_DIR, RETENTION_CURVES_FILE
from msx.models.metrics import METRIC_NAMES, VOLUME_NAMES, mean_isbi_score
from msx.orchestrator.report.document import write_report
from msx.orchestrator.spec import spec_from_dict
from msx.orchestrator.study.configuration_search import ConfigurationScheduler, ConfigurationSearch
from msx.orchestrator.study.search import MODE, OPTIMISED_METRIC
from msx.orchestrator.tracking.callback import TrialRunsCallback
from msx.orchestrator.tracking.store import (
    CHECKPOINT_TAG,
    CONFIGURATION_TAG,
    FOLD_STD_SUFFIX,
    PARENT_RUN_TAG,
    SCAN_METRICS_ARTIFACT,
    STUDY_TAG,
    TRIAL_ID_TAG,
    ensure_experiment,
    log_study_start,
    tracking_uri_scope,
)
from msx.orchestrator.trial import LEARNING_RATE, STARTUP_PREFIX, TRAIN_LOSS
from msx.orchestrator.trials.startup import PHASES
from msx.orchestrator.trials.trainable import TRIAL_RESOURCES, run_trial
from tests.helpers import tiny_spec

pytestmark = pytest.mark.integration

EPOCHS = 4
# A "strong" and a "weak" backbone: the weak one's configurations are pruned at their first rung.
QUALITY = {"unet": 0.8, "segresnet": 0.2}


def fake_training(config):
    """Reports every epoch; resumes after a pause from the epoch its last checkpoint holds."""
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "epoch.json").read_text())
    for epoch in range(start + 1, EPOCHS + 1):
        score = QUALITY[config["backbone"]] + 0.01 * epoch * config["training.lr"] + 0.01 * config["fold"]
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "epoch.json").write_text(json.dumps(epoch))
            metrics = {"epoch": epoch, OPTIMISED_METRIC: score, "fold_epoch": f"{config['fold']}:{epoch}"}
            if epoch == EPOCHS:
                metrics["final"] = 1
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_configurations_wait_at_rungs_and_are_pruned_whole(local_ray, tmp_path):
    spec = spec_from_dict(
        {
            "name": "tune-test",
            "model": {"backbones": ["unet", "segresnet"]},
            "training": {"epochs": EPOCHS, "validate_every": 1},
            "search": {
                "configurations_per_backbone": 2,
                "parameters": [{"name": "training.lr", "low": 0.5, "high": 2.0, "initial": 1.0}],
                "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            },
        }
    )
    folds = resolve_folds("loso", range(1, 4))
    search = ConfigurationSearch(spec, folds, concurrency=2, snapshot=tmp_path / "search.json", echo=print)
    tuner = tune.Tuner(
        tune.with_resources(fake_training, TRIAL_RESOURCES),
        tune_config=tune.TuneConfig(
            metric=OPTIMISED_METRIC, mode=MODE, search_alg=search, scheduler=ConfigurationScheduler(),
            num_samples=4 * len(folds)
        ),
        run_config=tune.RunConfig(name="grid", storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors
    summary = search.summary()
    assert summary.finished
    status = {c.name: c.status for c in summary.configurations}
    assert status["unet-c1"] == "complete" and status["segresnet-c1"] == "complete"  # first at their rungs
    # Each backbone is its own Optuna study: the weaker backbone is judged against itself only.
    for backbone in ("unet", "segresnet"):
        trials = search.studies[backbone].trials
        assert [t.state.name for t in trials].count("COMPLETE") >= 1
        for trial in trials:
            if trial.state.name == "COMPLETE":
                configuration = f"{backbone}-c{trial.number + 1}"
                finals = [r.metrics[OPTIMISED_METRIC] for r in grid if r.config["configuration"] == configuration]
                assert trial.value == pytest.approx(statistics.fmean(finals)) and len(finals) == len(folds)
    # Every fold of a configuration saw the same epochs; a pruned configuration's folds stopped at its rung,
    # and a paused fold resumed from its checkpoint (no epoch reported twice).
    for configuration in status:
        results = [r for r in grid if r.config["configuration"] == configuration]
        epochs = {r.metrics["epoch"] for r in results}
        assert len(epochs) == 1, (configuration, epochs)
        histories = [r.metrics_dataframe["epoch"].tolist() for r in results]
        assert all(h == list(range(1, len(h) + 1)) for h in histories), histories
        if status[configuration] == "pruned":
            (rung,) = {c.last_rung for c in summary.configurations if c.name == configuration}
            assert epochs == {rung}
    # The second configuration of a backbone is judged against its first, on the mean over folds: the search's
    # fake score grows with the learning rate, so a smaller one is pruned at the first rung and a larger one is not.
    for backbone in ("unet", "segresnet"):
        second = next(c for c in summary.configurations if c.name == f"{backbone}-c2")
        expected = "pruned" if second.searched["training.lr"] < 1.0 else "complete"
        assert second.status == expected, second
        if expected == "pruned":
            assert second.last_rung == 1 and search.studies[backbone].trials[1].state.name == "PRUNED"
    assert summary.pauses > 0 and summary.resumes > 0


# Two configurations of one backbone x two folds of three synthetic patients; every size as small as runs, but for
# three epochs validated at 2 and 3: the worker reports at those only, and epoch 1 rides with epoch 2's report.
TRACKED_EPOCHS = 3
TRACKED_SPEC = tiny_spec(
    "tracked",
    training={"epochs": TRACKED_EPOCHS, "validate_every": 2},
    data={
        "modalities": ["flair", "t2"],
        "folds": [{"train": [1], "validation": [2], "test": [3]}, {"train": [2], "validation": [3], "test": [1]}],
    },
    inference={"strategies": ["mean", "last"]},
    search={
        "configurations_per_backbone": 2,
        "parameters": [{"name": "training.lr", "low": 1.0e-3, "high": 4.0e-3}],
        "scheduler": {"name": "fifo"},
    },
)


def slow_fake_training(config):
    time.sleep(1.0)  # per epoch: the time budget ends while configurations train
    fake_training(config)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_spent_time_budget_stops_the_search_but_lets_one_configuration_finish(local_ray, tmp_path):
    spec = spec_from_dict(
        {
            "name": "budget",
            "model": {"backbones": ["unet"]},
            "training": {"epochs": EPOCHS, "validate_every": 1},
            "search": {
                "configurations_per_backbone": 6,
                "parameters": [{"name": "training.lr", "low": 0.5, "high": 2.0, "initial": 1.0}],
                "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
                "time_budget_s": 5,
            },
        }
    )
    folds = resolve_folds("loso", range(1, 4))
    search = ConfigurationSearch(spec, folds, concurrency=2, echo=print)
    grid = tune.Tuner(
        tune.with_resources(slow_fake_training, TRIAL_RESOURCES),
        tune_config=tune.TuneConfig(
            metric=OPTIMISED_METRIC, mode=MODE, search_alg=search, scheduler=ConfigurationScheduler(),
            num_samples=6 * len(folds)
        ),
        run_config=tune.RunConfig(name="budget", storage_path=str(tmp_path), verbose=0),
    ).fit()
    assert not grid.errors
    summary = search.summary()
    assert summary.cut_short and summary.finished
    (complete,) = [c for c in summary.configurations if c.status == "complete"]
    assert {c.status for c in summary.configurations} <= {"complete", "pruned", "cut short"}
    assert len(summary.configurations) < 6  # no configuration opened after the budget
    finished = [r for r in grid if r.config["configuration"] == complete.name]
    assert len(finished) == len(folds) and all(r.metrics.get("final") for r in finished)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_trial_whose_workers_cannot_start_in_time_fails_saying_so(local_ray, tmp_path):
    write_synthetic_cohort(tmp_path / "cohort", patients=3, shape=(32, 36, 32))
    spec = spec_from_dict(
        {**TRACKED_SPEC, "name": "no-room", "resources": {"worker_start_timeout_s": 5, "max_failures": 0}}
    )
    folds = resolve_folds(spec.data.folds, (1, 2, 3))
    # Something else holds both CPUs: the cluster could host the trial's worker, but has no room now.
    holder = local_ray.util.placement_group([{"CPU": 2}])
    local_ray.get(holder.ready(), timeout=60)
    try:
        trainable = tune.with_parameters(
            run_trial, spec=spec.to_dict(), data_root=str(tmp_path / "cohort"), storage_path=str(tmp_path / "train")
        )
        grid = tune.Tuner(
            tune.with_resources(trainable, TRIAL_RESOURCES),
            tune_config=tune.TuneConfig(
                metric=OPTIMISED_METRIC, mode=MODE, search_alg=ConfigurationSearch(spec, folds[:1], concurrency=1),
                scheduler=ConfigurationScheduler(), num_samples=1,
            ),
            run_config=tune.RunConfig(name="no-room", storage_path=str(tmp_path / "tune"), verbose=0),
        ).fit()
    finally:
        local_ray.util.remove_placement_group(holder)
    (error,) = grid.errors
    assert "did not start within resources.worker_start_timeout_s = 5 s" in str(error)


@pytest.fixture(scope="module")
def tracked_launch(local_ray, tmp_path_factory):
    """A launch's MLflow record as run_study writes it, from real trials: (client, launch run id, cohort, folds,
    store)."""
    root = tmp_path_factory.mktemp("tracked")
    spec = spec_from_dict(TRACKED_SPEC)
    write_synthetic_cohort(root / "cohort", patients=3, shape=(32, 36, 32))
    cohort = open_cohort(root / "cohort", spec.data.modalities, spec.data.rater)
    folds = resolve_folds(spec.data.folds, cohort.patients)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, spec.name, root / "mlartifacts")
    launch_id = (
        client.create_run(experiment_id, run_name="tracked-launch", tags={STUDY_TAG: "tracked-launch"}).info.run_id
    )
    log_study_start(launch_id, tracking_uri, spec.to_dict(), str(cohort.root))
    trainable = tune.with_parameters(
        run_trial, spec=spec.to_dict(), data_root=str(cohort.root), storage_path=str(root / "train")
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_RESOURCES),
        tune_config=tune.TuneConfig(
            metric=OPTIMISED_METRIC,
            mode=MODE,
            search_alg=ConfigurationSearch(spec, folds, concurrency=2),
            scheduler=ConfigurationScheduler(),
            num_samples=2 * len(folds),
        ),
        run_config=tune.RunConfig(
            name="tracked",
            storage_path=str(root / "tune"),
            callbacks=[TrialRunsCallback(tracking_uri, spec.name, launch_id, spec.inference.strategies, len(folds))],
            verbose=0,
        ),
    )
    with tracking_uri_scope(tracking_uri):
        grid = tuner.fit()
    assert not grid.errors
    client.set_terminated(launch_id, "FINISHED")
    return client, launch_id, cohort, folds, root


def runs_under(client, run_id):
    return client.search_runs(
        [client.get_run(run_id).info.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{run_id}'"
    )


@pytest.mark.timeout(900)
def test_launch_run_holds_configuration_runs_that_hold_one_fold_run_per_trial(tracked_launch):
    client, launch_id, _, folds, _ = tracked_launch
    experiment_id = client.get_run(launch_id).info.experiment_id
    assert len(client.search_runs([experiment_id])) == 1 + 2 + 2 * len(folds)
    configurations = runs_under(client, launch_id)
    assert sorted(run.info.run_name for run in configurations) == ["basic-unet-c1", "basic-unet-c2"]
    for configuration in configurations:
        name = configuration.info.run_name
        assert configuration.data.tags[CONFIGURATION_TAG] == name
        assert configuration.info.status == "FINISHED"
        assert {"backbone", "configuration", "training.lr"} <= set(configuration.data.params)
        assert "fold" not in configuration.data.params
        fold_runs = runs_under(client, configuration.info.run_id)
        assert sorted(run.info.run_name for run in fold_runs) == [f"{name}-fold{fold.index}" for fold in folds]
        assert len({run.data.tags[TRIAL_ID_TAG] for run in fold_runs}) == len(folds)
        for fold_run in fold_runs:
            assert fold_run.info.status == "FINISHED"
            assert fold_run.data.params["training.lr"] == configuration.data.params["training.lr"]
            # A point per epoch in MLflow's curves, each at its own epoch, though only validations were reported.
            for curve in (TRAIN_LOSS, LEARNING_RATE):
                history = client.get_metric_history(fold_run.info.run_id, curve)
                assert sorted(point.step for point in history) == list(range(1, TRACKED_EPOCHS + 1)), curve
            # The first report carried the trial's start-up, phase by phase, in order.
            startup = [fold_run.data.metrics[f"{STARTUP_PREFIX}{phase}_s"] for phase in PHASES]
            assert startup[0] > 0 and startup == sorted(startup)
        # The summary: mean and (population) std over the folds of every split metric that has a value.
        for split in ("val", "test"):
            for strategy in TRACKED_SPEC["inference"]["strategies"]:
                key = f"{split}/{strategy}/dsc"
                per_fold = [run.data.metrics[key] for run in fold_runs]
                assert configuration.data.metrics[key] == pytest.approx(statistics.fmean(per_fold))
                assert configuration.data.metrics[key + FOLD_STD_SUFFIX] == pytest.approx(statistics.pstdev(per_fold))


@pytest.mark.timeout(900)
def test_fold_runs_carry_scan_metrics_model_and_overlays(tracked_launch, tmp_path):
    client, launch_id, cohort, folds, root = tracked_launch
    strategies = TRACKED_SPEC["inference"]["strategies"]
    for configuration in runs_under(client, launch_id):
        for fold_run in runs_under(client, configuration.info.run_id):
            run_id = fold_run.info.run_id
            fold = next(f for f in folds if fold_run.info.run_name.endswith(f"-fold{f.index}"))
            assert fold_run.data.tags[CHECKPOINT_TAG].startswith(str(root / "train"))
            artifacts = {a.path for a in client.list_artifacts(run_id)}
            assert artifacts == {SCAN_METRICS_ARTIFACT, RETENTION_CURVES_FILE, MODEL_DIR, OVERLAY_DIR}
            assert f"{MODEL_DIR}/{WEIGHTS_FILE}" in {a.path for a in client.list_artifacts(run_id, MODEL_DIR)}

            table = client.download_artifacts(run_id, SCAN_METRICS_ARTIFACT, str(tmp_path / run_id))
            with open(table, newline="") as file:
                reader = csv.DictReader(file)
                shifts = [
                    "ndsc", "lesion_f1", *(f"r_aac_{m}" for m in (*InferenceConfig.uncertainty_measures, "random"))
                ]
                assert reader.fieldnames == [
                    "protocol", "split", "scan", "strategy", *METRIC_NAMES, *VOLUME_NAMES, *shifts
                ]
                rows = list(reader)
            assert {row["protocol"] for row in rows} == {"msx"}  # the study's protocol, none compared
            # A retention curve per scan, strategy and uncertainty measure (and the random order).
            curves = client.download_artifacts(run_id, RETENTION_CURVES_FILE, str(tmp_path / run_id))
            with open(curves) as file:
                retention = json.load(file)
            assert len(retention["curves"]) == len(rows) * (len(InferenceConfig.uncertainty_measures) + 1)
            scans = {"val": cohort.scans_of(fold.validation), "test": cohort.scans_of(fold.test)}
            assert sorted((row["split"], row["scan"], row["strategy"]) for row in rows) == sorted(
                (split, scan.scan_id, strategy) for split, split_scans in scans.items() for scan in split_scans
                for strategy in strategies
            )
            # The fold's ISBI score is its CSV's, the volume correlation over the split's scans (a NaN is not logged).
            for split in scans:
                for strategy in strategies:
                    per_scan = [
                        {
                            key: float(value) for key, value in row.items()
                            if key not in ("protocol", "split", "scan", "strategy")
                        }
                        for row in rows
                        if (row["split"], row["strategy"]) == (split, strategy)
                    ]
                    logged = fold_run.data.metrics.get(f"{split}/{strategy}/isbi", math.nan)
                    assert logged == pytest.approx(mean_isbi_score(per_scan), nan_ok=True)

            overlays = {a.path for a in client.list_artifacts(run_id, OVERLAY_DIR)}
            assert overlays == {
                f"{OVERLAY_DIR}/{split}-{split_scans[0].scan_id}-mean.png" for split, split_scans in scans.items()
            }
            for overlay in overlays:
                with Image.open(client.download_artifacts(run_id, overlay, str(tmp_path / run_id))) as image:
                    image.verify()
                    assert image.format == "PNG" and min(image.size) >= 100


@pytest.mark.timeout(900)
def test_report_reads_fold_runs_and_shows_their_overlays(tracked_launch, tmp_path):
    client, _, _, _, _ = tracked_launch
    files = write_report(client.tracking_uri, TRACKED_SPEC["name"], tmp_path / "report")
    assert len(files.record.trials) == 4 and all(trial.outcome is not None for trial in files.record.trials)
    markdown = files.markdown.read_text()
    assert "## Example overlays" in markdown
    overlays = [path for path in files.figures if path.name.endswith("-mean.png")]
    assert len(overlays) == 2 and all(
        f"]({path.relative_to(tmp_path / 'report').as_posix()})" in markdown for path in overlays
    )
