"""One fold of a study, free of any orchestration: train on the fold's training scans, validate every few epochs on
its validation scans, keep the best weights, and evaluate them with every strategy on its validation and test scans.

The orchestrator's Ray Train worker runs `run_fold` with Ray's pieces plugged in (data sharding and DDP through
`Parallelism`, its reports carrying the checkpoint folders, its metrics as the `TrainingObserver`); a notebook, a
test or a benchmark run it as it is:

    cohort = open_cohort("data/synthetic", ("flair", "mprage", "t2"), rater=1)
    fold = resolve_folds("paper", cohort.patients)[0]
    config = FoldConfig(NetworkConfig("unet", width=0.125), TrainingConfig(epochs=4, patch_size=(32, 32, 32)),
                        evaluation=InferenceConfig(roi_size=(32, 32, 32)))
    result = run_fold(config, load_fold_data(cohort, fold, (32, 32, 32)), torch.device("cpu"))
    result.metrics["test/mean/dsc"]

Every worker of a data-parallel group runs it; rank 0 writes the checkpoint files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from monai.data import list_data_collate
from monai.optimizers import WarmupCosineSchedule

from .checkpoint import save_checkpoint
from .compilation import (
    COMPILE_AUTO,
    DEFAULT_BACKEND,
    CompiledDenoiser,
    check_compile_setting,
    compile_for_training,
    compile_seconds_so_far,
    compile_wanted,
    compiled_denoiser,
)
from .data.cache import PreparedScan, cached_training_scan
from .data.cohort import Cohort, LoadedScan, Scan, load_scan
from .data.folds import Fold
from .diffusion import DiffusionConfig, LossWeights
from .engine import (
    OPTIMIZERS,
    PRECISIONS,
    InferenceConfig,
    ScanEvaluation,
    ValidationGroup,
    check_choice,
    evaluate_scan,
    inference_autocast_dtype,
    prepare_validation,
    train_epoch,
    training_autocast_dtype,
    training_dataset,
    training_optimizer,
    validation_dice,
)
from .lr_schedule import SCHEDULES, reference_schedule
from .metrics import protocol_prefix, retention_fractions, split_metrics
from .networks import NetworkConfig, build_network
from .overlays import overlay_channel, write_overlay

log = logging.getLogger(__name__)

# A fold's checkpoint folder, written at every validation (and handed to `report`): the training state a restart
# resumes from; the last one also holds the best weights as an msx checkpoint, the per-scan metrics of the final
# evaluation, their nDSC retention curves (when uncertainty was scored) and an overlay of each split's first scan.
STATE_FILE = "training_state.pt"
MODEL_DIR = "model"
SCAN_METRICS_FILE = "scan_metrics.json"
# {"fractions": [...], "curves": [{"split", "scan", "strategy", "measure", "ndsc": [...]}, ...]}
RETENTION_CURVES_FILE = "retention_curves.json"
OVERLAY_DIR = "overlays"
# The splits a fold is evaluated on at its end, by the names its metrics carry (`val/mean/dsc`).
EVALUATED_SPLITS = ("val", "test")
# A run's phases, timed on each worker (EpochReport.phase_seconds): training epochs, validations during training,
# and the final evaluation under each protocol (`evaluation_phase`).
TRAINING_PHASE, VALIDATION_PHASE = "training", "validation"
# Which validated weights a fold keeps (`TrainingConfig.best_checkpoint`, `keeps_weights`): "msx", those of the
# first validation and then of every strictly better one (the best starts at minus infinity); "reference", those of
# every validation strictly better than the best so far, which starts at 0.0, so a fold whose validation Dice never
# leaves 0 keeps none and is evaluated with its last weights.
BEST_CHECKPOINT_RULES = ("msx", "reference")


def initial_best_score(rule: str) -> float:
    """The best validation Dice before any validation under ``rule`` (`BEST_CHECKPOINT_RULES`)."""
    check_choice(rule, BEST_CHECKPOINT_RULES, "best_checkpoint")
    return 0.0 if rule == "reference" else -math.inf


def keeps_weights(rule: str, score: float, best_score: float, has_best: bool) -> bool:
    """Whether a validation scoring ``score`` keeps its weights as the best, the best so far being ``best_score``
    (`initial_best_score` before any) and ``has_best`` whether weights were kept before: under "msx" the first
    validation always keeps them; under "reference" only a strict improvement does (a NaN score never)."""
    check_choice(rule, BEST_CHECKPOINT_RULES, "best_checkpoint")
    if rule == "reference":
        return score > best_score
    return score > best_score or not has_best


@dataclass(frozen=True)
class TrainingConfig:
    """How a fold is trained and validated. The defaults are the reference's hyperparameters, trained on msx's fast
    path (`compile`, `precision`, `optimizer`, `schedule`, `best_checkpoint`: the `paper` space sets the
    reference's)."""

    epochs: int = 500
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (96, 96, 96)
    lr: float = 1e-4
    weight_decay: float = 1e-3
    # Linear warm-up over this fraction of the steps, then cosine decay.
    warmup_fraction: float = 0.1
    loss_weights: LossWeights = LossWeights()
    validate_every: int = 10
    # Validation samples one chain with the test-time number of DDIM steps (the reference validates with 50, which
    # costs more than the training steps) and scores this strategy's Dice; its best epoch's weights are kept.
    # These are msx's protocol's settings; the reference protocol's are in protocols.REFERENCE.defaults.
    validation_ddim_steps: int = InferenceConfig.ddim_steps
    validation_strategy: str = "mean"
    # The validations' sliding-window overlap; None: the final evaluation's.
    validation_overlap: float | None = None
    seed: int = 0
    # Probability that a training patch is centred on a lesion voxel (else on the brain); 0: uniform crops.
    lesion_patch_fraction: float = 0.0
    # torch.compile of the network for training and sampling (`compilation`): "auto" (on a CUDA device only), True,
    # False.
    compile: bool | str = COMPILE_AUTO
    # Training numerics (engine.PRECISIONS): "auto" bf16 autocast on a GPU, float32 elsewhere; "fp32"; "bf16".
    precision: str = "auto"
    # AdamW's implementation (engine.OPTIMIZERS): "auto" fused on a GPU; "adamw" PyTorch's default; "adamw-fused".
    optimizer: str = "auto"
    # The learning-rate schedule (lr_schedule.SCHEDULES): "per-step", MONAI's WarmupCosineSchedule stepped after every
    # batch, warm-up over `warmup_fraction` of the steps; "per-epoch", the reference's
    # (lr_schedule.reference_lr_per_epoch: the first epoch at rate 0, warm-up over `warmup_fraction` of the epochs, then
    # cosine), stepped after every epoch.
    schedule: str = "per-step"
    # Which validated weights are kept (BEST_CHECKPOINT_RULES): "msx" or "reference" (see `keeps_weights`).
    best_checkpoint: str = "msx"

    def __post_init__(self) -> None:
        check_compile_setting(self.compile, "training.compile")
        check_choice(self.precision, PRECISIONS, "training.precision")
        check_choice(self.optimizer, OPTIMIZERS, "training.optimizer")
        check_choice(self.schedule, SCHEDULES, "training.schedule")
        check_choice(self.best_checkpoint, BEST_CHECKPOINT_RULES, "training.best_checkpoint")


@dataclass(frozen=True)
class FoldConfig:
    """Everything `run_fold` needs besides the data: the network, its training, the diffusion process, and the
    final evaluation's inference settings (validation uses them too, with `TrainingConfig`'s steps, strategy and
    overlap). `compared`: other inference protocols' settings the final evaluation of the test scans is also scored
    under, from the same weights (nothing is selected under them)."""

    network: NetworkConfig
    training: TrainingConfig = TrainingConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    evaluation: InferenceConfig = InferenceConfig()
    compared: tuple[InferenceConfig, ...] = ()

    def __post_init__(self) -> None:
        for evaluation in (self.evaluation, *self.compared):
            if tuple(evaluation.roi_size) != tuple(self.training.patch_size):
                raise ValueError(
                    f"inference windows {evaluation.roi_size} must be the training patch size "
                    f"{self.training.patch_size}"
                )
        protocols = [evaluation.protocol for evaluation in (self.evaluation, *self.compared)]
        if len(set(protocols)) < len(protocols):
            raise ValueError(f"each protocol is evaluated once; got {protocols}")

    @property
    def validation(self) -> InferenceConfig:
        """The validations' settings: one chain, the validation's steps and strategy, the evaluation's windows."""
        return replace(
            self.evaluation,
            ddim_steps=self.training.validation_ddim_steps,
            samples=1,
            strategies=(self.training.validation_strategy,),
            overlap=(
                self.evaluation.overlap if self.training.validation_overlap is None
                else self.training.validation_overlap
            ),
        )


@dataclass(frozen=True)
class FoldData:
    """A fold's scans: the training scans ready for cropping, the validation scans loaded, the test scans named
    (they are read for the final evaluation only)."""

    cohort: Cohort
    fold: Fold
    train: Sequence[LoadedScan | PreparedScan]
    validation: Sequence[LoadedScan]

    def records(self, split: str) -> tuple[Scan, ...]:
        """The scans of `split` ("train", "val" or "test")."""
        patients = {"train": self.fold.train, "val": self.fold.validation, "test": self.fold.test}[split]
        return self.cohort.scans_of(patients)

    def load(self, split: str) -> list[LoadedScan]:
        return [load_scan(scan, self.cohort.modalities, self.cohort.rater) for scan in self.records(split)]


def load_fold_data(
    cohort: Cohort, fold: Fold, patch_size: Sequence[int], scan_cache: str | Path | None = None
) -> FoldData:
    """The fold's training scans (from ``scan_cache``, a folder of preprocessed scans shared by the trials of an
    experiment, when given) and validation scans; validation and test scans keep their own grid, which whole-scan
    inference needs."""
    records = cohort.scans_of(fold.train)
    if scan_cache is not None:
        train = [
            cached_training_scan(scan, cohort.modalities, cohort.rater, patch_size, scan_cache) for scan in records
        ]
    else:
        train = [load_scan(scan, cohort.modalities, cohort.rater) for scan in records]
    validation = [load_scan(scan, cohort.modalities, cohort.rater) for scan in cohort.scans_of(fold.validation)]
    return FoldData(cohort, fold, train, validation)


@dataclass(frozen=True)
class EpochReport:
    """What one epoch reports. Every worker of a data-parallel group reports every epoch, the same number of times."""

    epoch: int
    # NaN for an epoch reported again without training (resumed from the final checkpoint, whose report was lost).
    train_loss: float
    lr: float
    # The epoch of the training state this run started from (0: none).
    resumed_from_epoch: int
    # Validation epochs: the Dice of this epoch's weights and the best so far (whose weights are kept).
    validation_dice: float | None = None
    best_validation_dice: float | None = None
    # The last epoch: the best weights' scores on every split (`split_metrics`).
    final_metrics: Mapping[str, float] | None = None
    # Seconds spent compiling (torch.compile) since the previous report: the first epoch's training step and the
    # first validation's sampler, then the final evaluation's; None when nothing was compiled.
    compile_seconds: float | None = None
    # The report of the checkpoint a run resumed from, made again before training on: whoever decides on reports
    # (a scheduler pausing folds at rungs) may never have received it, when the run that made it was stopped while
    # the report was on its way. Its checkpoint folder is the one resumed from (None is passed).
    replayed: bool = False
    # The last epoch: where this run's seconds went, by phase (PHASES; the final evaluation's by protocol).
    phase_seconds: Mapping[str, float] | None = None


# Called with each epoch's report and, on rank 0 at a validation, the checkpoint folder, which is deleted after the
# call returns: keep what is wanted of it inside the call.
Report = Callable[[EpochReport, "Path | None"], None]


class TrainingObserver(Protocol):
    """Watches the training: each training epoch as a block, and each validation's Dice."""

    def training_epoch(self, epoch: int, steps: int, samples: int) -> contextlib.AbstractContextManager[None]: ...

    def record_validation(self, dice: float) -> None: ...


class _Unobserved:
    def training_epoch(self, epoch: int, steps: int, samples: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def record_validation(self, dice: float) -> None:
        pass


@dataclass(frozen=True)
class Parallelism:
    """How the training data and the network are spread over a data-parallel group; the default is one process
    with the whole data (Ray Train's `prepare_data_loader` and `prepare_model` shard and wrap for several)."""

    prepare_loader: Callable[[torch.utils.data.DataLoader], torch.utils.data.DataLoader] = lambda loader: loader
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda net: net


@dataclass(frozen=True)
class FoldResult:
    """The network holding the best weights, their validation Dice, and the final evaluation: split scores and
    per-scan rows (`split`, `scan`, `strategy`, metrics, lesion volumes)."""

    net: torch.nn.Module
    best_validation_dice: float
    metrics: Mapping[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)


def load_training_state(folder: Path, device: torch.device) -> dict[str, Any]:
    """The training state of a checkpoint folder written by `run_fold`, to resume from."""
    return torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)


def run_fold(
    config: FoldConfig,
    data: FoldData,
    device: torch.device,
    *,
    report: Report | None = None,
    resume: Mapping[str, Any] | None = None,
    parallel: Parallelism = Parallelism(),
    observer: TrainingObserver | None = None,
    model_metadata: Mapping[str, Any] | None = None,
    label: str | None = None,
    compile_backend: str = DEFAULT_BACKEND,
) -> FoldResult:
    """Train, validate every `validate_every` epochs and at the end, keep the best weights, evaluate them.

    ``resume``: a training state (`load_training_state`) to continue from. ``model_metadata`` is saved with the best
    weights (the orchestrator records the trial's spec there). Seeds follow `TrainingConfig.seed` and the rank, so a
    run is repeatable for the same data and device. With `TrainingConfig.compile` on, the network is compiled once
    for the fold's training and once for its sampling, by ``compile_backend`` (tests use "aot_eager").
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    training = config.training
    observer = observer or _Unobserved()
    label = label or f"{config.network.backbone} fold {data.fold.index}"
    torch.manual_seed(training.seed + rank)
    np.random.seed(training.seed + rank)
    autocast_dtype = training_autocast_dtype(device, training.precision)

    dataset = training_dataset(
        data.train, training.patch_size, training.lesion_patch_fraction, seed=training.seed + rank
    )
    # list_data_collate: lesion-biased sampling yields a list of one sample per scan. An incomplete last batch is
    # dropped, as the reference does (and batch norm in training needs more than one sample where the paper U-Net's
    # deepest squeeze-attention block pools a 32^3 patch down to one voxel), unless it is the only batch.
    loader = parallel.prepare_loader(
        torch.utils.data.DataLoader(
            dataset, batch_size=training.batch_size, shuffle=True, num_workers=0, collate_fn=list_data_collate,
            drop_last=len(dataset) > training.batch_size,
        )
    )
    net = parallel.prepare_model(build_network(config.network).to(device))
    bare_net = net.module if hasattr(net, "module") else net
    # Compiled in place: the bare net's forward, inside DDP's eager one; its sampling calls (`compilation`).
    compiling = compile_wanted(training.compile, device)
    if compiling:
        compile_for_training(bare_net, compile_backend)
    sampler: torch.nn.Module | CompiledDenoiser = (
        compiled_denoiser(bare_net, compile_backend) if compiling else bare_net
    )
    compiled_before = compile_seconds_so_far()

    def compile_seconds() -> float | None:
        """Seconds compiled since the last call (None when compilation is off or nothing was compiled)."""
        nonlocal compiled_before
        if not compiling:
            return None
        now = compile_seconds_so_far()
        seconds, compiled_before = now - compiled_before, now
        if seconds > 0:
            log.info("%s: compiled in %.1f s", label, seconds)
        return seconds or None

    # This worker's share of the validation scans, preprocessed once for every validation.
    rank_count = dist.get_world_size() if dist.is_initialized() else 1
    validation_groups = prepare_validation(
        data.validation, range(rank, len(data.validation), rank_count), config.validation, device
    )
    optimizer = training_optimizer(net.parameters(), training.lr, training.weight_decay, device, training.optimizer)
    lr_schedule, per_epoch = training_schedule(optimizer, training, len(loader))

    def epoch_lr(epoch: int) -> float:
        """The learning rate reported for ``epoch``: per epoch, the rate it trained at; per step, the rate after
        its last step."""
        return lr_schedule.rate_of_epoch(epoch) if per_epoch else lr_schedule.get_last_lr()[0]

    start_epoch, best_score, best_state = 0, initial_best_score(training.best_checkpoint), None
    if resume is not None:
        bare_net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        lr_schedule.load_state_dict(resume["lr_schedule"])
        start_epoch, best_score, best_state = resume["epoch"], resume["best_score"], resume["best_model"]
        log.info("%s: resumed at epoch %d (best validation Dice %.4f)", label, start_epoch, best_score)

    epochs = range(start_epoch + 1, training.epochs + 1)
    if epochs and resume is not None and report is not None and "validation_dice" in resume:
        report(
            EpochReport(
                start_epoch, resume["train_loss"], epoch_lr(start_epoch), start_epoch,
                resume["validation_dice"], best_score, replayed=True,
            ),
            None,
        )
    if not epochs:
        # Resumed from the final checkpoint, whose report never arrived (its driver died first): the last validation
        # and the final evaluation are made and reported again, without training.
        epochs = range(training.epochs, training.epochs + 1)
    final_metrics: Mapping[str, float] = {}
    final_rows: list[dict[str, Any]] = []
    started = time.monotonic()
    phase_seconds = dict.fromkeys((TRAINING_PHASE, VALIDATION_PHASE), 0.0)
    for epoch in epochs:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if epoch > start_epoch:
            # This worker's share of the samples (DistributedSampler with several workers), less a dropped last batch.
            samples = len(loader) * training.batch_size if loader.drop_last else len(loader.sampler)
            began = time.monotonic()
            with observer.training_epoch(epoch, steps=len(loader), samples=samples):
                loss = float(
                    train_epoch(
                        net, loader, optimizer, None if per_epoch else lr_schedule, device, config.diffusion,
                        training.loss_weights, autocast_dtype,
                    )
                )
            phase_seconds[TRAINING_PHASE] += time.monotonic() - began
            if per_epoch:
                lr_schedule.step()
        else:
            # Resumed from the final checkpoint: that epoch was trained by the run that saved it, and its loss with it.
            loss = resume.get("train_loss", math.nan) if resume is not None else math.nan
        lr = epoch_lr(epoch)
        if epoch % training.validate_every and epoch != training.epochs:
            log.info("%s: epoch %d/%d loss %.4f", label, epoch, training.epochs, loss)
            if report is not None:
                report(EpochReport(epoch, loss, lr, start_epoch, compile_seconds=compile_seconds()), None)
            continue
        began = time.monotonic()
        score = float(np.nanmean(
            validate_distributed(
                sampler, validation_groups, len(data.validation), config, device, training.seed + epoch
            )
        ))
        phase_seconds[VALIDATION_PHASE] += time.monotonic() - began
        observer.record_validation(score)
        if keeps_weights(training.best_checkpoint, score, best_score, best_state is not None):
            best_score = score
            best_state = {k: v.detach().clone() for k, v in bare_net.state_dict().items()}
        log.info(
            "%s: epoch %d/%d loss %.4f validation Dice %.4f (best %.4f, %.0f s)",
            label, epoch, training.epochs, loss, score, best_score, time.monotonic() - started,
        )
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            # The last validation also carries the final evaluation, in the same report: a scheduler that stops the
            # trial on this report cannot cut the evaluation off.
            last = epoch == training.epochs
            if last:
                if best_state is not None:
                    bare_net.load_state_dict(best_state)
                else:
                    # The reference's rule kept no weights (no validation beat 0.0): the last weights are evaluated.
                    log.warning("%s: no validation beat a Dice of 0; evaluating the last weights", label)
                evaluation = final_evaluation(
                    sampler, config, data, device, overlay_folder=folder / OVERLAY_DIR if rank == 0 else None
                )
                final_metrics, final_rows = evaluation.metrics, evaluation.rows
                phase_seconds.update(evaluation.seconds)
                log.info("%s: done, best validation Dice %.4f", label, best_score)
            if rank == 0:
                torch.save(
                    {
                        "model": bare_net.state_dict(),
                        "best_model": best_state,
                        "optimizer": optimizer.state_dict(),
                        "lr_schedule": lr_schedule.state_dict(),
                        "epoch": epoch,
                        "best_score": best_score,
                        # This epoch's own report, which a run resuming from here makes again (`replayed`).
                        "validation_dice": score,
                        "train_loss": loss,
                    },
                    folder / STATE_FILE,
                )
                if last:
                    save_checkpoint(folder / MODEL_DIR, bare_net, dict(model_metadata or {}))
                    (folder / SCAN_METRICS_FILE).write_text(json.dumps(final_rows, indent=1))
                    if evaluation.retention_rows:
                        (folder / RETENTION_CURVES_FILE).write_text(
                            json.dumps(
                                {"fractions": retention_fractions().tolist(), "curves": evaluation.retention_rows}
                            )
                        )
            if report is not None:
                report(
                    EpochReport(
                        epoch, loss, lr, start_epoch, score, best_score, final_metrics if last else None,
                        compile_seconds=compile_seconds(), phase_seconds=dict(phase_seconds) if last else None,
                        # Resumed from the final checkpoint: its report may have been recorded before the driver
                        # stopped, so the record keeps it once.
                        replayed=epoch == start_epoch,
                    ),
                    folder if rank == 0 else None,
                )
    return FoldResult(bare_net, best_score, final_metrics, final_rows)


def training_schedule(
    optimizer: torch.optim.Optimizer, training: TrainingConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The learning-rate schedule of `TrainingConfig.schedule` and whether it is stepped per epoch (else after every
    batch, by `train_epoch`)."""
    if training.schedule == "per-epoch":
        return reference_schedule(optimizer, training.epochs, training.warmup_fraction), True
    total_steps = training.epochs * steps_per_epoch
    return (
        WarmupCosineSchedule(optimizer, warmup_steps=int(training.warmup_fraction * total_steps), t_total=total_steps),
        False,
    )


@dataclass(frozen=True)
class FinalEvaluation:
    metrics: dict[str, float]  # split scores
    rows: list[dict[str, Any]]  # per scan and strategy: protocol, split, scan, strategy, then the metrics
    # per scan, strategy and uncertainty measure: split, scan, strategy, measure, and "ndsc", its retention curve
    retention_rows: list[dict[str, Any]]
    seconds: dict[str, float]  # per protocol (`evaluation_phase`)


def final_evaluation(
    net: torch.nn.Module | CompiledDenoiser,
    config: FoldConfig,
    data: FoldData,
    device: torch.device,
    overlay_folder: Path | None,
) -> FinalEvaluation:
    """Every strategy on the validation and the test scans under the fold's protocol, and on the test scans under
    each compared one: split scores, per-scan rows, the retention curves of the fold's protocol's masks under its
    uncertainty measures, and the seconds each protocol took.

    The fold's protocol's scores are `{split}/{strategy}/{metric}`, a compared protocol's
    `{protocol}/test/{strategy}/{metric}` (`protocol_prefix`); each row names its protocol. With `overlay_folder`
    (rank 0's), also an overlay PNG of each split's first scan under the fold's protocol, so the fold's record shows
    what its numbers look like.
    """
    # The strategy the fold was validated with, when the final evaluation runs it.
    overlay_strategy = config.training.validation_strategy
    if overlay_strategy not in config.evaluation.strategies:
        overlay_strategy = config.evaluation.strategies[0]
    scans = {"val": data.validation, "test": data.load("test")}
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    retention_rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for evaluation in (config.evaluation, *config.compared):
        began = time.monotonic()
        primary = evaluation is config.evaluation
        protocol_rows: list[dict[str, Any]] = []
        for split in EVALUATED_SPLITS if primary else ("test",):
            split_scans, records = scans[split], data.records(split)
            draw_example = None
            if primary and overlay_folder is not None and split_scans:
                draw_example = functools.partial(
                    write_example_overlay, overlay_folder, data.cohort, split, records[0], split_scans[0],
                    overlay_strategy
                )
            per_scan = evaluate_distributed(
                net, split_scans, evaluation, device, config.diffusion,
                inference_autocast_dtype(evaluation.protocol, device),
                seed=config.training.seed + 10_000, on_first_scan=draw_example,
            )
            protocol_rows.extend(
                {
                    "protocol": evaluation.protocol, "split": split, "scan": record.scan_id, "strategy": strategy,
                    **values
                }
                for record, (scan_metrics, _) in zip(records, per_scan, strict=True)
                for strategy, values in scan_metrics.items()
            )
            retention_rows.extend(
                {"split": split, "scan": record.scan_id, "strategy": strategy, "measure": measure,
                 "ndsc": np.round(curve, 6).tolist()}
                for record, (_, retention) in zip(records, per_scan, strict=True)
                for strategy, curves in retention.items()
                for measure, curve in curves.items()
            )
        prefix = protocol_prefix(None if primary else evaluation.protocol)
        metrics.update({prefix + key: value for key, value in split_metrics(protocol_rows).items()})
        rows.extend(protocol_rows)
        seconds[evaluation_phase(evaluation.protocol)] = time.monotonic() - began
    return FinalEvaluation(metrics, rows, retention_rows, seconds)


def evaluation_phase(protocol: str) -> str:
    """The phase of a fold's final evaluation under ``protocol`` (its own split under the fold's protocol, the test
    scans under a compared one)."""
    return f"evaluation_{protocol}"


def write_example_overlay(
    folder: Path, cohort: Cohort, split: str, record: Scan, scan: LoadedScan, strategy: str, evaluation: ScanEvaluation
) -> None:
    folder.mkdir(exist_ok=True)
    write_overlay(
        folder / f"{split}-{record.scan_id}-{strategy}.png",
        scan.image[overlay_channel(cohort.modalities)],
        evaluation.masks[strategy].astype(bool),
        scan.mask.astype(bool),
        f"{split} {record.scan_id} [{strategy}]",
        f"rater {cohort.rater}",
    )


def validate_distributed(
    net: torch.nn.Module | CompiledDenoiser,
    groups: Sequence[ValidationGroup],
    scan_count: int,
    config: FoldConfig,
    device: torch.device,
    seed: int,
) -> list[float]:
    """Each validation scan's Dice (`engine.validation_dice`; each worker samples its own groups), gathered back
    in scan order; only the numbers travel."""
    validation = config.validation
    mine = validation_dice(
        net, groups, validation, config.diffusion, seed, inference_autocast_dtype(validation.protocol, device)
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        mine = {index: value for part in gathered for index, value in part.items()}
    return [mine[index] for index in range(scan_count)]


def evaluate_distributed(
    net: torch.nn.Module | CompiledDenoiser,
    scans: Sequence[LoadedScan],
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig,
    autocast_dtype: torch.dtype | None,
    seed: int,
    on_first_scan: Callable[[ScanEvaluation], None] | None = None,
) -> list[tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]]:
    """Per-scan metrics and retention curves (`ScanEvaluation`), scans shared out over the workers of a process
    group and gathered back in scan order.

    `on_first_scan` gets the first scan's evaluation, masks included, on the worker that evaluates it (rank 0);
    only metrics and curves travel between workers.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    generator = torch.Generator(device=device)
    mine = {}
    for index in range(rank, len(scans), world_size):
        generator.manual_seed(seed + index)
        evaluation = evaluate_scan(net, scans[index], config, device, diffusion, generator, autocast_dtype)
        if index == 0 and on_first_scan is not None:
            on_first_scan(evaluation)
        mine[index] = (evaluation.metrics, evaluation.retention)
    if world_size > 1:
        gathered: list[dict] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        mine = {index: value for part in gathered for index, value in part.items()}
    return [mine[index] for index in range(len(scans))]
