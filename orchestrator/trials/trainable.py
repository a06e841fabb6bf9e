"""The Tune trial: a function trainable that fits one Ray Train TorchTrainer.

Ray Train V2 cannot be passed to a Tuner directly; a function trainable builds and fits the trainer
and `TuneReportCallback` forwards rank 0's reports to Tune. The trial itself holds no CPU (see
`TRIAL_RESOURCES`): on a 2-CPU machine a trial that held one would starve its own workers.

A trial starts three Python processes one after another (the trial's, Ray Train's controller, the worker), each
paying its own imports before the next starts. So the trial's process imports neither msx.models nor MONAI (it
reads only the spec's resources section, and the worker loop is imported by the worker alone), and what the
controller unpickles (the worker loop's config) is builtins only: `worker_loop_config`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import psutil
import ray
import ray.train
import ray.tune
from ray.train.constants import RAY_TRAIN_ENABLE_STATE_TRACKING
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ..cluster.capacity import check_cluster_hosts_a_trial, trial_request, worker_resources
from ..resources import ResourcesSpec
from ..trial import TrialConfig
from .startup import StartupClock

if TYPE_CHECKING:
    from ray.actor import ActorHandle

TRIAL_RESOURCES = {"cpu": 0, "memory": 1_000_000}
# Ray Train's bound on one wait for the workers' placement group (it propagates the variable to its controller).
WORKER_START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# How often Ray Train's controller polls its workers (2 s by default; propagated likewise). A poll is what takes a
# worker's report off its one-place queue (a second report waits for it) and what sees the workers finish, so the
# default adds up to 2 s to a trial's end and to a report that follows another closely. A poll is one small actor
# call per worker.
POLL_INTERVAL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.5
# Ray Train's preemption watcher (an actor per worker group, polling for nodes being drained) does nothing for a
# one-node cluster, where a drained node ends the trial with everything else; there its process start would only
# take CPU from the workers' own start.
PREEMPTION_WATCHER_VARIABLE = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

log = logging.getLogger("msx.trial")


class WorkersDidNotStartError(RuntimeError):
    """The trial's training workers could not start within resources.worker_start_timeout_s."""


def scaling_config(resources: ResourcesSpec) -> ray.train.ScalingConfig:
    return ray.train.ScalingConfig(
        num_workers=resources.workers_per_trial, use_gpu=resources.use_gpu,
        resources_per_worker=worker_resources(resources),
    )


def start_ray_train_services() -> list[ActorHandle]:
    """Start Ray Train V2's cluster-wide actors, its autoscaling coordinator and its train state actor (the
    dashboard's Train view), without waiting for them; returns their handles.

    Ray Train starts both the first time a trainer runs on a cluster, from that trainer's controller, one after the
    other and before it asks for its workers: a study's first trial would wait for two more process starts. Called
    once by the study's driver before its trials, they start while the first trial's process does.
    """
    try:
        # Private Ray API, not a public one: the names are those of Ray 2.60, which pyproject pins. Should they move,
        # nothing breaks: the first trial's controller starts these actors itself, as it otherwise would.
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.train.v2._internal.state.state_actor import get_or_create_state_actor
    except ImportError:
        log.info("Ray Train's cluster actors start with the first trial (this Ray has no factories for them)")
        return []
    # Both are named and detached ("get if exists"): the controllers find these and start no others.
    return [get_or_create_autoscaling_coordinator(), get_or_create_state_actor()]


def worker_loop_config(
    spec: dict[str, Any],
    trial: TrialConfig,
    data_root: str,
    *,
    scan_cache: str | None = None,
    trial_id: str = "",
    live_epochs: str | None = None,
    rung_gate: str | None = None,
    rung_epochs: tuple[int, ...] = (),
    trial_started_at: float | None = None,
    startup_marked: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The config every training worker gets (`worker.train_loop_per_worker`), made of builtins only.

    Ray Train's controller unpickles it, with the run's context, before it asks for the workers: an msx object in
    it (a TrialConfig) would import the spec, msx.models, torch and MONAI in the controller first (on a 2-core CPU
    about 4 s of its start). The trial goes as its Tune dict (`TrialConfig.to_tune`) and the spec as its dict.
    """
    return {
        "spec": spec,
        "trial": trial.to_tune(),
        "data_root": data_root,
        "scan_cache": scan_cache,
        "trial_id": trial_id,
        "live_epochs": live_epochs,
        "rung_gate": rung_gate,
        "rung_epochs": list(rung_epochs),
        "trial_started_at": trial_started_at,
        "startup_marked": dict(startup_marked or {}),
    }


def run_worker_loop(config: dict[str, Any]) -> None:
    """The training worker's loop, imported in the worker only: its module imports msx.models (torch, MONAI),
    which the trial's process, pickling this function by reference, does without."""
    from .worker import train_loop_per_worker

    train_loop_per_worker(config)


def train_run_name(trial: TrialConfig, trial_id: str) -> str:
    """The Ray Train run of a trial (and its folder under the experiment's train/), like ``unet-c1-fold3-1a2b3_00004``:
    configuration and fold name it in the dashboard; the Tune trial id (no hyphen in it) keeps it apart from the
    same fold of an earlier study."""
    return f"{trial.configuration}-fold{trial.fold}-{trial_id}"


def trial_id_of_train_run(name: str) -> str:
    return name.rsplit("-", 1)[-1]


def run_trial(
    config: dict[str, Any],
    *,
    spec: dict[str, Any],
    data_root: str,
    storage_path: str,
    scan_cache: str | None = None,
    live_epochs: str | None = None,
    rung_gate: str | None = None,
    rung_epochs: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Train and evaluate one (backbone, hyperparameters, fold); results flow back through reports.

    ``scan_cache``: folder of preprocessed training scans shared by the trials; None loads them afresh.
    ``live_epochs``: the name of the study's live-epoch actor (live_epochs.py), which the workers tell their epoch.
    ``rung_gate``, ``rung_epochs``: the study's rung gate and, by backbone, the epochs at which the workers wait for it
    (rung_gate.py).
    """
    # Tune starts each trial in a process of its own: the start-up is counted from that process's start.
    started_at = psutil.Process().create_time()
    startup = StartupClock(started_at)
    startup.mark("trainable")
    # The spec was validated by the study's driver; of it, the trial's process needs only its resources.
    resources = ResourcesSpec(**spec["resources"])
    trial_id = ray.tune.get_context().get_trial_id()
    trial = TrialConfig.from_tune(config)
    # Read by the trainer made here: its state reaches the dashboard's Train view (Ray keeps it off by default).
    os.environ.setdefault(RAY_TRAIN_ENABLE_STATE_TRACKING, "1")
    os.environ.setdefault(POLL_INTERVAL_VARIABLE, str(POLL_INTERVAL_S))
    if sum(1 for node in ray.nodes() if node["Alive"]) == 1:
        os.environ.setdefault(PREEMPTION_WATCHER_VARIABLE, "0")
    # A cluster that lost the nodes this trial needs fails the trial now, with the reason, rather than wait.
    check_cluster_hosts_a_trial(resources, log.info)
    timeout = resources.worker_start_timeout_s
    if timeout:
        os.environ[WORKER_START_TIMEOUT_VARIABLE] = str(timeout)
    trainer = TorchTrainer(
        run_worker_loop,
        train_loop_config=worker_loop_config(
            spec, trial, data_root, scan_cache=scan_cache, trial_id=trial_id, live_epochs=live_epochs,
            rung_gate=rung_gate, rung_epochs=(rung_epochs or {}).get(trial.backbone, ()), trial_started_at=started_at,
            startup_marked=startup.seconds,
        ),
        scaling_config=scaling_config(resources),
        run_config=ray.train.RunConfig(
            # A stable name per trial: a restarted trial finds its own Train run and checkpoints again.
            name=train_run_name(trial, trial_id),
            storage_path=storage_path,
            callbacks=[TuneReportCallback()],
            # With a timeout, the first wait that ends without workers fails the trial (Ray Train would
            # otherwise try again, without end).
            failure_config=ray.train.FailureConfig(
                max_failures=resources.max_failures, controller_failure_limit=0 if timeout else -1
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except ray.train.ControllerError as error:
        if timeout and "startup timed out" in str(error.controller_failure):
            raise WorkersDidNotStartError(
                f"the training workers ({trial_request(resources).describe()}) did not start within "
                f"resources.worker_start_timeout_s = {timeout:g} s: the cluster had no room for them"
            ) from error
        raise
