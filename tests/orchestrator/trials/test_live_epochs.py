"""The study's live-epoch actor on a real local Ray: a worker (a Ray task here, another process as a training worker
is) tells it epochs without waiting; the progress view reads them back; without the actor both sides carry on."""

import time

import pytest
import ray
from ray.tune.experiment import Trial

from msx.orchestrator.study.progress import ProgressView
from msx.orchestrator.trials.live_epochs import EpochNotifier, read_live_epochs, start_live_epochs

EPOCHS = 50


@ray.remote(num_cpus=0)
def worker_telling_epochs(name: str, trial_id: str, epochs: int) -> None:
    notify = EpochNotifier(name, trial_id)
    for epoch in range(epochs + 1):
        notify(epoch)


def wait_for(read, expected, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


@pytest.mark.integration
def test_workers_tell_epochs_and_the_progress_view_prints_them(local_ray, tmp_path):
    name = "msx-live-epochs-test-study"
    actor = start_live_epochs(name)
    ray.get([worker_telling_epochs.remote(name, "t_1", EPOCHS), worker_telling_epochs.remote(name, "t_2", 3)])
    assert wait_for(lambda: read_live_epochs(name), {"t_1": EPOCHS, "t_2": 3}) == {"t_1": EPOCHS, "t_2": 3}

    trial = Trial("msx", config={"backbone": "unet", "fold": 1, "configuration": "unet-c1"}, trial_id="t_1", stub=True)
    trial.set_status(Trial.RUNNING)
    trial.run_metadata.last_result = {"epoch": 40}  # its last validation
    lines = []
    ProgressView(1, lines.append, tmp_path / "progress.json", live_epochs=name).on_step_end(iteration=1, trials=[trial])
    assert lines[-1].endswith(f"unet-c1 fold 1: epoch {EPOCHS}")
    ray.kill(actor)


@pytest.mark.integration
def test_without_the_actor_workers_train_on_and_progress_reads_nothing(local_ray):
    ray.get(worker_telling_epochs.remote("msx-live-epochs-nobody", "t_1", 3))  # no error in the worker
    assert read_live_epochs("msx-live-epochs-nobody") == {}
    assert read_live_epochs(None) == {}
