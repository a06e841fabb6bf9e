"""What a trial's start-up imports: the trial's own process (the trainable) does without msx.models and MONAI, Ray
Train's controller unpickles the worker loop's config without any msx, torch or MONAI, and Ray Train's cluster
actors can start before the first trial."""

import json
import pickle
import subprocess
import sys

import pytest

from msx.orchestrator.trial import TrialConfig
from msx.orchestrator.trials.trainable import start_ray_train_services, worker_loop_config
from tests.helpers import REPOSITORY, tiny_spec

TRIAL = TrialConfig("unet", 2, "unet-c3", {"training.lr": 3e-4, "model.width": 0.25})
# Prints the modules of interest that a fresh interpreter has loaded after running the code given before it.
LOADED = (
    "import json, sys; "
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('msx', 'torch', 'monai'))))"
)


def modules_loaded_by(code: str, stdin: bytes = b"") -> list[str]:
    completed = subprocess.run(
        [sys.executable, "-c", f"{code}\n{LOADED}"], input=stdin, capture_output=True, cwd=REPOSITORY, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    return json.loads(completed.stdout.decode().strip().splitlines()[-1])


def config_of_a_trial() -> dict:
    return worker_loop_config(
        tiny_spec("startup"), TRIAL, "/data/cohort", scan_cache="/storage/scan_cache", trial_id="1a2b3_00004",
        live_epochs="live-epochs", trial_started_at=1_700_000_000.0, startup_marked={"trainable": 6.6},
    )


def test_the_trials_process_imports_neither_msx_models_nor_monai():
    loaded = modules_loaded_by("import msx.orchestrator.trials.trainable")
    assert "msx.orchestrator.trials.trainable" in loaded
    assert not [name for name in loaded if name.split(".")[0] == "monai" or name.startswith("msx.models")], loaded
    assert "msx.orchestrator.trials.worker" not in loaded


def test_the_controller_unpickles_the_worker_config_without_msx_torch_or_monai():
    loaded = modules_loaded_by("import pickle, sys; pickle.load(sys.stdin.buffer)", pickle.dumps(config_of_a_trial()))
    assert loaded == []


def test_the_worker_config_gives_the_worker_back_the_same_trial():
    config = pickle.loads(pickle.dumps(config_of_a_trial()))
    assert TrialConfig.from_tune(config["trial"]) == TRIAL
    assert config["spec"] == tiny_spec("startup")
    assert config["startup_marked"] == {"trainable": 6.6}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ray_trains_cluster_actors_start_before_any_trainer(local_ray):
    coordinator, state = start_ray_train_services()
    assert local_ray.get(coordinator.get_reserved_resources.remote("nobody"), timeout=120) == {}
    assert local_ray.get(state.get_train_runs.remote(), timeout=120) == {}
    # Ray Train's controllers look them up by name: the ones started here are those they find.
    from ray.train.v2._internal.state.state_actor import get_state_actor

    assert get_state_actor() == state
    assert start_ray_train_services() == [coordinator, state]
