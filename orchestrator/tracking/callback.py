"""The driver's Tune callback that writes the study's record (store.py) as its trials run.

Each Tune event becomes one write, made at once when the store answers and otherwise kept, in order, until it does
(pending.py). A write names runs by trial id or configuration, never by run id: a run whose creation is still
pending has none yet. Writes find or make the runs they write to (runs.py), copy a fold's final checkpoint files
(artifacts.py) and summarise a configuration once its folds have ended (summaries.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.logger import LoggerCallback
from ray.tune.utils import flatten_dict

from ..trial import EARLIER_EPOCHS, EPOCH, FINAL_REPORT, LEARNING_RATE, REPLAYED_REPORT, TRAIN_LOSS, TrialConfig
from .artifacts import log_final_checkpoint
from .pending import REQUEST_TIMEOUT_S, UPLOAD_TIMEOUT_S, PendingWrites
from .runs import RunTree
from .summaries import end_configuration_when_all_folds_ended

# Tune's bookkeeping numbers that say nothing about the model, and the marker of the final report.
UNTRACKED_RESULT_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration", "time_since_restore",
    "iterations_since_restore", "done", FINAL_REPORT, REPLAYED_REPORT,
}


@dataclass(frozen=True)
class OpenTrialRun:
    """A trial started: its configuration's run and its own, found (by tag) or made, its config as params."""

    timeout_s: ClassVar[int] = REQUEST_TIMEOUT_S
    trial_id: str
    trial: TrialConfig

    def describe(self) -> str:
        return f"{self.trial.run_name}: start"


@dataclass(frozen=True)
class LogTrialMetrics:
    timeout_s: ClassVar[int] = REQUEST_TIMEOUT_S
    trial_id: str
    run_name: str
    step: int
    # Timestamps fixed when Tune reported them: a replayed batch that had reached the store adds nothing.
    metrics: tuple[Metric, ...]
    # A resumed run's report of the checkpoint it resumed from (REPLAYED_REPORT): logged only if its epoch is not
    # in the run yet (its first delivery was lost to an interruption), so that no epoch is logged twice.
    replayed: bool = False

    def describe(self) -> str:
        return f"{self.run_name}: metrics of step {self.step}"


@dataclass(frozen=True)
class LogFinalCheckpoint:
    # Uploads of a model may take the server a while to store.
    timeout_s: ClassVar[int] = UPLOAD_TIMEOUT_S
    trial_id: str
    run_name: str
    checkpoint_path: str

    def describe(self) -> str:
        return f"{self.run_name}: final checkpoint's files ({self.checkpoint_path})"


@dataclass(frozen=True)
class CloseTrialRun:
    """A trial ended: its run's status, then its configuration's summary if that was its last fold."""

    timeout_s: ClassVar[int] = REQUEST_TIMEOUT_S
    trial_id: str
    trial: TrialConfig
    status: str
    end_time_ms: int

    def describe(self) -> str:
        return f"{self.trial.run_name}: end ({self.status}) and configuration summary"


TrackingWrite = OpenTrialRun | LogTrialMetrics | LogFinalCheckpoint | CloseTrialRun


def earlier_epoch_metrics(result: dict, timestamp_ms: int) -> tuple[Metric, ...]:
    """The loss and learning rate of the epochs a report carries besides its own (`EARLIER_EPOCHS`), each at its
    own epoch as the step: MLflow's curves keep a point per epoch though the worker reports at validations only."""
    return tuple(
        Metric(key, float(value), timestamp_ms, int(epoch))
        for epoch, train_loss, lr in result.get(EARLIER_EPOCHS, ())
        for key, value in ((TRAIN_LOSS, train_loss), (LEARNING_RATE, lr))
        if _is_number(value)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class TrialRunsCallback(LoggerCallback):
    """Tune's events as the launch's tree in MLflow: configuration runs under the launch's run, a fold run per
    trial under its configuration's run.

    A configuration's run is made when its first fold starts; its summary is logged, and the run ended, when
    all `fold_count` folds have ended. A trial or configuration that already has a run (the driver restarted,
    or a write whose answer was lost is made again) gets the same run back, not a second one.

    A store that does not answer does not stop the study: the write is kept, with every later one, in a
    pending queue and the trials train on. The queue is made, oldest first, at the next Tune event once
    `retry_interval_s` has passed since the last failure (so an outage costs Tune's loop one fast-failing
    request per interval), and is part of Tune's saved experiment state, so a resumed driver makes it too.
    At the end of the experiment the driver waits up to `final_wait_s` for the store, then raises
    PendingWritesError naming the store and what it did not take.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        parent_run_id: str,
        strategies: tuple[str, ...],
        fold_count: int,
        retry_interval_s: float = 30.0,
        final_wait_s: float = 300.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._strategies = strategies
        self._fold_count = fold_count
        self._runs = RunTree(experiment_name, parent_run_id)
        self._writes = PendingWrites(tracking_uri, retry_interval_s, final_wait_s)

    @property
    def pending(self) -> tuple[TrackingWrite, ...]:
        return tuple(self._writes.items)

    # ---- Tune's events

    def log_trial_start(self, trial) -> None:
        # Made at the end of Tune's step (`on_step_end`) or with the trial's first result, whichever comes first:
        # Tune asks the trial's process to start training only after its callbacks heard of the start, and the
        # store's answer need not hold that up (a trial's start-up, docs/BENCHMARKS.md).
        self._writes.defer(OpenTrialRun(trial.trial_id, TrialConfig.from_tune(trial.config)))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result.get(EPOCH, iteration))
        now = int(time.time() * 1000)
        metrics = tuple(
            Metric(key, float(value), now, step)
            for key, value in flatten_dict(result).items()
            if key not in UNTRACKED_RESULT_KEYS
            and not key.startswith("config/")
            and _is_number(value)
        ) + earlier_epoch_metrics(result, now)
        run_name = TrialConfig.from_tune(trial.config).run_name
        replayed = bool(result.get(REPLAYED_REPORT))
        self._writes.add(LogTrialMetrics(trial.trial_id, run_name, step, metrics, replayed), self._apply)
        if result.get(FINAL_REPORT) and result.get(CHECKPOINT_PATH_KEY):
            self._writes.add(LogFinalCheckpoint(trial.trial_id, run_name, result[CHECKPOINT_PATH_KEY]), self._apply)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self._writes.add(
            CloseTrialRun(trial.trial_id, TrialConfig.from_tune(trial.config), status, int(time.time() * 1000)),
            self._apply,
        )

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        # A store that came back gets the queue without waiting for a trial's next event.
        self._writes.flush(self._apply)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._writes.wait(self._apply)

    # Tune saves this with the experiment's state and gives it back to a resumed driver.
    def get_state(self) -> dict[str, Any]:
        return {"pending": list(self._writes.items)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._writes.items = list(state["pending"])

    # ---- the store

    def _apply(self, client: MlflowClient, write: TrackingWrite) -> None:
        runs = self._runs
        match write:
            case OpenTrialRun():
                runs.open_trial_run(client, write.trial_id, write.trial)
            case LogTrialMetrics():
                run_id = runs.trial_run(client, write.trial_id)
                if write.replayed and any(m.step == write.step for m in client.get_metric_history(run_id, EPOCH)):
                    return
                client.log_batch(run_id, metrics=list(write.metrics))
            case LogFinalCheckpoint():
                log_final_checkpoint(client, runs.trial_run(client, write.trial_id), write.checkpoint_path)
            case CloseTrialRun():
                client.set_terminated(runs.trial_run(client, write.trial_id), write.status, end_time=write.end_time_ms)
                end_configuration_when_all_folds_ended(
                    client, runs.experiment(client), runs.configuration_run(client, write.trial),
                    self._strategies, self._fold_count, write.end_time_ms,
                )
