"""`msx launch --cluster slurm.yaml` as a user runs it on a login node, against a real SLURM cluster on this machine.

The cluster (tests/cluster/slurm_cluster.py): munged, slurmctld and two slurmd (node1, node2) on 127.0.0.1, all from
the test's own folder; the storage folder plays the file system that every node and the login node share. The
SLURM config is cluster/slurm.yaml with its PLACEHOLDERs filled in (partition, setup, storage) and the allocation
sized for this machine, and nothing else changed.

1. A study submitted through `msx launch --cluster`: the job runs Ray's head and one Ray worker per node (job
   steps), the study's driver registers a champion, and `msx launch` on the login node, which followed the job's
   log, ends with the job COMPLETED.
2. A second study, interrupted mid-search by a plain `scancel --signal=TERM JOB` (which SLURM sends the job steps,
   the Ray workers, which pass it on to the batch step): the study stops interrupted with its finished trials kept,
   the job requeues itself, and its second run resumes the same study to a champion: one study run in MLflow,
   every fold's epochs logged once, the trial finished before the signal not trained again.

Needs root on Linux and Debian's slurmctld, slurmd, slurm-client and munge (`make slurm` installs them where
apt-get can run as root); elsewhere the test is skipped, saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from msx.orchestrator.tracking.store import PARENT_RUN_TAG, STUDY_TAG, TRIAL_ID_TAG

from ..helpers import tiny_spec
from .slurm_cluster import missing_requirement, start_slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPOSITORY = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EPOCHS = 2  # validated once, at the end: no rung to pause at, so the studies stay short
FOLDS = 3  # leave-one-subject-out over 3 patients
STUDY_S = 600  # the longest a study here may take (each: about 2 minutes)


def spec(name: str) -> dict:
    return tiny_spec(
        name,
        data={
            "modalities": ["flair", "t2"], "folds": "loso",
            "synthetic": {"patients": 3, "shape": [32, 32, 32], "seed": 0},
        },
        training={"epochs": EPOCHS, "validate_every": 2},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
        registry={"model_name": f"msx-{name}"},
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirement()
    if reason:
        pytest.skip(f"the SLURM test {reason}")
    with start_slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=2) as running:
        yield running


@pytest.fixture(scope="module")
def login(cluster, tmp_path_factory):
    """The login node's folder: the SLURM config (the template, filled in) and the studies' specs."""
    folder = tmp_path_factory.mktemp("login")
    storage = folder / "shared" / "msx_runs"
    config = yaml.safe_load((REPOSITORY / "cluster" / "slurm.yaml").read_text())
    config["slurm"].update(
        partition="debug", nodes=2, cpus_per_node=1, gpus_per_node=0, time="30:00", signal_grace_s=60
    )
    config["setup"] = [f"export PATH={BIN}:$PATH"]  # msx's environment on the nodes
    config["storage"] = str(storage)
    (folder / "slurm.yaml").write_text(yaml.safe_dump(config))
    for name in ("slurm-a", "slurm-b"):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec(name)))
    return folder, storage


def launch(cluster, folder: Path, name: str) -> subprocess.Popen:
    """`msx launch --cluster slurm.yaml --space NAME.yaml` in the background, its output in a log file."""
    environment = cluster.process_environment(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0"
    )
    for variable in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MSX_STORAGE"):
        environment.pop(variable, None)
    log = (folder / f"launch-{name}.log").open("w")
    process = subprocess.Popen(
        [BIN / "msx", "launch", "--cluster", "slurm.yaml", "--space", f"{name}.yaml"],
        cwd=folder, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    process.log_path = Path(log.name)
    return process


def finished(process: subprocess.Popen) -> str:
    process.wait(timeout=STUDY_S)
    output = process.log_path.read_text()
    print(output[-8000:])
    assert process.returncode == 0, output[-4000:]
    return output


def submitted_job(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"submitted SLURM job (\d+)", process.log_path.read_text())
        if match:
            return match[1]
        assert process.poll() is None, process.log_path.read_text()
        time.sleep(0.5)
    raise AssertionError("msx launch printed no job id")


def trials_done(storage: Path, name: str) -> int:
    status = subprocess.run(
        [BIN / "msx", "status", name, "--storage", str(storage)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"trials: (\d+)/\d+ done", status.stdout)
    return int(match[1]) if match else 0


def study_runs(storage: Path, name: str) -> tuple[list, list]:
    """The experiment's launch runs and fold runs."""
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    launches = [run for run in runs if STUDY_TAG in run.data.tags and PARENT_RUN_TAG not in run.data.tags]
    folds = [run for run in runs if TRIAL_ID_TAG in run.data.tags]
    return launches, folds


def assert_each_epoch_logged_once(storage: Path, folds: list) -> None:
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    assert len(folds) == FOLDS
    for fold in folds:
        steps = sorted(m.step for m in client.get_metric_history(fold.info.run_id, "train_loss"))
        assert steps == list(range(1, EPOCHS + 1)), (fold.info.run_name, steps)


def test_a_study_submitted_with_sbatch_registers_its_champion(cluster, login):
    folder, storage = login
    output = finished(launch(cluster, folder, "slurm-a"))
    job_id = re.search(r"submitted SLURM job (\d+) \(2 nodes, 1 CPUs each, time limit 30:00, requeue on\)", output)[1]
    log = storage / "slurm-a" / "slurm" / f"slurm-a-{job_id}.log"
    assert f"log:          {log}" in output and f"status:       msx status slurm-a --storage {storage}" in output
    assert f"scancel --batch --signal=TERM {job_id}" in output
    # The job's log, followed from the login node: Ray in the allocation, a worker per node, the study to its end.
    assert f"msx slurm-job: job {job_id}, run 1, nodes node1 (127.0.0.1), node2 (127.0.0.1)" in output
    assert output.count("msx slurm-node: Ray worker on") == 2 and "1 CPUs, 0 GPUs" in output
    assert "registered model: models:/msx-slurm-a@champion (version 1)" in output
    port = re.search(r"Ray dashboard on node1's 127\.0\.0\.1:(\d+): `ssh -L 8265:127\.0\.0\.1:\d+ node1`", output)[1]
    assert int(port) > 0
    assert output.rstrip().endswith(f"SLURM job {job_id}: COMPLETED")
    assert cluster.job_state(job_id) == "COMPLETED"
    script = (storage / "slurm-a" / "slurm").glob("slurm-a-*.sbatch")
    assert "#SBATCH --signal=B:TERM@60" in next(script).read_text()
    launches, folds = study_runs(storage, "slurm-a")
    assert len(launches) == 1 and launches[0].info.status == "FINISHED"
    assert_each_epoch_logged_once(storage, folds)
    champion = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}").get_model_version_by_alias("msx-slurm-a", "champion")
    assert int(champion.version) == 1
    # From the login node, through the shared storage.
    status = subprocess.run(
        [BIN / "msx", "status", "slurm-a", "--storage", str(storage)], capture_output=True, text=True
    )
    assert f"trials: {FOLDS}/{FOLDS} done" in status.stdout and "finished" in status.stdout


def test_scancel_signal_term_interrupts_the_study_and_the_requeued_job_resumes_it(cluster, login):
    folder, storage = login
    process = launch(cluster, folder, "slurm-b")
    job_id = submitted_job(process)
    deadline = time.monotonic() + STUDY_S
    while not 1 <= trials_done(storage, "slurm-b") < FOLDS:
        assert time.monotonic() < deadline and process.poll() is None, process.log_path.read_text()[-4000:]
        time.sleep(0.5)
    # The signal a user sends by hand, and SLURM at preemption: to the job's steps.
    cluster.run("scancel", "--signal=TERM", job_id, check=True)
    output = finished(process)
    interrupted_at = output.index("msx slurm-job: SIGTERM: interrupting the study")
    assert "interrupted (SIGTERM)" in output[interrupted_at:]
    assert f"requeueing job {job_id} to resume it" in output[interrupted_at:]
    resumed_at = output.index(f"msx slurm-job: job {job_id}, run 2 (requeued 1 time)")
    assert "resuming the unfinished study" in output[resumed_at:]
    assert "registered model: models:/msx-slurm-b@champion (version 1)" in output[resumed_at:]
    assert output.rstrip().endswith(f"SLURM job {job_id}: COMPLETED")
    assert "Restarts=1" in cluster.run("scontrol", "show", "job", job_id).stdout
    # One study run; each fold's epochs logged once, the trial finished before the signal not trained again.
    launches, folds = study_runs(storage, "slurm-b")
    assert len(launches) == 1 and launches[0].info.status == "FINISHED"
    assert_each_epoch_logged_once(storage, folds)
