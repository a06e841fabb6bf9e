"""The Ray Train worker loop: one trial's fold run data-parallel, by msx.models.fold.run_fold.

Every worker runs this. What it adds to the fold loop is Ray's: the data sharded and the network wrapped for the
worker group (`prepare_data_loader`, `prepare_model`), the checkpoint handed over by Ray Train when a group restarts,
the reports (every worker makes the same number; rank 0's carry the checkpoint folders) that reach Tune and, from
there, MLflow on the driver, and the worker's Ray metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch

from msx.models.data.folds import resolve_folds
from msx.models.data.manifest import open_cohort
from msx.models.fold import EpochReport, Parallelism, load_fold_data, load_training_state, run_fold

from ..spec import spec_from_dict
from ..trial import BEST_VALIDATION_DICE, EPOCH, FINAL_REPORT, TRAIN_LOSS, VALIDATION_DICE, TrialConfig
from .worker_metrics import WorkerMetrics, trial_tags

RAY_TRAIN = Parallelism(
    prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, move_to_device=False),
    prepare_model=ray.train.torch.prepare_model,
)


def tune_metrics(report: EpochReport) -> dict[str, Any]:
    """An epoch's report as the metrics Tune gets (and the tracking callback logs)."""
    metrics: dict[str, Any] = {
        EPOCH: report.epoch, TRAIN_LOSS: report.train_loss, "lr": report.lr,
        # Which checkpoint this run of the workers started from (0: none): a retried trial's record shows it.
        "resumed_from_epoch": report.resumed_from_epoch,
    }
    if report.validation_dice is not None:
        metrics.update({VALIDATION_DICE: report.validation_dice, BEST_VALIDATION_DICE: report.best_validation_dice})
    if report.final_metrics is not None:
        metrics.update({FINAL_REPORT: 1, **report.final_metrics})
    metrics.update({"compile_seconds": report.compile_seconds} if report.compile_seconds is not None else {})
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """`config`: the experiment's spec (as a dict), the trial (a TrialConfig), the cohort's root (a folder or a
    manifest) and the experiment's scan cache folder (None: no cache)."""
    # Per-epoch lines go to the worker's log (Ray dashboard -> Train/Jobs -> logs).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trial: TrialConfig = config["trial"]
    spec = trial.spec_of(spec_from_dict(config["spec"]))
    context = ray.train.get_context()
    device = ray.train.torch.get_device()

    cohort = open_cohort(config["data_root"], spec.data.modalities, spec.data.rater)
    fold = next(f for f in resolve_folds(spec.data.folds, cohort.patients) if f.index == trial.fold)
    # Training scans preprocessed once per scan for every trial of the experiment (msx.models.data.cache).
    data = load_fold_data(cohort, fold, spec.training.patch_size, config.get("scan_cache"))

    resume = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            resume = load_training_state(Path(folder), device)

    def report(epoch: EpochReport, folder: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder is not None else None
        ray.train.report(tune_metrics(epoch), checkpoint=checkpoint)

    run_fold(
        spec.fold_config(trial.backbone),
        data,
        device,
        report=report,
        resume=resume,
        parallel=RAY_TRAIN,
        observer=WorkerMetrics(trial_tags(trial, context.get_experiment_name(), context.get_world_rank()), device),
        model_metadata={"spec": spec.to_dict(), "fold": fold.index},
        label=f"{trial.backbone} fold {trial.fold}",
    )
