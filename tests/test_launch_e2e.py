"""`msx launch` end to end on the smoke space: local Ray, synthetic cohort, SQLite MLflow, registry."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from msx.models.data.baseline import flair_threshold_baseline
from msx.models.data.cohort import find_isbi_cohort, load_scan
from msx.models.metrics import SPLIT_METRIC_NAMES
from msx.orchestrator.spec import load_spec

pytestmark = pytest.mark.slow

# What Ray, Tune and MLflow say that a researcher's console should not show (they go to the launch's log file).
CHATTER = (
    "Started a local Ray instance", "Token authentication is", "process_trial_result", "Configuration for experiment",
    "TensorBoard", "(raylet)", "Creating initial MLflow database tables",
)


def user_environment() -> dict[str, str]:
    """The environment a user's shell would have: no tracking URI or Ray address left by other tests."""
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("launch")
    result = subprocess.run(
        [sys.executable, "-m", "msx.orchestrator.cli", "launch", "--space", "smoke", "--storage", "runs"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=1500,
        env=user_environment(),
    )
    print(result.stdout[-6000:])
    print(result.stderr[-6000:], file=sys.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in CHATTER if line in result.stderr] == [], result.stderr[-3000:]
    return workdir, result.stdout


def test_prints_progress_table_selection_and_where_to_look(smoke_study):
    _, stdout = smoke_study
    spec = load_spec("smoke")
    assert "trials 10/10 done, 0 running, 0 failed" in stdout
    assert "best validation Dice" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("backbone"))
    assert header.split() == ["backbone", "strategy", *[m.upper() for m in SPLIT_METRIC_NAMES]]
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] in (["unet"], ["segresnet"])]
    assert {(r[0], r[1]) for r in rows} == {(b, s) for b in spec.model.backbones for s in spec.inference.strategies}
    assert "registered model: models:/msx-smoke@champion" in stdout
    assert "selected on validation patients:" in stdout
    assert "http://127.0.0.1:5000" in stdout
    assert "Ray dashboard:  http://127.0.0.1:" in stdout
    assert "the dashboard asks for Ray's token: paste the output of `ray get-auth-token`" in stdout


def test_the_console_shows_msx_and_the_rest_is_in_the_launch_log(smoke_study):
    workdir, stdout = smoke_study
    assert [line for line in CHATTER if line in stdout] == []
    (log,) = (workdir / "runs" / "logs").glob("launch-*.log")
    assert f"Ray, Tune and MLflow messages: {log} (--verbose shows them here)" in stdout
    logged = log.read_text()
    # A fresh store: MLflow said so, into the log; msx's own lines are there too, for context.
    assert "Creating initial MLflow database tables" in logged and "[msx] study 'smoke'" in logged


def test_mlflow_has_a_launch_run_with_a_run_per_configuration_and_a_run_per_trial(smoke_study):
    workdir, _ = smoke_study
    client = MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    launches = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(launches) == 1
    configurations = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == launches[0].info.run_id]
    configuration_ids = {r.info.run_id for r in configurations}
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in configuration_ids]
    assert len(configurations) == 2 and len(folds) == 10 and len(runs) == 13
    spec = load_spec("smoke")
    assert launches[0].data.params["training.epochs"] == str(spec.training.epochs)
    # The paper U-Net's own recipe is part of the recorded spec.
    assert launches[0].data.params["recipes.unet.training.epochs"] == str(spec.for_backbone("unet").training.epochs)
    for configuration in configurations:
        assert configuration.info.status == "FINISHED"
        assert {"backbone", "configuration", "training.weight_decay"} <= set(configuration.data.params)
        for strategy in spec.inference.strategies:
            assert f"test/{strategy}/dsc" in configuration.data.metrics  # mean over folds
            assert f"test/{strategy}/dsc_std" in configuration.data.metrics
            # The Shifts scores of the masks under each uncertainty measure of the sampled chains, and a random order.
            for measure in (*spec.inference.uncertainty_measures, "random"):
                assert 0 <= configuration.data.metrics[f"test/{strategy}/r_aac_{measure}"] <= 1
    for fold in folds:
        assert fold.info.status == "FINISHED"
        assert {"backbone", "fold", "training.weight_decay"} <= set(fold.data.params)
        for split in ("val", "test"):
            for strategy in spec.inference.strategies:
                assert f"{split}/{strategy}/dsc" in fold.data.metrics
                # The same weights scored again on the test patients under the compared protocol.
                for protocol in spec.inference.compare_protocols:
                    assert (f"{protocol}/{split}/{strategy}/dsc" in fold.data.metrics) == (split == "test")
        history = client.get_metric_history(fold.info.run_id, "train_loss")
        assert len(history) == spec.for_backbone(fold.data.params["backbone"]).training.epochs  # one point per epoch
        # Where the fold's time went: training, validation, and the final evaluation under each protocol.
        phases = ("training", "validation", "evaluation_msx", "evaluation_reference")
        assert all(fold.data.metrics[f"seconds/{phase}"] > 0 for phase in phases), fold.data.metrics
        artifacts = {a.path for a in client.list_artifacts(fold.info.run_id)}
        assert {"scan_metrics.csv", "retention_curves.json", "model", "overlays"} <= artifacts
        assert len(client.list_artifacts(fold.info.run_id, "overlays")) == 2


def test_champion_is_registered_and_learned_something(smoke_study):
    workdir, _ = smoke_study
    client = MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("msx-smoke", "champion")
    assert version.tags["strategy"] in load_spec("smoke").inference.strategies
    assert float(version.tags["validation_dsc"]) > 0.3
    assert "test_dsc" in version.tags
    shown = subprocess.run(
        [sys.executable, "-m", "msx.orchestrator.cli", "registry", "show", "msx-smoke@champion", "--storage", "runs"],
        cwd=workdir, capture_output=True, text=True, timeout=120, env=user_environment(),
    )
    assert shown.returncode == 0, shown.stderr
    assert "model    msx-smoke version 1" in shown.stdout
    assert "champion" in shown.stdout


@pytest.fixture(scope="module")
def flair_threshold_dice(smoke_study) -> float:
    """The smoke cohort's best single FLAIR threshold's mean Dice: what a model must beat to have learned anything
    (the synthetic cohort defeats one threshold, docs/SYNTHETIC.md)."""
    workdir, _ = smoke_study
    (root,) = (workdir / "runs" / "data").glob("synthetic-*")
    scans = (load_scan(scan, ("flair",), rater=1) for scan in find_isbi_cohort(root, modalities=("flair",)).scans)
    baseline = flair_threshold_baseline((loaded.image[0], loaded.mask) for loaded in scans)
    assert baseline.mean_dice < 0.65
    return baseline.mean_dice


def test_the_champion_beats_a_flair_threshold_clearly(smoke_study, flair_threshold_dice):
    workdir, _ = smoke_study
    client = MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    test_dsc = float(client.get_model_version_by_alias("msx-smoke", "champion").tags["test_dsc"].split(" ± ")[0])
    assert test_dsc > flair_threshold_dice + 0.1, (test_dsc, flair_threshold_dice)


def test_both_backbones_learn_the_paper_unet_under_its_own_recipe(smoke_study, flair_threshold_dice):
    """Each backbone's test DSC (mean over folds, msx's protocol) at the strategy its validation patients chose: the
    paper's U-Net, under its smoke recipe, beats the threshold by 0.05; SegResNet, under the study's, by 0.1."""
    workdir, _ = smoke_study
    spec = load_spec("smoke")
    client = MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    for backbone, margin in (("unet", 0.05), ("segresnet", 0.1)):
        (run,) = client.search_runs(
            [experiment.experiment_id], f"tags.`msx.configuration` = '{backbone}-c1'", max_results=2
        )
        metrics = run.data.metrics
        chosen = max(spec.inference.strategies, key=lambda strategy: metrics[f"val/{strategy}/dsc"])
        assert metrics[f"test/{chosen}/dsc"] >= flair_threshold_dice + margin, (
            backbone, chosen, metrics[f"test/{chosen}/dsc"]
        )


def test_status_and_a_second_launch_after_the_study_finished(smoke_study):
    workdir, _ = smoke_study
    status = subprocess.run(
        [sys.executable, "-m", "msx.orchestrator.cli", "status", "--storage", "runs"],
        cwd=workdir, capture_output=True, text=True, timeout=120, env=user_environment(),
    )
    assert status.returncode == 0, status.stderr
    assert "(experiment smoke)" in status.stdout and "finished at" in status.stdout
    assert "trials: 10/10 done, 0 running, 0 failed, 0 pending" in status.stdout
    # A finished study is not resumed: asking for it says so, before any work.
    again = subprocess.run(
        [sys.executable, "-m", "msx.orchestrator.cli", "launch", "--resume", "smoke", "--storage", "runs"],
        cwd=workdir, capture_output=True, text=True, timeout=120, env=user_environment(),
    )
    assert again.returncode == 1
    assert "already ended (finished); there is nothing to resume" in again.stderr
