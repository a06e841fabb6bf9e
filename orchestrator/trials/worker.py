"""The Ray Train worker loop: one (backbone, hyperparameters, fold) trained data-parallel.

Every worker runs this; rank 0 writes checkpoints. Metrics reach Tune (and from there MLflow, on the
driver) through `ray.train.report`, which all workers call the same number of times.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from monai.data import list_data_collate
from monai.optimizers import WarmupCosineSchedule

from msx.models.checkpoint import save_checkpoint
from msx.models.data.cache import cached_training_scan
from msx.models.data.cohort import LoadedScan, Scan, load_scan
from msx.models.data.folds import resolve_folds
from msx.models.data.manifest import open_cohort
from msx.models.diffusion import DiffusionConfig, LossWeights
from msx.models.engine import (
    InferenceConfig,
    ScanEvaluation,
    evaluate_scan,
    train_epoch,
    training_autocast_dtype,
    training_dataset,
    training_optimizer,
)
from msx.models.networks import NetworkConfig, build_network
from msx.models.overlays import overlay_channel, write_overlay

from ..results import FINAL_REPORT, MODEL_DIR, OVERLAY_DIR, SCAN_METRICS_FILE, split_metrics
from ..spec import ExperimentSpec, spec_from_dict
from .worker_metrics import WorkerMetrics, trial_tags

log = logging.getLogger("msx.train")

STATE_FILE = "training_state.pt"


def trial_spec(config: dict[str, Any]) -> ExperimentSpec:
    """The experiment spec with this trial's backbone and searched values applied."""
    spec = spec_from_dict(config["spec"])
    trial = config["trial"]
    searched = {key: value for key, value in trial.items() if "." in key}
    return spec.with_overrides({"model.backbones": (trial["backbone"],), **searched})


def network_config(spec: ExperimentSpec) -> NetworkConfig:
    return NetworkConfig(
        backbone=spec.model.backbones[0],
        image_channels=len(spec.data.modalities),
        width=spec.model.width,
        patch_size=spec.training.patch_size,
    )


def inference_config(spec: ExperimentSpec, validation: bool) -> InferenceConfig:
    if validation:
        return InferenceConfig(
            ddim_steps=spec.training.validation_ddim_steps,
            samples=1,
            roi_size=spec.training.patch_size,
            overlap=spec.inference.overlap,
            sw_batch_size=spec.inference.sw_batch_size,
            strategies=(spec.training.validation_strategy,),
            connectivity=spec.inference.connectivity,
        )
    return InferenceConfig(
        ddim_steps=spec.inference.ddim_steps,
        samples=spec.inference.samples,
        roi_size=spec.training.patch_size,
        overlap=spec.inference.overlap,
        sw_batch_size=spec.inference.sw_batch_size,
        strategies=spec.inference.strategies,
        connectivity=spec.inference.connectivity,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    # Per-epoch lines go to the worker's log (Ray dashboard -> Train/Jobs -> logs).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = trial_spec(config)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.training.seed + rank)
    np.random.seed(spec.training.seed + rank)
    autocast_dtype = training_autocast_dtype(device)
    label = f"{config['trial']['backbone']} fold {config['trial']['fold']}"

    # data_root is the prepared cohort's root: a folder or a manifest file.
    cohort = open_cohort(config["data_root"], spec.data.modalities, spec.data.rater)
    folds = resolve_folds(spec.data.folds, cohort.patients)
    fold = next(f for f in folds if f.index == config["trial"]["fold"])

    def load(patients: tuple[int, ...]):
        return [load_scan(scan, spec.data.modalities, spec.data.rater) for scan in cohort.scans_of(patients)]

    if config.get("scan_cache"):
        # Preprocessed once per scan for every trial of the experiment (msx.models.data.cache).
        train_scans = [
            cached_training_scan(
                scan, spec.data.modalities, spec.data.rater, spec.training.patch_size, config["scan_cache"]
            )
            for scan in cohort.scans_of(fold.train)
        ]
    else:
        train_scans = load(fold.train)
    dataset = training_dataset(
        train_scans, spec.training.patch_size, spec.training.lesion_patch_fraction, seed=spec.training.seed + rank
    )
    # list_data_collate: lesion-biased sampling yields a list of one sample per scan.
    loader = ray.train.torch.prepare_data_loader(
        torch.utils.data.DataLoader(
            dataset, batch_size=spec.training.batch_size, shuffle=True, num_workers=0, collate_fn=list_data_collate
        ),
        move_to_device=False,
    )
    net = ray.train.torch.prepare_model(build_network(network_config(spec)))
    bare_net = net.module if hasattr(net, "module") else net
    optimizer = training_optimizer(net.parameters(), spec.training.lr, spec.training.weight_decay, device)
    total_steps = spec.training.epochs * len(loader)
    lr_schedule = WarmupCosineSchedule(
        optimizer, warmup_steps=int(spec.training.warmup_fraction * total_steps), t_total=total_steps
    )
    diffusion = DiffusionConfig(spec.diffusion.timesteps, spec.diffusion.beta_start, spec.diffusion.beta_end)
    loss_weights = LossWeights(spec.training.loss_dice, spec.training.loss_bce, spec.training.loss_mse)

    start_epoch, best_score, best_state = 0, -math.inf, None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
            bare_net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            start_epoch, best_score, best_state = state["epoch"], state["best_score"], state["best_model"]
        log.info("%s: resumed at epoch %d (best validation Dice %.4f)", label, start_epoch, best_score)

    validation_scans = load(fold.validation)
    worker_metrics = WorkerMetrics(trial_tags(config, context.get_experiment_name(), rank), device)
    started = time.monotonic()
    epochs = range(start_epoch + 1, spec.training.epochs + 1)
    if not epochs:
        # Restored from the final checkpoint, whose report never reached Tune (its driver died first): the
        # last validation and the final evaluation are made and reported again, without training.
        epochs = range(spec.training.epochs, spec.training.epochs + 1)
    for epoch in epochs:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if epoch > start_epoch:
            # The sampler's length is this worker's share of the samples (DistributedSampler with several workers).
            with worker_metrics.training_epoch(epoch, steps=len(loader), samples=len(loader.sampler)):
                loss = float(train_epoch(net, loader, optimizer, lr_schedule, device, diffusion, loss_weights, autocast_dtype))
        else:
            loss = math.nan
        metrics: dict[str, Any] = {
            "epoch": epoch, "train_loss": loss, "lr": lr_schedule.get_last_lr()[0],
            # Which checkpoint this run of the workers started from (0: none): a retried trial's record shows it.
            "resumed_from_epoch": start_epoch,
        }
        if epoch % spec.training.validate_every and epoch != spec.training.epochs:
            log.info("%s: epoch %d/%d loss %.4f", label, epoch, spec.training.epochs, loss)
            ray.train.report(metrics)
            continue
        per_scan = evaluate_distributed(
            bare_net, validation_scans, inference_config(spec, validation=True), device, diffusion, autocast_dtype,
            seed=spec.training.seed + epoch,
        )
        score = float(np.nanmean([scan[spec.training.validation_strategy]["dsc"] for scan in per_scan]))
        worker_metrics.record_validation(score)
        if score > best_score or best_state is None:
            best_score = score
            best_state = {k: v.detach().clone() for k, v in bare_net.state_dict().items()}
        metrics.update(val_dice_now=score, val_dice=best_score)
        log.info(
            "%s: epoch %d/%d loss %.4f validation Dice %.4f (best %.4f, %.0f s)",
            label, epoch, spec.training.epochs, loss, score, best_score, time.monotonic() - started,
        )
        with tempfile.TemporaryDirectory() as folder:
            # The last validation also carries the final evaluation, in the same report: a scheduler that stops
            # the trial on this report cannot cut the evaluation off.
            final_rows: list[dict[str, Any]] = []
            if epoch == spec.training.epochs:
                bare_net.load_state_dict(best_state)
                final_metrics, final_rows = final_evaluation(
                    bare_net, spec, {"val": validation_scans, "test": load(fold.test)},
                    {"val": cohort.scans_of(fold.validation), "test": cohort.scans_of(fold.test)},
                    device, diffusion, autocast_dtype,
                    overlay_folder=Path(folder) / OVERLAY_DIR if rank == 0 else None,
                )
                metrics.update(final_metrics)
                log.info("%s: done, best validation Dice %.4f", label, best_score)
            checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "model": bare_net.state_dict(),
                        "best_model": best_state,
                        "optimizer": optimizer.state_dict(),
                        "lr_schedule": lr_schedule.state_dict(),
                        "epoch": epoch,
                        "best_score": best_score,
                    },
                    Path(folder) / STATE_FILE,
                )
                if final_rows:
                    save_checkpoint(Path(folder) / MODEL_DIR, bare_net, {"spec": spec.to_dict(), "fold": fold.index})
                    (Path(folder) / SCAN_METRICS_FILE).write_text(json.dumps(final_rows, indent=1))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


def final_evaluation(
    net: torch.nn.Module,
    spec: ExperimentSpec,
    scans: dict[str, list[LoadedScan]],
    scan_records: dict[str, tuple[Scan, ...]],
    device: torch.device,
    diffusion: DiffusionConfig,
    autocast_dtype: torch.dtype | None,
    overlay_folder: Path | None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Every strategy on the validation and the test patients: split means and per-scan rows.

    With `overlay_folder` (rank 0's), also an overlay PNG of each split's first scan, so the trial's record
    shows what its numbers look like.
    """
    final = inference_config(spec, validation=False)
    # The strategy the trial was validated with, when the final evaluation runs it.
    overlay_strategy = spec.training.validation_strategy
    if overlay_strategy not in final.strategies:
        overlay_strategy = final.strategies[0]
    rows: list[dict[str, Any]] = []
    for split, split_scans in scans.items():
        draw_example = None
        if overlay_folder is not None and split_scans:
            draw_example = functools.partial(
                write_example_overlay, overlay_folder, spec, split, scan_records[split][0], split_scans[0], overlay_strategy
            )
        per_scan = evaluate_distributed(
            net, split_scans, final, device, diffusion, autocast_dtype, seed=spec.training.seed + 10_000,
            on_first_scan=draw_example,
        )
        rows.extend(
            {"split": split, "scan": record.scan_id, "strategy": strategy, **values}
            for record, scan in zip(scan_records[split], per_scan)
            for strategy, values in scan.items()
        )
    return {FINAL_REPORT: 1, **split_metrics(rows)}, rows


def write_example_overlay(
    folder: Path, spec: ExperimentSpec, split: str, record: Scan, scan: LoadedScan, strategy: str,
    evaluation: ScanEvaluation,
) -> None:
    folder.mkdir(exist_ok=True)
    write_overlay(
        folder / f"{split}-{record.scan_id}-{strategy}.png",
        scan.image[overlay_channel(spec.data.modalities)],
        evaluation.masks[strategy].astype(bool),
        scan.mask.astype(bool),
        f"{split} {record.scan_id} [{strategy}]",
        f"rater {spec.data.rater}",
    )


def evaluate_distributed(
    net: torch.nn.Module,
    scans: list[LoadedScan],
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig,
    autocast_dtype: torch.dtype | None,
    seed: int,
    on_first_scan: Callable[[ScanEvaluation], None] | None = None,
) -> list[dict[str, dict[str, float]]]:
    """Per-scan metrics, scans shared out over the workers and gathered back in scan order.

    `on_first_scan` gets the first scan's evaluation, masks included, on the worker that evaluates it (rank 0);
    only metrics travel between workers.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    generator = torch.Generator(device=device)
    mine = {}
    for index in range(rank, len(scans), world_size):
        generator.manual_seed(seed + index)
        evaluation = evaluate_scan(net, scans[index], config, device, diffusion, generator, autocast_dtype)
        if index == 0 and on_first_scan is not None:
            on_first_scan(evaluation)
        mine[index] = evaluation.metrics
    if world_size > 1:
        gathered: list[dict] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        mine = {index: value for part in gathered for index, value in part.items()}
    return [mine[index] for index in range(len(scans))]
