"""Each running trial's epoch as it happens, for the study's progress lines.

A trial reports to Tune at its validations only, so Tune's last result lags up to `validate_every` epochs behind
the worker. The driver therefore starts a small named actor (no CPU, owned by the driver, so it ends with it) that
each trial's rank-0 worker tells its epoch, fire and forget: the call is queued and never waited on, and costs the
worker microseconds (docs/BENCHMARKS.md), not a report's synchronisation. The progress view asks the actor only when
it is about to print. Everything goes through Ray's own calls, so it works across a cluster's nodes; a resumed
driver starts a new actor under the same name. Without the actor (a trainer run outside a study, or an actor that
cannot be reached) the worker trains on and progress shows the epoch of the trial's last report.
"""

from __future__ import annotations

import logging

import ray
from ray.actor import ActorHandle

NAMESPACE = "msx"
# How long the progress view waits for the actor's answer before it prints without it.
READ_TIMEOUT_S = 2.0

log = logging.getLogger("msx.live_epochs")


def actor_name(study: str) -> str:
    return f"msx-live-epochs-{study}"


@ray.remote(num_cpus=0)
class LiveEpochs:
    """Trial id -> the last epoch its workers finished (0: started, none finished yet)."""

    def __init__(self) -> None:
        self._epochs: dict[str, int] = {}

    def set(self, trial_id: str, epoch: int) -> None:
        self._epochs[trial_id] = epoch

    def epochs(self) -> dict[str, int]:
        return dict(self._epochs)


def start_live_epochs(name: str) -> ActorHandle:
    """The driver's actor; keep the handle while the study runs (the actor ends when no handle is left)."""
    try:
        return LiveEpochs.options(name=name, namespace=NAMESPACE).remote()
    except ValueError:  # the name is still held by this process's previous actor, not yet collected
        return ray.get_actor(name, namespace=NAMESPACE)


def read_live_epochs(name: str | None) -> dict[str, int]:
    """The epochs the actor holds now; empty when there is no actor or it does not answer in time."""
    if name is None:
        return {}
    try:
        return ray.get(ray.get_actor(name, namespace=NAMESPACE).epochs.remote(), timeout=READ_TIMEOUT_S)
    except (ValueError, ray.exceptions.RayError) as error:
        log.warning(
            "live epochs from %s unavailable (%s): progress shows the epoch of each trial's last report", name, error
        )
        return {}


class EpochNotifier:
    """A worker's side: tells the actor, if there is one, each epoch the trial finished."""

    def __init__(self, name: str | None, trial_id: str) -> None:
        self._trial_id = trial_id
        self._actor: ActorHandle | None = None
        if name is None:
            log.info("no live-epoch actor named: progress shows the epoch of this trial's last report")
            return
        try:
            self._actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            log.warning("live-epoch actor %s not found: progress shows the epoch of this trial's last report", name)

    def __call__(self, epoch: int) -> None:
        if self._actor is not None:
            # Not waited on: the worker never blocks on the progress view.
            self._actor.set.remote(self._trial_id, epoch)
