"""The Ray Train worker loop: one trial's fold run data-parallel, by msx.models.fold.run_fold.

Every worker runs this. What it adds to the fold loop is Ray's: the data sharded and the network wrapped for the
worker group (`prepare_data_loader`, `prepare_model`), the checkpoint handed over by Ray Train when a group restarts,
the reports that reach Tune and, from there, MLflow on the driver, and the worker's Ray metrics.

A report to Tune blocks the worker (Ray Train synchronises the ranks before it queues the result: about 0.5 s on a
2-core CPU, docs/BENCHMARKS.md), so the worker reports only when there is something to decide on: at validation
epochs, which carry the checkpoint (rank 0's) and the score, and at the last epoch, which carries the final
evaluation. The epochs in between ride along with the next report (`EARLIER_EPOCHS`) and reach MLflow at their own
epochs. Every worker of a group validates at the same epochs, so all make the same number of reports. A worker that
dies between two validations loses only epochs that its group trains again from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch

from msx.models.data.folds import resolve_folds
from msx.models.data.manifest import open_cohort
from msx.models.fold import EpochReport, Parallelism, load_fold_data, load_training_state, run_fold

from ..spec import spec_from_dict
from ..trial import (
    BEST_VALIDATION_DICE,
    EARLIER_EPOCHS,
    EPOCH,
    FINAL_REPORT,
    LEARNING_RATE,
    PHASE_SECONDS_PREFIX,
    REPLAYED_REPORT,
    REPORT_WAIT,
    TRAIN_LOSS,
    VALIDATION_DICE,
    TrialConfig,
)
from .live_epochs import EpochNotifier
from .rung_gate import RungWaiter
from .startup import StartupClock
from .worker_metrics import WorkerMetrics, trial_tags

log = logging.getLogger("msx.worker")


def tune_metrics(report: EpochReport) -> dict[str, Any]:
    """An epoch's report as the metrics Tune gets (and the tracking callback logs)."""
    metrics: dict[str, Any] = {
        EPOCH: report.epoch, TRAIN_LOSS: report.train_loss, LEARNING_RATE: report.lr,
        # Which checkpoint this run of the workers started from (0: none): a retried trial's record shows it.
        "resumed_from_epoch": report.resumed_from_epoch,
    }
    if report.validation_dice is not None:
        metrics.update({VALIDATION_DICE: report.validation_dice, BEST_VALIDATION_DICE: report.best_validation_dice})
    if report.final_metrics is not None:
        metrics.update({FINAL_REPORT: 1, **report.final_metrics})
    if report.replayed:
        metrics[REPLAYED_REPORT] = 1
    metrics.update({"compile_seconds": report.compile_seconds} if report.compile_seconds is not None else {})
    metrics.update({PHASE_SECONDS_PREFIX + phase: seconds for phase, seconds in (report.phase_seconds or {}).items()})
    return metrics


# In a report's checkpoint: the epochs the report carried besides its own (`TuneReports`).
EARLIER_EPOCHS_FILE = "earlier_epochs.json"


class TuneReports:
    """Which epochs a worker reports to Tune: validation epochs (the last one among them) only. The epochs in between
    are kept and handed over with the next report, as `EARLIER_EPOCHS`.

    They are also written into the report's checkpoint (EARLIER_EPOCHS_FILE), and a run resumed from it hands them
    over again with its first report: a report that never reached the driver (a study interrupted while it was on
    its way) loses none of its epochs; one that did is recognised as replayed and logged once (tracking/callback.py).
    """

    def __init__(self, kept: Sequence[Sequence[float]] = ()) -> None:
        self._kept: list[tuple[int, float, float]] = [(int(e), float(loss), float(lr)) for e, loss, lr in kept]

    def metrics_to_report(self, report: EpochReport, folder: Path | None = None) -> dict[str, Any] | None:
        """The metrics of a report to make now, or None: the epoch is kept for the next one."""
        if report.validation_dice is None and report.final_metrics is None:
            self._kept.append((report.epoch, report.train_loss, report.lr))
            return None
        metrics = tune_metrics(report)
        if folder is not None:
            (folder / EARLIER_EPOCHS_FILE).write_text(json.dumps(self._kept))
        if self._kept:
            metrics[EARLIER_EPOCHS] = self._kept
            self._kept = []
        return metrics


def kept_epochs(checkpoint: Path) -> list:
    """The epochs a checkpoint's report carried besides its own (`TuneReports`); none for one without the file."""
    path = checkpoint / EARLIER_EPOCHS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """`config`, as `trainable.worker_loop_config` makes it (builtins only): the experiment's spec (as a dict), the
    trial (its Tune dict, `TrialConfig.to_tune`), the cohort's root (a folder or a manifest), the experiment's scan
    cache folder (None: no cache); optional: the Tune trial's id, the name of the study's live-epoch actor
    (live_epochs.py), the name of its rung gate and the rung epochs (rung_gate.py), the Unix time the trial's process
    started (None: now) and the start-up phases its trainable marked (startup.py)."""
    # Per-epoch lines go to the worker's log (Ray dashboard -> Train/Jobs -> logs).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trial = TrialConfig.from_tune(config["trial"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    metrics = WorkerMetrics(trial_tags(trial, context.get_experiment_name(), rank), device)
    startup = StartupClock(config.get("trial_started_at") or time.time(), metrics, config.get("startup_marked"))
    startup.mark("worker_loop")
    spec = trial.spec_of(spec_from_dict(config["spec"]))

    cohort = open_cohort(config["data_root"], spec.data.modalities, spec.data.rater)
    fold = next(f for f in resolve_folds(spec.data.folds, cohort.patients) if f.index == trial.fold)
    # Training scans preprocessed once per scan for every trial of the experiment (msx.models.data.cache).
    data = load_fold_data(cohort, fold, spec.training.patch_size, config.get("scan_cache"))

    resume, kept = None, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            resume = load_training_state(Path(folder), device)
            kept = kept_epochs(Path(folder))
    startup.mark("data_loaded")

    def prepare_model(net):
        startup.mark("network_built")
        return ray.train.torch.prepare_model(net)

    tune_reports = TuneReports(kept)
    notify_epoch = EpochNotifier(config.get("live_epochs"), config.get("trial_id", "")) if rank == 0 else None
    # Every worker waits at the rungs: the group goes on together, or ends together when the driver pauses it there.
    rung_waiter = RungWaiter(
        config.get("rung_gate"), config.get("trial_id", ""), tuple(config.get("rung_epochs", ())), trial.run_name
    )
    if notify_epoch is not None:
        notify_epoch(0)

    startup_reported, report_wait_s = False, 0.0

    def report(epoch: EpochReport, folder: Path | None) -> None:
        nonlocal startup_reported, report_wait_s
        if notify_epoch is not None:
            notify_epoch(epoch.epoch)
        if (reported := tune_reports.metrics_to_report(epoch, folder)) is None:
            return
        # With the first report of this run's own epochs: a replayed report may be dropped as already recorded.
        if not startup_reported and not epoch.replayed:
            reported.update(startup.metrics())
            startup_reported = True
        reported[REPORT_WAIT] = report_wait_s
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder is not None else None
        began = time.perf_counter()
        ray.train.report(reported, checkpoint=checkpoint)
        seconds = time.perf_counter() - began
        report_wait_s += seconds
        metrics.record_report(seconds)
        log.info("epoch %d reported to Tune in %.2f s", epoch.epoch, seconds)
        rung_waiter.after_report(epoch.epoch)

    run_fold(
        spec.fold_config(trial.backbone),
        data,
        device,
        report=report,
        resume=resume,
        parallel=Parallelism(
            prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, move_to_device=False),
            prepare_model=prepare_model,
        ),
        observer=startup,
        model_metadata={"spec": spec.to_dict(), "fold": fold.index},
        label=f"{trial.backbone} fold {trial.fold}",
    )
