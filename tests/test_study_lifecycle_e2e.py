"""A study always ends with an answer or can be continued: `msx launch` as a user runs it (subprocesses),
on the shared local Ray, with real trials on tiny synthetic cohorts.

- early stopping by configuration: a 3-patient leave-one-subject-out search of 3 configurations, stopped by
  SIGINT exactly while a fold's rung report is on its way (its worker held there by a test hook), after a
  configuration was pruned; resumed, and ending with a champion finished on every fold; Optuna's trials PRUNED or
  COMPLETE with the full-fold mean; no pruned fold trained past its rung; every fold's epochs in MLflow once each,
  the held one's rung included; every rung judged on its folds' scores at that rung;
- a GPU asked of this GPU-less machine: refused in one line before any trial;
- two studies at once on the machine's one local Ray, checked against the same rules: a CPU-sized copy of the
  bundled `hpo` space, and the search that used to hang (the paper U-Net, every pause slower than an epoch): both
  champions, and the Ray stops when the last one ends.

The whole module runs inside one hold of the Ray lock on shared machines (its two studies run at once).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from msx.models.data.folds import resolve_folds
from msx.orchestrator.cluster import local_ray
from msx.orchestrator.spec import load_spec, spec_from_dict
from msx.orchestrator.study.configuration_search import PAUSE_DELAY_VARIABLE, ConfigurationSearch
from msx.orchestrator.study.search_record import read_summary
from msx.orchestrator.study.state import studies_of
from msx.orchestrator.tracking.store import CONFIGURATION_TAG, child_runs
from msx.orchestrator.trial import BEST_VALIDATION_DICE, EPOCH
from msx.orchestrator.trials.rung_gate import HOLD_AT_RUNGS_VARIABLE

pytestmark = pytest.mark.slow

MSX = [sys.executable, "-m", "msx.orchestrator.cli"]

TINY = {
    "model": {"backbones": ["basic-unet"], "width": 0.125},
    "training": {
        "epochs": 6, "batch_size": 2, "patch_size": [32, 32, 32], "lr": 3.0e-3, "validate_every": 2,
        "validation_ddim_steps": 2, "validation_strategy": "mean",
    },
    "inference": {"strategies": ["mean", "majority"], "ddim_steps": 2, "samples": 1, "overlap": 0.0},
    "resources": {"workers_per_trial": 1, "use_gpu": False, "cpus_per_worker": 1},
}

# The search that used to end with nothing registered: 3 patients, loso, one backbone, 3 configurations,
# successive halving with grace 2 and reduction factor 2 over 6 epochs. Learning rates drawn below the
# initial 3e-3 barely learn in 2 epochs, so the later configurations are pruned at their first rung.
PRUNED_SEARCH = {
    "name": "prune3",
    "data": {
        "modalities": ["flair", "mprage", "t2"], "folds": "loso",
        "synthetic": {"patients": 3, "shape": [40, 48, 40], "seed": 0}
    },
    **TINY,
    "search": {
        "searcher": "optuna",
        "configurations_per_backbone": 3,
        "parameters": [
            {"name": "training.lr", "distribution": "loguniform", "low": 1.0e-6, "high": 3.0e-3, "initial": 3.0e-3}
        ],
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
    },
    "registry": {"model_name": "msx-prune3"},
}

# The search that hung (issue 23): the paper U-Net on a 3-patient cohort, 3 configurations, successive halving with
# grace 2 and reduction factor 2 over 6 epochs. On a loaded machine a pause took longer than an epoch: a fold went on
# past its rung before its pause, unreported, and its configuration's other folds waited for it for ever. The test
# makes every pause that slow (PAUSE_DELAY_VARIABLE); the rung gate keeps the folds at their rungs meanwhile.
SLOW_PAUSE_SEARCH = {
    "name": "hang",
    "data": {"modalities": ["flair", "mprage", "t2"], "rater": 1, "folds": "loso",
             "synthetic": {"patients": 3, "shape": [40, 48, 40], "seed": 4}},
    "model": {"backbones": ["unet"], "width": 0.125},
    "training": {"epochs": 6, "batch_size": 2, "patch_size": [32, 32, 32], "lr": 2.0e-3, "validate_every": 2,
                 "validation_ddim_steps": 2},
    "inference": {"strategies": ["mean"], "ddim_steps": 2, "samples": 1, "overlap": 0.25},
    "resources": {"workers_per_trial": 1, "use_gpu": False, "cpus_per_worker": 1},
    "search": {
        "searcher": "optuna",
        "configurations_per_backbone": 3,
        "parameters": [{"name": "training.lr", "distribution": "loguniform", "low": 1.0e-4, "high": 1.0e-2}],
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
    },
    "registry": {"model_name": "msx-hang"},
}


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """A user's shell, with this module's own folder for the local Ray's lock, record and leases."""
    folder = tmp_path_factory.mktemp("local-ray")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["MSX_LOCAL_RAY_DIR"] = str(folder)
    yield env
    os.environ["MSX_LOCAL_RAY_DIR"] = str(folder)
    try:
        assert local_ray.running_local_ray() is None, "a study left the local Ray running"
    finally:
        local_ray.stop()  # whatever a failed test left behind
        del os.environ["MSX_LOCAL_RAY_DIR"]


def write_space(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def launch(folder: Path, env: dict, *args: str) -> subprocess.Popen:
    """`msx launch ARGS` in `folder`, its output to launch-N.out."""
    number = len(list(folder.glob("launch-*.out")))
    # The child writes to its own copy of the file descriptor: this process's can be closed once it has started.
    with open(folder / f"launch-{number}.out", "w") as output:
        return subprocess.Popen(
            [*MSX, "launch", *args], cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT, text=True
        )


def output_of(folder: Path, number: int) -> str:
    text = (folder / f"launch-{number}.out").read_text()
    print(f"--- launch {number} ---\n{text[-8000:]}")
    return text


def study_search(storage: Path, experiment: str):
    (state,) = studies_of(storage, experiment)
    return state, read_summary(storage / experiment / "studies" / f"{state.study}.search.json")


def restored_optuna_studies(storage: Path, state, spec, patients) -> dict:
    """Each backbone's Optuna study, as the searcher Tune saved it with the experiment."""
    search = ConfigurationSearch(spec, resolve_folds(spec.data.folds, patients), concurrency=1, echo=lambda _: None)
    search.restore_from_dir(str(state.tune_path(storage)))
    return search.studies


def fold_runs(client: MlflowClient, experiment_id: str, launch_run_id: str) -> dict[str, list]:
    return {
        run.data.tags[CONFIGURATION_TAG]: child_runs(client, experiment_id, run.info.run_id)
        for run in child_runs(client, experiment_id, launch_run_id)
    }


def check_search_invariants(storage: Path, spec, patients: tuple[int, ...], folds: int) -> None:
    """The rules of early stopping by configuration, read from the study's own records."""
    state, summary = study_search(storage, spec.name)
    client = MlflowClient(state.tracking_uri)
    runs = fold_runs(client, state.experiment_id, state.parent_run_id)
    studies = restored_optuna_studies(storage, state, spec, patients)
    assert summary.finished and summary.count("complete") >= 1
    for configuration in summary.configurations:
        trial = studies[configuration.backbone].trials[int(configuration.name.rsplit("-c", 1)[1]) - 1]
        assert trial.params == configuration.searched
        folds_of = runs[configuration.name]
        assert len(folds_of) == folds
        epochs_logged = [
            [m.step for m in client.get_metric_history(run.info.run_id, EPOCH)] for run in folds_of
        ]
        # Each epoch reached MLflow once, replayed reports (of runs resumed at a checkpoint) included.
        assert all(len(epochs) == len(set(epochs)) for epochs in epochs_logged), epochs_logged
        # Each rung was judged on its folds' scores at that rung: the checkpoint, the report and the rung agree.
        for rung, mean in configuration.rung_means.items():
            scores = [
                next(
                    m.value for m in client.get_metric_history(run.info.run_id, BEST_VALIDATION_DICE) if m.step == rung
                )
                for run in folds_of
            ]
            assert mean == pytest.approx(statistics.fmean(scores)), (configuration.name, rung, scores)
        if configuration.status == "complete":
            finals = [client.get_run(run.info.run_id).data.metrics["val_dice"] for run in folds_of]
            assert trial.state.name == "COMPLETE"
            assert trial.value == pytest.approx(statistics.fmean(finals))  # the full-fold mean
            assert all(
                max(epochs) == spec.for_backbone(configuration.backbone).training.epochs for epochs in epochs_logged
            )
        elif configuration.status == "pruned":
            rung = configuration.last_rung
            assert trial.state.name == "PRUNED"
            assert trial.intermediate_values[rung] == pytest.approx(configuration.rung_means[rung])
            # Every fold reached the rung, and none reported an epoch past it: none trained on alone.
            assert all(max(epochs) == rung for epochs in epochs_logged), epochs_logged
            assert client.get_run(runs[configuration.name][0].data.tags["mlflow.parentRunId"]).data.tags[
                "msx.configuration_status"
            ] == "pruned"
    version = client.get_model_version_by_alias(spec.registry.model_name, "champion")
    chosen = client.get_run(version.run_id).data.tags["msx.selected_configuration"]
    assert next(c for c in summary.configurations if c.name == chosen).status == "complete"


@pytest.mark.timeout(1800)
def test_a_pruning_search_interrupted_while_a_rung_report_is_on_its_way_resumes_to_a_champion(tmp_path, environment):
    space = write_space(tmp_path, PRUNED_SEARCH)
    storage = tmp_path / "runs"
    spec = load_spec(space)
    holds = tmp_path / "holds"
    holds.mkdir()
    first = launch(
        tmp_path, {**environment, HOLD_AT_RUNGS_VARIABLE: str(holds)}, "--space", str(space), "--storage", "runs"
    )
    # Every fold's worker stops right after its rung report until the test lets it go on. Once a configuration was
    # pruned and the search is not over, the next held one is interrupted instead: SIGINT while its report is on its
    # way (reported, not yet decided on, its worker not past the rung).
    deadline = time.monotonic() + 1200
    held = None
    while time.monotonic() < deadline and first.poll() is None and held is None:
        search_files = list((storage / "prune3" / "studies").glob("*.search.json"))
        summary = read_summary(search_files[0]) if search_files else None
        for marker in sorted(holds.glob("*.held")):
            if summary and summary.count("pruned") and not summary.finished:
                held = marker
                break
            marker.rename(marker.with_suffix(".released"))
        time.sleep(0.2)
    assert first.poll() is None and held is not None, output_of(tmp_path, 0)
    first.send_signal(signal.SIGINT)
    first.wait(timeout=600)
    held.rename(held.with_suffix(".released"))
    text = output_of(tmp_path, 0)
    assert first.returncode == 128 + signal.SIGINT
    (state,) = studies_of(storage, "prune3")
    assert state.status == "interrupted"
    assert f"study {state.study} interrupted (SIGINT)" in text and f"msx launch --resume {state.study}" in text
    client = MlflowClient(state.tracking_uri)
    assert client.get_run(state.parent_run_id).info.status == "KILLED"
    assert not client.search_model_versions("name = 'msx-prune3'")  # nothing half-done registered
    status = subprocess.run(
        [*MSX, "status", "prune3", "--storage", "runs"], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert "interrupted at" in status.stdout and "pruned at epoch 2" in status.stdout, status.stdout
    _, before = study_search(storage, "prune3")
    pruned_before = {c.name: c.rung_means for c in before.configurations if c.status == "pruned"}

    resumed = launch(tmp_path, environment, "--resume", "prune3", "--storage", "runs")
    resumed.wait(timeout=1500)
    text = output_of(tmp_path, 1)
    assert resumed.returncode == 0
    assert f"resuming {state.study}" in text
    assert "registered model: models:/msx-prune3@champion" in text
    assert "early stopping:" in text and "saved" in text
    _, after = study_search(storage, "prune3")
    # The resumed driver knew what its predecessor decided: pruned configurations stay pruned, unchanged.
    assert {c.name: c.rung_means for c in after.configurations if c.name in pruned_before} == pruned_before
    assert all(c.status == "pruned" for c in after.configurations if c.name in pruned_before)
    assert len(after.configurations) == 3 and after.epochs_trained < after.epochs_full_grid
    # The report that was on its way reached MLflow, once (the invariants check every fold's epochs).
    run_name, rung = held.stem.rsplit("-epoch", 1)
    configuration, fold = run_name.rsplit("-fold", 1)
    (held_run,) = [
        run for run in fold_runs(client, state.experiment_id, state.parent_run_id)[configuration]
        if run.data.tags["mlflow.runName"] == run_name
    ]
    assert int(rung) in [m.step for m in client.get_metric_history(held_run.info.run_id, EPOCH)], (run_name, fold)
    check_search_invariants(storage, spec, (1, 2, 3), folds=3)


def test_a_gpu_study_on_a_machine_without_gpus_is_refused_in_one_line(tmp_path, environment):
    space = write_space(
        tmp_path, {**PRUNED_SEARCH, "name": "gpu", "resources": {"use_gpu": True, "gpus_per_worker": 1}}
    )
    result = subprocess.run(
        [*MSX, "launch", "--space", str(space), "--storage", "runs"], cwd=tmp_path, env=environment,
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "Error: the Ray cluster cannot host one trial: each trial needs 1 worker x {1 CPU, 1 GPU}"
    )
    assert "no node has 1 GPU" in lines[0] and "resources.use_gpu: false" in lines[0]
    # Before any trial, and before the study was recorded: nothing to resume, no MLflow run.
    assert not (tmp_path / "runs" / "gpu").exists()
    os.environ["MSX_LOCAL_RAY_DIR"] = environment["MSX_LOCAL_RAY_DIR"]
    assert local_ray.running_local_ray() is None  # the Ray it started for the check is stopped


def cpu_sized_hpo() -> dict:
    """The bundled `hpo` space with its search unchanged (its 8 parameters, Optuna, successive halving with
    reduction factor 3) and every size cut to a CPU's: MONAI's basic U-Net only, widths and epochs scaled by 1/8 and
    1/100, 32^3 patches, few DDIM steps, three patients' leave-one-subject-out folds for the paper's five."""
    hpo = load_spec("hpo").to_dict()
    parameters = []
    for parameter in hpo["search"]["parameters"]:
        if parameter["name"] == "model.width":
            parameter = {
                **parameter, "choices": [c / 8 for c in parameter["choices"]], "initial": parameter["initial"] / 8
            }
        if parameter["name"] == "inference.ddim_steps":
            parameter = {**parameter, "choices": [1, 2], "initial": 2}
        parameters.append(parameter)
    return {
        **hpo,
        "name": "hpo-cpu",
        "data": {
            **hpo["data"], "path": None, "folds": "loso", "synthetic": {"patients": 3, "shape": [40, 48, 40], "seed": 0}
        },
        **{key: {**hpo[key], **TINY[key]} for key in ("model", "training", "inference", "resources")},
        "training": {**hpo["training"], **TINY["training"], "epochs": 3, "validate_every": 1},
        "search": {**hpo["search"], "configurations_per_backbone": 2, "parameters": parameters,
                   "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 3}},
        "registry": {"model_name": "msx-hpo-cpu", "selection_metric": "dsc"},
    }


@pytest.mark.timeout(3300)
def test_two_studies_at_once_share_the_local_ray_and_both_register_a_champion(tmp_path, environment):
    """The second study is the search that used to hang, with the paper U-Net and every pause slower than an epoch."""
    hpo = write_space(tmp_path, cpu_sized_hpo())
    hang = write_space(tmp_path, SLOW_PAUSE_SEARCH)
    first = launch(tmp_path, environment, "--space", str(hpo), "--storage", "hpo-runs")
    time.sleep(20)  # the first has started the local Ray, or is starting it: the second joins it
    second = launch(
        tmp_path, {**environment, PAUSE_DELAY_VARIABLE: "5"}, "--space", str(hang), "--storage", "hang-runs"
    )
    second.wait(timeout=3000)
    first.wait(timeout=3000)
    first_text, second_text = output_of(tmp_path, 0), output_of(tmp_path, 1)
    assert first.returncode == 0 and second.returncode == 0
    assert "Ray: starting a local Ray" in first_text
    assert "Ray: joining this machine's local Ray (with 1 other study)" in second_text
    assert "registered model: models:/msx-hpo-cpu@champion" in first_text
    assert "registered model: models:/msx-hang@champion" in second_text and "STALLED" not in second_text
    check_search_invariants(tmp_path / "hpo-runs", spec_from_dict(cpu_sized_hpo()), (1, 2, 3), folds=3)
    check_search_invariants(tmp_path / "hang-runs", load_spec(hang), (1, 2, 3), folds=3)
