"""Which epochs a worker reports to Tune (validations and the last epoch), what the reports carry of the epochs in
between, and the start-up phases a worker marks. Pure: no Ray."""

import math
import time
from contextlib import contextmanager

import pytest

from msx.models.fold import EpochReport
from msx.orchestrator.trial import EARLIER_EPOCHS, EPOCH, FINAL_REPORT, LEARNING_RATE, STARTUP_PREFIX, TRAIN_LOSS
from msx.orchestrator.trials.startup import PHASES, StartupClock
from msx.orchestrator.trials.worker import TuneReports, kept_epochs

EPOCHS = 7
VALIDATE_EVERY = 3


def epoch_reports(start: int = 0) -> list[EpochReport]:
    """The fold loop's reports over epochs start+1..EPOCHS: validations at 3, 6 and the last, which is final."""
    reports = []
    for epoch in range(start + 1, EPOCHS + 1):
        loss, lr = 1.0 / epoch, 1e-3 * epoch
        if epoch % VALIDATE_EVERY and epoch != EPOCHS:
            reports.append(EpochReport(epoch, loss, lr, start))
        else:
            final = {"val/mean/dsc": 0.5} if epoch == EPOCHS else None
            reports.append(EpochReport(epoch, loss, lr, start, 0.1 * epoch, 0.1 * epoch, final))
    return reports


def test_only_validations_are_reported_and_they_carry_the_epochs_in_between():
    batcher = TuneReports()
    reported = [m for m in (batcher.metrics_to_report(r) for r in epoch_reports()) if m is not None]
    assert [m[EPOCH] for m in reported] == [3, 6, 7]
    assert [m.get(EARLIER_EPOCHS) for m in reported] == [
        [(1, 1.0, 1e-3), (2, 0.5, 2e-3)],
        [(4, 0.25, 4e-3), (5, 0.2, 5e-3)],
        None,  # the last epoch follows a validation: nothing in between
    ]
    # A report's own epoch keeps its loss and learning rate under the usual keys.
    assert [(m[TRAIN_LOSS], m[LEARNING_RATE]) for m in reported] == [(1 / 3, 3e-3), (1 / 6, 6e-3), (1 / 7, 7e-3)]
    assert [FINAL_REPORT in m for m in reported] == [False, False, True]
    # Every epoch reaches the record exactly once.
    epochs = [e for m in reported for e, _, _ in m.get(EARLIER_EPOCHS, [])] + [m[EPOCH] for m in reported]
    assert sorted(epochs) == list(range(1, EPOCHS + 1))


def test_workers_of_a_group_make_the_same_number_of_reports():
    # Rank 0 and rank 1 see the same epochs and validate at the same ones (only rank 0 has checkpoint folders,
    # which the batcher does not look at); their losses differ.
    ranks = [TuneReports(), TuneReports()]
    counts = [
        sum(batcher.metrics_to_report(EpochReport(r.epoch, r.train_loss * (rank + 1), r.lr, 0, r.validation_dice,
                                                   r.best_validation_dice, r.final_metrics)) is not None
            for r in epoch_reports())
        for rank, batcher in enumerate(ranks)
    ]
    assert counts == [3, 3]


def test_a_run_resumed_between_validations_reports_its_retrained_epochs_with_the_next_validation():
    # The group died after epoch 4 (never reported) and restarts from the checkpoint of epoch 3.
    batcher = TuneReports()
    reported = [m for m in (batcher.metrics_to_report(r) for r in epoch_reports(start=3)) if m is not None]
    assert [m[EPOCH] for m in reported] == [6, 7]
    assert [e for e, _, _ in reported[0][EARLIER_EPOCHS]] == [4, 5]
    assert all(m["resumed_from_epoch"] == 3 for m in reported)


def test_a_run_resumed_from_the_final_checkpoint_reports_its_last_epoch_again():
    only = EpochReport(EPOCHS, math.nan, 1e-3, EPOCHS, 0.5, 0.5, {"val/mean/dsc": 0.5})
    metrics = TuneReports().metrics_to_report(only)
    assert metrics[EPOCH] == EPOCHS and metrics[FINAL_REPORT] == 1 and EARLIER_EPOCHS not in metrics


class Recorder:
    def __init__(self):
        self.calls = []

    @contextmanager
    def training_epoch(self, epoch, steps, samples):
        self.calls.append(("epoch", epoch))
        yield

    def record_validation(self, dice):
        self.calls.append(("validation", dice))


def test_startup_clock_marks_each_phase_once_from_the_trial_start_and_wraps_the_observer():
    started = time.time() - 10.0
    recorder = Recorder()
    clock = StartupClock(started, recorder, marked={"trainable": 2.0})
    clock.mark("worker_loop")
    for epoch in (1, 2):
        with clock.training_epoch(epoch, steps=3, samples=6):
            pass
    clock.record_validation(0.4)
    clock.mark("worker_loop")  # a second mark keeps the first
    assert recorder.calls == [("epoch", 1), ("epoch", 2), ("validation", 0.4)]
    assert list(clock.metrics()) == [
        f"{STARTUP_PREFIX}{phase}_s" for phase in ("trainable", "worker_loop", "first_step", "first_epoch")
    ]
    seconds = clock.seconds
    assert seconds["trainable"] == 2.0
    assert 10.0 <= seconds["worker_loop"] <= seconds["first_step"] <= seconds["first_epoch"] < 20.0
    with pytest.raises(ValueError, match="first_step"):
        clock.mark("imports")
    assert set(PHASES) >= set(seconds)


def test_the_last_report_carries_where_the_runs_time_went_by_phase():
    final = EpochReport(
        EPOCHS, 0.1, 1e-3, 0, 0.5, 0.5, {"val/mean/dsc": 0.5}, phase_seconds={"training": 12.5, "evaluation_msx": 3.0}
    )
    metrics = TuneReports().metrics_to_report(final)
    assert (metrics["seconds/training"], metrics["seconds/evaluation_msx"]) == (12.5, 3.0)
    assert not any(key.startswith("seconds/") for key in TuneReports().metrics_to_report(epoch_reports()[2]))


def test_the_epochs_a_report_carries_ride_in_its_checkpoint_to_a_run_resumed_from_it(tmp_path):
    """A study interrupted while a report was on its way: the run resumed from that report's checkpoint reports the
    epochs in between again, with its first report (the callback logs a replayed report's epochs once)."""
    batcher = TuneReports()
    reports = epoch_reports()
    for report in reports[:2]:  # epochs 1 and 2: kept
        assert batcher.metrics_to_report(report, tmp_path) is None
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    sent = batcher.metrics_to_report(reports[2], checkpoint)
    assert kept_epochs(checkpoint) == [list(epoch) for epoch in sent[EARLIER_EPOCHS]]
    assert kept_epochs(checkpoint) == [[1, 1.0, 1e-3], [2, 0.5, 2e-3]]
    resumed = TuneReports(kept_epochs(checkpoint))
    replay = EpochReport(3, reports[2].train_loss, reports[2].lr, 3, 0.3, 0.3, replayed=True)
    assert resumed.metrics_to_report(replay)[EARLIER_EPOCHS] == [(1, 1.0, 1e-3), (2, 0.5, 2e-3)]
    assert kept_epochs(tmp_path / "no-checkpoint-here") == []
