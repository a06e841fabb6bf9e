"""A fold trial stops at each rung until the study's driver has decided on its report there.

Ray Train's workers do not wait for Tune: a worker's report travels to Train's controller, then to the trial's
process, then to the driver, while the workers train on. A fold whose report at a rung was still on its way when the
driver paused the trial (or when the study was interrupted) had by then trained past the rung and checkpointed there
(a slow pause on a loaded machine is enough): resumed, it went on from that later checkpoint, and its configuration's
other folds waited for a rung score that could no longer come. So at a rung the worker waits, after its report, for
the driver's go-ahead: the scheduler opens the gate when it lets the trial continue; a pause or a stop ends the
trial's processes while they wait, its last checkpoint the rung's own.

The gate is a small named actor that the driver starts and owns (it ends with the driver); the workers poll it. A
worker with no gate to ask (a trainer run outside a study, a study without rungs) never waits.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray
from ray.actor import ActorHandle

from .live_epochs import NAMESPACE

POLL_INTERVAL_S = 0.1
# Tests only: a folder in which a worker, right after its report at a rung, makes a file `<run name>-epoch<N>.held`
# (`TrialConfig.run_name`, like `unet-c1-fold2-epoch2.held`) and waits while it exists, so that a test can interrupt a
# study exactly while a rung report is on its way (tests/test_study_lifecycle_e2e.py); the test renames it to
# `.released` to let the worker go on.
HOLD_AT_RUNGS_VARIABLE = "MSX_TEST_HOLD_AT_RUNGS"

log = logging.getLogger("msx.rung_gate")


def gate_name(study: str) -> str:
    return f"msx-rung-gate-{study}"


@ray.remote(num_cpus=0)
class RungGate:
    """Trial id -> the latest rung epoch the driver let it pass."""

    def __init__(self) -> None:
        self._passed: dict[str, int] = {}

    def open(self, trial_id: str, epoch: int) -> None:
        self._passed[trial_id] = max(epoch, self._passed.get(trial_id, 0))

    def passed(self, trial_id: str) -> int:
        return self._passed.get(trial_id, 0)


# The gate of the study that this process drives, if it started one: the scheduler opens it through `open_gate`.
# Kept here rather than in the scheduler, which Tune pickles when a study starts and gives back on a resume as it was.
_driver_gate: list[ActorHandle] = []


def start_rung_gate(name: str | None) -> ActorHandle | None:
    """The driver's gate (None: the study has no rungs); keep the handle while the study runs."""
    _driver_gate.clear()
    if name is None:
        return None
    try:
        gate = RungGate.options(name=name, namespace=NAMESPACE).remote()
    except ValueError:  # the name is still held by this process's previous gate, not yet collected
        gate = ray.get_actor(name, namespace=NAMESPACE)
    _driver_gate.append(gate)
    return gate


def open_gate(trial_id: str, epoch: int) -> None:
    """The driver's side: let a trial go on past `epoch` (not waited on); nothing without a gate."""
    if _driver_gate:
        _driver_gate[0].open.remote(trial_id, epoch)


class RungWaiter:
    """A worker's side: after its report at a rung, waits until the driver let its trial pass that epoch."""

    def __init__(self, name: str | None, trial_id: str, rungs: tuple[int, ...], run_name: str = "") -> None:
        self._trial_id = trial_id
        self._run_name = run_name
        self._rungs = frozenset(rungs)
        self._actor: ActorHandle | None = None
        if name is not None and self._rungs:
            try:
                self._actor = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                log.warning("rung gate %s not found: this trial does not wait at its rungs", name)

    def after_report(self, epoch: int) -> None:
        if epoch not in self._rungs:
            return
        _hold_for_tests(f"{self._run_name}-epoch{epoch}")
        if self._actor is None:
            return
        began = time.monotonic()
        try:
            while ray.get(self._actor.passed.remote(self._trial_id)) < epoch:
                time.sleep(POLL_INTERVAL_S)
        except ray.exceptions.RayActorError:
            # The gate ends with its driver, whose trials end with it too: nothing is left to wait for.
            log.warning("rung gate gone while waiting at epoch %d", epoch)
            return
        log.info("epoch %d: the driver let the trial past its rung after %.1f s", epoch, time.monotonic() - began)


def _hold_for_tests(name: str) -> None:
    folder = os.environ.get(HOLD_AT_RUNGS_VARIABLE)
    if not folder:
        return
    held = Path(folder) / f"{name}.held"
    if held.with_suffix(".released").exists():
        return  # held here once already (a resumed run replays its rung report): not again
    held.touch()
    while held.exists():
        time.sleep(POLL_INTERVAL_S)
