"""Training epochs and whole-scan segmentation, free of any orchestration.

The orchestrator's Ray Train workers call these; so can a notebook or a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import CacheDataset

from .compilation import CompiledDenoiser
from .data.cache import PreparedScan, prepare_loaded_scan
from .data.cohort import LoadedScan
from .data.transforms import GridRestore, augmentation_transforms, prepare_scan_for_inference
from .diffusion import DiffusionConfig, LossWeights, diffusion_loss, sample_scan_fused
from .metrics import lesion_volumes, segmentation_metrics, uncertainty_scores
from .protocols import PROTOCOLS
from .uncertainty import UNCERTAINTY_MEASURES, ChainStatistics, chain_statistics, uncertainty_maps


@dataclass(frozen=True)
class InferenceConfig:
    ddim_steps: int = 10
    samples: int = 4
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    sw_batch_size: int = 4
    strategies: tuple[str, ...] = ("last", "mean", "mean-var", "staple", "uncertainty", "majority")
    connectivity: int = 6
    # The inference protocol (protocols.PROTOCOLS): how the trajectories are sampled and fused.
    protocol: str = "msx"
    # Uncertainty measures (uncertainty.UNCERTAINTY_MEASURES) an evaluation scores each strategy's mask under (nDSC
    # R-AAC, metrics.uncertainty_scores); none: no Shifts scores.
    uncertainty_measures: tuple[str, ...] = ("total", "data", "knowledge", "steps")


def training_dataset(
    scans: Sequence[LoadedScan | PreparedScan],
    patch_size: tuple[int, int, int],
    lesion_patch_fraction: float = 0.0,
    seed: int | None = None,
) -> CacheDataset:
    """Scans preprocessed once, then cropped and augmented afresh on every access.

    Loaded scans are preprocessed here, in memory; prepared ones (``data.cache``) are used as they are.
    With ``lesion_patch_fraction`` above 0 an item is a list of one sample: batch with
    ``monai.data.list_data_collate`` (which batches plain samples exactly like PyTorch's default).
    ``seed`` fixes the patches and augmentations drawn; MONAI's random transforms otherwise seed from the OS.
    """
    prepared = [scan if isinstance(scan, PreparedScan) else prepare_loaded_scan(scan, patch_size) for scan in scans]
    items = [{"image": torch.from_numpy(scan.image), "label": torch.from_numpy(scan.label)} for scan in prepared]
    # CacheDataset keeps what the augmentation's deterministic head computes per scan (the lesion-sampling
    # centres). No later transform writes into its input, so the cached sample is not copied per access.
    augmentation = augmentation_transforms(patch_size, lesion_patch_fraction)
    if seed is not None:
        augmentation.set_random_state(seed=seed)
    return CacheDataset(
        items, transform=augmentation, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False
    )


# Training numerics (`TrainingConfig.precision`): "auto" trains in bf16 autocast on a GPU and in float32 elsewhere
# (msx's fast path); "fp32" never autocasts (the reference's); "bf16" autocasts to bf16 on every device.
PRECISIONS = ("auto", "fp32", "bf16")
# The optimizer (`TrainingConfig.optimizer`), AdamW in every case: "auto" is fused on a GPU (one kernel for all
# parameters) and PyTorch's default (for-each) implementation elsewhere; "adamw" is PyTorch's default everywhere
# (the reference's); "adamw-fused" is fused everywhere.
OPTIMIZERS = ("auto", "adamw", "adamw-fused")
# Seeds the random uncertainty an evaluation scores beside the measures (metrics.RANDOM_UNCERTAINTY).
RANDOM_UNCERTAINTY_SEED = 0


def check_choice(value: object, valid: tuple[str, ...], name: str) -> None:
    """A ValueError naming the setting ``name`` and the valid names unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise ValueError(f"{name}: unknown name {value!r}; valid names: {', '.join(valid)}")


def training_autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of training under ``precision`` (`PRECISIONS`), None for float32: by default bf16 autocast
    on a GPU (tensor cores, half the activation traffic) and float32 on the CPU."""
    check_choice(precision, PRECISIONS, "precision")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def training_optimizer(
    parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device, kind: str = "auto"
) -> torch.optim.AdamW:
    """AdamW, by default fused on a GPU: one kernel for all parameters instead of several per parameter tensor
    (``kind``: `OPTIMIZERS`)."""
    check_choice(kind, OPTIMIZERS, "optimizer")
    fused = {"auto": device.type == "cuda", "adamw": False, "adamw-fused": True}[kind]
    # fused=None: PyTorch's default implementation (for-each where it applies), which the reference trains with.
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def train_step(
    net: torch.nn.Module,
    image: torch.Tensor,
    mask: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    diffusion: DiffusionConfig = DiffusionConfig(),
    loss_weights: LossWeights = LossWeights(),
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch already on the net's device; returns the detached loss, unread.

    Nothing here waits for the device, so the host can queue the next step while this one runs.
    """
    with torch.autocast(image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = diffusion_loss(net, image, mask, diffusion, weights=loss_weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(
    net: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device,
    diffusion: DiffusionConfig = DiffusionConfig(),
    loss_weights: LossWeights = LossWeights(),
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One pass over the loader, stepping ``lr_schedule`` after every batch (None: a schedule stepped per epoch, by
    the caller); returns the mean loss as a device tensor (read it once per epoch)."""
    net.train()
    total = torch.zeros((), device=device)
    batches = 0
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["label"].to(device, non_blocking=True)
        total += train_step(net, image, mask, optimizer, diffusion, loss_weights, autocast_dtype)
        if lr_schedule is not None:
            lr_schedule.step()
        batches += 1
    return total / max(batches, 1)


@dataclass(frozen=True)
class ScanSegmentation:
    """Every configured strategy's mask and the lesion maps, all on the input grid from one sampling pass."""

    masks: dict[str, np.ndarray]  # strategy -> bool (X, Y, Z)
    # float32 (X, Y, Z), zero outside the foreground crop: the lesion probability and every uncertainty measure's
    # map follow (uncertainty.lesion_maps), and they pool over fold models (uncertainty.pooled_statistics).
    statistics: ChainStatistics[np.ndarray]


def _batch_scores(
    net: torch.nn.Module | CompiledDenoiser,
    images: torch.Tensor,
    config: InferenceConfig,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
    with_statistics: bool = False,
) -> tuple[dict[str, torch.Tensor], list[ChainStatistics[torch.Tensor]]]:
    """Each strategy's fused map (lesion where the protocol's `mask` says) for each of the prepared scans ``images``
    (B,C,X,Y,Z, on the net's device, one shape) and, when asked, each scan's chain statistics (empty list otherwise),
    from ONE sampling pass under the config's protocol, the windows of all scans batched together."""
    protocol = PROTOCOLS.get(config.protocol)
    for name in config.strategies:
        protocol.strategy(name)  # a typo fails here, with the valid names, before any sampling
    net.eval()
    sampling = dict(
        num_steps=config.ddim_steps, num_samples=config.samples, roi_size=config.roi_size, overlap=config.overlap,
        sw_batch_size=config.sw_batch_size, config=diffusion, generator=generator, autocast_dtype=autocast_dtype,
        x0=protocol.x0, pad_windows=isinstance(net, CompiledDenoiser),  # one shape per call: no recompilation
    )
    if not protocol.fuse_per_window:
        # (B, steps * samples, *spatial): every step of every chain stitched, the strategies fused afterwards.
        stitched = sample_scan_fused(net, images, fuse=lambda trajectories: trajectories.flatten(1, 2), **sampling)
        per_scan = [step_logits.view(config.ddim_steps, config.samples, *images.shape[2:]) for step_logits in stitched]
        scores = [protocol.scores(step_logits, config.strategies) for step_logits in per_scan]
        statistics = [chain_statistics(step_logits) for step_logits in per_scan] if with_statistics else []
        return {name: torch.stack([scan[name] for scan in scores]) for name in config.strategies}, statistics

    def fuse(windows: torch.Tensor) -> torch.Tensor:
        """(windows, steps, samples, *roi) -> (windows, strategies + statistics, *roi), stitched afterwards."""
        fused = []
        for step_logits in windows:
            maps = list(protocol.scores(step_logits, config.strategies).values())
            if with_statistics:
                maps += chain_statistics(step_logits).values()
            fused.append(torch.stack([m.float() for m in maps]))
        return torch.stack(fused)

    stitched = sample_scan_fused(net, images, fuse=fuse, **sampling)
    strategies = len(config.strategies)
    scores = {name: stitched[:, index] for index, name in enumerate(config.strategies)}
    statistics = [ChainStatistics(*scan[strategies:]) for scan in stitched] if with_statistics else []
    return scores, statistics


def _scan_scores(
    net: torch.nn.Module | CompiledDenoiser,
    image: np.ndarray,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
    with_statistics: bool = False,
) -> tuple[dict[str, torch.Tensor], ChainStatistics[np.ndarray] | None, GridRestore]:
    """`_batch_scores` of one scan given on its own grid: the scores on the preprocessed grid, the chain statistics
    (when asked) on the input grid, and the map back."""
    prepared, grid = prepare_scan_for_inference(image, config.roi_size)
    scores, statistics = _batch_scores(
        net, prepared[None].to(device), config, diffusion, generator, autocast_dtype, with_statistics
    )
    restored = (
        ChainStatistics(*(grid.restore(value.float().cpu().numpy()) for value in statistics[0].values()))
        if statistics else None
    )
    return {name: score[0] for name, score in scores.items()}, restored, grid


def _restored_masks(scores: dict[str, torch.Tensor], grid: GridRestore, protocol: str) -> dict[str, np.ndarray]:
    """Each map's mask by the protocol's rule, on the input grid. A NaN score (the reference's STAPLE over a window
    where no step votes lesion) is background under both rules."""
    rule = PROTOCOLS.get(protocol).mask
    return {name: grid.restore(rule(score).cpu().numpy()) for name, score in scores.items()}


def segment_scan(
    net: torch.nn.Module,
    image: np.ndarray,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """Masks of every configured strategy, on the input grid, from ONE sampling pass over the scan."""
    scores, _, grid = _scan_scores(net, image, config, device, diffusion, generator, autocast_dtype)
    return _restored_masks(scores, grid, config.protocol)


def segment_scan_with_maps(
    net: torch.nn.Module,
    image: np.ndarray,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ScanSegmentation:
    """``segment_scan``'s masks (the same, for the same generator state) plus the chain statistics that the lesion
    probability and uncertainty maps follow from (``uncertainty.lesion_maps``), all from ONE sampling pass over the
    scan.
    """
    scores, statistics, grid = _scan_scores(net, image, config, device, diffusion, generator, autocast_dtype, True)
    assert statistics is not None
    return ScanSegmentation(masks=_restored_masks(scores, grid, config.protocol), statistics=statistics)


@dataclass(frozen=True)
class ScanEvaluation:
    """Every configured strategy's metrics against the scan's mask, the masks they were measured on, and with
    uncertainty measures their nDSC retention curves."""

    # strategy -> METRIC_NAMES, then the lesion volumes in mm^3 (VOLUME_NAMES) the ISBI score correlates over scans,
    # then with uncertainty measures the Shifts scores (metrics.ShiftsScores.scores)
    metrics: dict[str, dict[str, float]]
    masks: dict[str, np.ndarray]  # strategy -> (X, Y, Z), on the scan's grid
    # strategy -> measure (and metrics.RANDOM_UNCERTAINTY) -> nDSC at each of metrics.retention_fractions(); empty
    # without uncertainty measures
    retention: dict[str, dict[str, np.ndarray]]


def evaluate_scan(
    net: torch.nn.Module,
    scan: LoadedScan,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ScanEvaluation:
    """Segment the scan (one sampling pass) and measure every strategy's mask against the scan's mask; with the
    config's uncertainty measures, also the Shifts scores (`metrics.uncertainty_scores`) of each mask under each
    measure's map, from the same pass."""
    measures = config.uncertainty_measures
    for name in measures:
        UNCERTAINTY_MEASURES.get(name)  # a typo fails here, with the valid names, before any sampling
    scores, statistics, grid = _scan_scores(
        net, scan.image, config, device, diffusion, generator, autocast_dtype, bool(measures)
    )
    masks = _restored_masks(scores, grid, config.protocol)
    truth = scan.mask.astype(bool)
    metrics = {
        name: {
            **segmentation_metrics(mask.astype(bool), truth, spacing=scan.spacing, connectivity=config.connectivity),
            **lesion_volumes(mask, truth, scan.spacing),
        }
        for name, mask in masks.items()
    }
    retention: dict[str, dict[str, np.ndarray]] = {}
    if statistics is not None:
        uncertainty = uncertainty_maps(statistics, measures)
        # Shifts ranks the brain's voxels: here the images' foreground (any channel > 0), which inference crops to.
        # The random row's voxel order is one draw per scan, the same for every strategy.
        brain = (scan.image > 0).any(axis=0)
        random_order = np.random.default_rng(RANDOM_UNCERTAINTY_SEED).random(truth.shape)
        for name, mask in masks.items():
            shifts = uncertainty_scores(mask, truth, uncertainty, random_order, brain, config.connectivity)
            metrics[name].update(shifts.scores)
            retention[name] = shifts.curves
    return ScanEvaluation(metrics=metrics, masks=masks, retention=retention)


def inference_autocast_dtype(protocol: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for sampling on a GPU, unless the protocol keeps the reference code's float32 numerics."""
    return None if PROTOCOLS.get(protocol).reference_numerics else training_autocast_dtype(device)


@dataclass(frozen=True)
class ValidationGroup:
    """Validation scans sampled in one pass, on the device: their preprocessed images on one grid, their masks
    on it (False outside each scan's own voxels), where each scan's own voxels are, and its lesion voxels."""

    indices: tuple[int, ...]  # the scans' positions in the fold's validation list
    images: torch.Tensor  # (B, C, X, Y, Z) float32
    truth: torch.Tensor  # (B, X, Y, Z) bool
    inside: torch.Tensor  # (B, X, Y, Z) bool: the scan's crop (not the padding around it)
    # (B,) lesion voxels of each whole mask, on its input grid: lesion outside the foreground crop, which no
    # prediction reaches, counts as missed.
    truth_voxels: torch.Tensor
    grids: tuple[GridRestore, ...]


def prepare_validation(
    scans: Sequence[LoadedScan], indices: Sequence[int], config: InferenceConfig, device: torch.device
) -> list[ValidationGroup]:
    """The scans ``indices`` of ``scans`` preprocessed once per fold, on the device, for `validation_dice`.

    Under a protocol with `reference_numerics` each scan is its own group, sampled on its own grid as the
    reference code does. Otherwise all of them form one group, each scan padded at the far end of every axis to
    the largest preprocessed shape among them, so that MONAI's sliding window batches the windows of all scans
    together (full batches instead of one short batch per scan; fewer, larger network calls). The cost: windows
    over padding (`benchmarks/validation.py` counts them), and windows placed on the padded grid rather than the
    scan's own, so validation's numbers differ from the per-scan final evaluation's by where windows overlap.
    """
    prepared = [prepare_scan_for_inference(scans[index].image, config.roi_size) for index in indices]
    if PROTOCOLS.get(config.protocol).reference_numerics:
        groups = [[position] for position in range(len(prepared))]
    else:
        groups = [list(range(len(prepared)))] if prepared else []
    result = []
    for group in groups:
        shape = tuple(max(prepared[p][1].prepared_shape[axis] for p in group) for axis in range(3))
        images, truth, inside, truth_voxels = [], [], [], []
        for position in group:
            image, grid = prepared[position]
            mask = scans[indices[position]].mask.astype(bool)
            own = tuple(slice(0, side) for side in grid.prepared_shape)
            padded = torch.zeros((image.shape[0], *shape), dtype=torch.float32)
            padded[(slice(None), *own)] = image
            images.append(padded)
            box = tuple(slice(s, e) for s, e in zip(grid.crop_start, grid.crop_end, strict=True))
            placed = tuple(
                slice(p, p + e - s) for p, s, e in zip(grid.pad_before, grid.crop_start, grid.crop_end, strict=True)
            )
            on_grid = torch.zeros(shape, dtype=torch.bool)
            on_grid[placed] = torch.from_numpy(mask[box])
            truth.append(on_grid)
            crop = torch.zeros(shape, dtype=torch.bool)
            crop[placed] = True
            inside.append(crop)
            truth_voxels.append(int(mask.sum()))
        result.append(
            ValidationGroup(
                indices=tuple(indices[p] for p in group),
                images=torch.stack(images).to(device),
                truth=torch.stack(truth).to(device),
                inside=torch.stack(inside).to(device),
                truth_voxels=torch.tensor(truth_voxels, device=device),
                grids=tuple(prepared[p][1] for p in group),
            )
        )
    return result


def group_scores(
    net: torch.nn.Module | CompiledDenoiser,
    group: ValidationGroup,
    config: InferenceConfig,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Each strategy's fused map over the group's grid, (B, X, Y, Z): what `validation_dice` turns into masks."""
    return _batch_scores(net, group.images, config, diffusion, generator, autocast_dtype)[0]


def validation_dice(
    net: torch.nn.Module | CompiledDenoiser,
    groups: Sequence[ValidationGroup],
    config: InferenceConfig,
    diffusion: DiffusionConfig,
    seed: int,
    autocast_dtype: torch.dtype | None,
) -> dict[int, float]:
    """The Dice of ``config``'s first strategy on each validation scan, by its index: computed on the device on
    the preprocessed grid, only the numbers copied to the host.

    It equals `segmentation_metrics`' dsc of the mask restored to the scan's grid (the same voxels: the crop's,
    the lesion outside it counted as missed; 1 when both are empty). Each group's generator is seeded with
    ``seed`` plus its first scan's index (a group of one scan: as `evaluate_scan` is seeded per scan).
    """
    strategy = config.strategies[0]
    rule = PROTOCOLS.get(config.protocol).mask
    device = groups[0].images.device if groups else torch.device("cpu")
    generator = torch.Generator(device=device)
    dice = []
    for group in groups:
        generator.manual_seed(seed + group.indices[0])
        predicted = (
            rule(group_scores(net, group, config, diffusion, generator, autocast_dtype)[strategy]) & group.inside
        )
        overlap = (predicted & group.truth).sum(dim=(1, 2, 3))
        volumes = predicted.sum(dim=(1, 2, 3)) + group.truth_voxels
        dice.append(torch.where(volumes > 0, 2 * overlap.double() / volumes.clamp(min=1).double(), 1.0))
    values = torch.cat(dice).tolist() if dice else []
    return dict(zip((index for group in groups for index in group.indices), values, strict=True))
