"""A Ray cluster of three real nodes on this machine (`ray start`: a head with no CPUs for training and two
1-CPU workers), and the failures a study must survive on it.

Two studies of the tiny spec below (one U-Net configuration x 3 leave-one-subject-out folds):

- submitted as a Ray job with `msx launch --address http://<dashboard>`, with a training worker killed
  (SIGKILL by PID) once its trial has a checkpoint;
- run by a driver here (`--address <GCS>`) that is killed after a trial finished, then taken over by
  `msx launch --resume`, during which the node holding a running trial is removed.

Ray maps 127.0.0.1 to this machine's own address for its nodes; nothing leaves the machine. The dashboard
binds to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from msx.orchestrator.trials.trainable import trial_id_of_train_run
from tests.helpers import free_port, ray_head_session, stop_ray_session, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
TINY_SPEC = tiny_spec(
    "tiny",
    data={
        "modalities": ["flair", "t2"], "folds": "loso",
        "synthetic": {"patients": 3, "shape": [32, 36, 32], "seed": 0},
    },
    training={"epochs": 6, "validate_every": 2},
    inference={"strategies": ["mean", "last"]},
    resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_failures": 3},
    search={
        "configurations_per_backbone": 1,
        "parameters": [{"name": "training.lr", "distribution": "loguniform", "low": 1.0e-3, "high": 4.0e-3}],
        "scheduler": {"name": "fifo"},
    },
    registry={"model_name": "msx-tiny"},
)
FOLDS = 3


@dataclass
class Cluster:
    gcs: str
    dashboard: str
    environment: dict[str, str]
    logs: Path

    def start_worker_node(self, tag: str) -> None:
        """A 1-CPU node carrying the custom resource `tag`, which names its raylet's process."""
        subprocess.run(
            [BIN / "ray", "start", f"--address={self.gcs}", "--num-cpus=1", f"--resources={json.dumps({tag: 1})}",
             *node_ports(), "--disable-usage-stats"],
            env=self.environment, check=True, capture_output=True, timeout=120,
        )

    def msx(self, *arguments: str, cwd: Path) -> subprocess.Popen:
        """`msx ...` in the background; its output goes to a log file (a pipe left unread would fill and stall it)."""
        log = (self.logs / f"msx-{time.monotonic_ns()}.log").open("w")
        process = subprocess.Popen(
            [BIN / "msx", *arguments], cwd=cwd, env=self.environment, stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        process.log_path = Path(log.name)
        return process


def node_ports() -> list[str]:
    # Nodes on one machine must not share the per-node agents' default ports.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]


WORKER_NODES = ("node_a", "node_b")


def any_raylet(tag: str) -> bool:
    try:
        raylet_of(tag)
    except AssertionError:
        return False
    return True


def raylet_of(tag: str) -> psutil.Process:
    for process in psutil.process_iter(["name", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.info["name"] == "raylet" and f"{tag},1" in command:
            return process
    raise AssertionError(f"no raylet carries the resource {tag}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    environment = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs_port, dashboard_port = free_port(), free_port()
    subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={gcs_port}", "--num-cpus=0", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", *node_ports(), "--disable-usage-stats"],
        env=environment, check=True, capture_output=True, timeout=120,
    )
    session = ray_head_session(gcs_port)
    cluster = Cluster(
        f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", environment, tmp_path_factory.mktemp("logs"),
    )
    cluster.start_worker_node("node_a")
    cluster.start_worker_node("node_b")
    yield cluster
    stop_ray_session(session, gcs_port)


def wait_for(condition, what: str, timeout_s: float = 300, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"msx ended (status {process.returncode}) before {what}:\n{process.log_path.read_text()[-4000:]}"
            )
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def registered_epoch(storage: Path, trial_id: str) -> int:
    """The epoch of a trial's latest checkpoint that Ray Train has registered (0: none).

    A checkpoint folder appears before the trainer registers it; a worker killed in between restarts
    from the checkpoint before.
    """
    runs = [run for run in (storage / "tiny" / "train").glob("*-*") if trial_id_of_train_run(run.name) == trial_id]
    try:
        results = json.loads((runs[0] / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (IndexError, OSError, ValueError, KeyError):
        return 0
    return max((int(result["metrics"]["epoch"]) for result in results), default=0)


def train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def trial_of(worker: psutil.Process) -> str:
    """The Tune trial id a training worker serves: Train runs it in a folder named after its run (train_run_name)."""
    return trial_id_of_train_run(Path(worker.cwd()).name)


def workers_mid_trial(storage: Path, epochs_before: dict[str, int]) -> list[tuple[psutil.Process, str]]:
    """(training worker, its node's tag) for trials that registered a checkpoint after `epochs_before` and
    still have epochs to train."""
    raylets = {raylet_of(tag).pid: tag for tag in WORKER_NODES if any_raylet(tag)}
    found = []
    for worker in train_workers():
        try:
            trial = trial_of(worker)
            node = next((raylets[parent.pid] for parent in worker.parents() if parent.pid in raylets), None)
        except psutil.Error:
            continue  # it ended meanwhile
        if node and epochs_before.get(trial, 0) < registered_epoch(storage, trial) < TINY_SPEC["training"]["epochs"]:
            found.append((worker, node))
    return found


def finish(process: subprocess.Popen, timeout_s: float = 600) -> str:
    process.wait(timeout=timeout_s)
    output = process.log_path.read_text()
    print(output[-6000:])
    assert process.returncode == 0, output[-4000:]
    return output


def fold_runs(storage: Path) -> tuple[list, list, list]:
    """(launch runs, configuration runs, fold runs) of the tiny experiment."""
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    launches = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    launch_ids = {r.info.run_id for r in launches}
    configurations = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in launch_ids]
    configuration_ids = {r.info.run_id for r in configurations}
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in configuration_ids]
    return launches, configurations, folds


@pytest.fixture(scope="module")
def job_study(cluster, tmp_path_factory):
    """The tiny study submitted as a Ray job; one training worker SIGKILLed once its trial checkpointed."""
    workdir = tmp_path_factory.mktemp("job")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPEC))
    storage = workdir / "runs"
    home_results = Path.home() / "ray_results"
    results_before = set(home_results.iterdir()) if home_results.is_dir() else set()
    launch = cluster.msx(
        "launch", "--address", cluster.dashboard, "--space", "tiny.yaml", "--storage", str(storage), cwd=workdir,
    )
    victim, _ = wait_for(
        lambda: workers_mid_trial(storage, {}), "a training worker whose trial has a checkpoint", process=launch,
    )[0]
    victim_trial = trial_of(victim)
    victim.send_signal(signal.SIGKILL)
    output = finish(launch)
    results_after = set(home_results.iterdir()) if home_results.is_dir() else set()
    return workdir, storage, output, victim_trial, results_after - results_before


def test_job_runs_the_study_to_completion_on_the_cluster(job_study):
    _, storage, output, _, _ = job_study
    assert "submitted Ray job msx-tiny-" in output
    assert "SUCCEEDED" in output
    assert f"finished {FOLDS}/{FOLDS} trials" in output
    assert "registered model: models:/msx-tiny" in output
    launches, configurations, folds = fold_runs(storage)
    assert len(launches) == 1 and len(configurations) == 1 and len(folds) == FOLDS
    assert all(run.info.status == "FINISHED" for run in launches + configurations + folds)


def test_killed_worker_resumed_its_trial_from_a_checkpoint(job_study):
    _, storage, _, killed_trial, _ = job_study
    _, _, folds = fold_runs(storage)
    resumed = [run for run in folds if run.data.metrics.get("resumed_from_epoch", 0) > 0]
    # Only the killed worker's trial started again, from a checkpoint, and it went on to the last epoch.
    assert [run.data.tags["msx.trial_id"] for run in resumed] == [killed_trial]
    assert resumed[0].data.metrics["epoch"] == TINY_SPEC["training"]["epochs"]


def test_nothing_is_written_outside_the_storage_folder(job_study):
    workdir, storage, _, _, new_home_results = job_study
    assert sorted(p.name for p in workdir.iterdir()) == ["runs", "tiny.yaml"]
    assert not new_home_results
    experiment = storage / "tiny"
    assert {p.name for p in experiment.iterdir()} >= {"tune", "train", "studies", "submitted"}
    assert len(list((experiment / "tune").glob("tiny-*/run_trial_*"))) == FOLDS
    assert list((experiment / "submitted").glob("msx-tiny-*.yaml"))


def test_status_reads_the_finished_study(cluster, job_study):
    workdir, storage, _, _, _ = job_study
    result = subprocess.run(
        [BIN / "msx", "status", "tiny", "--storage", str(storage)], cwd=workdir, env=cluster.environment,
        capture_output=True, text=True, check=True,
    )
    assert "finished at" in result.stdout
    assert f"trials: {FOLDS}/{FOLDS} done, 0 running, 0 failed, 0 pending" in result.stdout
    assert "best validation Dice so far: 0." in result.stdout


@pytest.fixture(scope="module")
def resumed_study(cluster, tmp_path_factory):
    """The driver killed after its first finished trial; `--resume` finishes the study, and the node holding
    one of its running trials is removed on the way."""
    workdir = tmp_path_factory.mktemp("resume")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPEC))
    storage = workdir / "runs"
    first = cluster.msx(
        "launch", "--address", cluster.gcs, "--space", "tiny.yaml", "--storage", str(storage), cwd=workdir,
    )

    def trials_done() -> int:
        snapshots = list((storage / "tiny" / "studies").glob("*.progress.json"))
        return json.loads(snapshots[0].read_text())["done"] if snapshots else 0

    wait_for(lambda: trials_done() >= 1, "a finished trial", process=first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    interrupted = subprocess.run(
        [BIN / "msx", "status", "--storage", str(storage)], env=cluster.environment,
        capture_output=True, text=True, check=True,
    ).stdout

    trials = [
        trial_id_of_train_run(folder.name) for folder in (storage / "tiny" / "train").glob("*-*") if folder.is_dir()
    ]
    epochs_before = {trial: registered_epoch(storage, trial) for trial in trials}
    second = cluster.msx("launch", "--resume", "tiny", "--address", cluster.gcs, "--storage", str(storage), cwd=workdir)
    # A trial that checkpointed under the new driver: its next start must come from that checkpoint.
    worker, removed_node = wait_for(
        lambda: workers_mid_trial(storage, epochs_before), "a new checkpoint of a running trial", process=second
    )[0]
    moved_trial = trial_of(worker)
    raylet = raylet_of(removed_node)
    for process in [*raylet.children(recursive=True), raylet]:
        process.kill()
    output = finish(second)
    return storage, interrupted, output, moved_trial, removed_node


def test_status_tells_an_interrupted_study_how_to_resume(resumed_study):
    _, interrupted, _, _, _ = resumed_study
    assert "interrupted: its driver" in interrupted
    assert "msx launch --resume tiny-" in interrupted


def test_resume_finishes_with_every_trial_once_and_no_duplicate_runs(resumed_study):
    storage, _, output, _, _ = resumed_study
    assert "resuming tiny-" in output
    assert f"finished {FOLDS}/{FOLDS} trials" in output
    launches, configurations, folds = fold_runs(storage)
    assert len(launches) == 1 and len(configurations) == 1
    assert len(folds) == FOLDS, [run.info.run_name for run in folds]
    assert len({run.data.tags["msx.trial_id"] for run in folds}) == FOLDS
    assert all(run.info.status == "FINISHED" for run in launches + configurations + folds)
    # The search kept its state: the one configuration's folds share its sampled learning rate.
    assert len({run.data.params["training.lr"] for run in folds}) == 1


def test_trial_of_the_removed_node_finished_on_the_other(resumed_study):
    storage, _, _, moved_trial, removed_node = resumed_study
    assert not any_raylet(removed_node)
    _, _, folds = fold_runs(storage)
    moved = next(run for run in folds if run.data.tags["msx.trial_id"] == moved_trial)
    assert moved.info.status == "FINISHED"
    assert moved.data.metrics["resumed_from_epoch"] > 0
    assert moved.data.metrics["epoch"] == TINY_SPEC["training"]["epochs"]
