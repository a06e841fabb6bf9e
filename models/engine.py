"""Training epochs and whole-scan segmentation, free of any orchestration.

The orchestrator's Ray Train workers call these; so can a notebook or a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.data import CacheDataset

from .data.cache import PreparedScan, prepare_loaded_scan
from .data.cohort import LoadedScan
from .data.transforms import GridRestore, augmentation_transforms, prepare_scan_for_inference
from .diffusion import DiffusionConfig, LossWeights, diffusion_loss, sample_scan
from .lesion_maps import LesionMaps, lesion_maps
from .metrics import lesion_volumes, segmentation_metrics
from .strategies import fuse_all


@dataclass(frozen=True)
class InferenceConfig:
    ddim_steps: int = 10
    samples: int = 4
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.5
    sw_batch_size: int = 4
    strategies: tuple[str, ...] = ("last", "mean", "mean-var", "staple", "uncertainty", "majority")
    connectivity: int = 6


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


def training_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU (tensor cores, half the activation traffic); float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def training_optimizer(
    parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused on a GPU: one kernel for all parameters instead of several per parameter tensor."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


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
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    diffusion: DiffusionConfig = DiffusionConfig(),
    loss_weights: LossWeights = LossWeights(),
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One pass over the loader; returns the mean loss as a device tensor (read it once per epoch)."""
    net.train()
    total = torch.zeros((), device=device)
    batches = 0
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["label"].to(device, non_blocking=True)
        total += train_step(net, image, mask, optimizer, diffusion, loss_weights, autocast_dtype)
        lr_schedule.step()
        batches += 1
    return total / max(batches, 1)


@dataclass(frozen=True)
class ScanSegmentation:
    """Every configured strategy's mask and the lesion maps, all on the input grid from one sampling pass."""

    masks: dict[str, np.ndarray]  # strategy -> bool (X, Y, Z)
    maps: LesionMaps[np.ndarray]  # float32 (X, Y, Z), zero outside the foreground crop


def _sample_scan_trajectories(
    net: torch.nn.Module,
    image: np.ndarray,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, GridRestore]:
    """The step logits (steps, samples, *prepared grid) of the preprocessed scan, and the map back to its grid."""
    net.eval()
    prepared, grid = prepare_scan_for_inference(image, config.roi_size)
    step_logits = sample_scan(
        net,
        prepared.to(device),
        num_steps=config.ddim_steps,
        num_samples=config.samples,
        roi_size=config.roi_size,
        overlap=config.overlap,
        sw_batch_size=config.sw_batch_size,
        config=diffusion,
        generator=generator,
        autocast_dtype=autocast_dtype,
    )
    return step_logits, grid


def _restored_masks(step_logits: torch.Tensor, grid: GridRestore, strategies: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: grid.restore(mask.cpu().numpy()) for name, mask in fuse_all(step_logits, strategies).items()}


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
    step_logits, grid = _sample_scan_trajectories(net, image, config, device, diffusion, generator, autocast_dtype)
    return _restored_masks(step_logits, grid, config.strategies)


def segment_scan_with_maps(
    net: torch.nn.Module,
    image: np.ndarray,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ScanSegmentation:
    """``segment_scan``'s masks (the same, for the same generator state) plus the lesion probability and
    uncertainty maps (``lesion_maps``), all from ONE sampling pass over the scan.
    """
    step_logits, grid = _sample_scan_trajectories(net, image, config, device, diffusion, generator, autocast_dtype)
    maps = lesion_maps(step_logits)
    return ScanSegmentation(
        masks=_restored_masks(step_logits, grid, config.strategies),
        maps=LesionMaps(
            probability=grid.restore(maps.probability.cpu().numpy()),
            uncertainty=grid.restore(maps.uncertainty.cpu().numpy()),
        ),
    )


@dataclass(frozen=True)
class ScanEvaluation:
    """Every configured strategy's metrics against the scan's mask, and the masks they were measured on."""

    # strategy -> METRIC_NAMES, then the lesion volumes in mm^3 (VOLUME_NAMES) the ISBI score correlates over scans
    metrics: dict[str, dict[str, float]]
    masks: dict[str, np.ndarray]  # strategy -> (X, Y, Z), on the scan's grid


def evaluate_scan(
    net: torch.nn.Module,
    scan: LoadedScan,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ScanEvaluation:
    """Segment the scan (one sampling pass) and measure every strategy's mask against the scan's mask."""
    masks = segment_scan(net, scan.image, config, device, diffusion, generator, autocast_dtype)
    truth = scan.mask.astype(bool)
    return ScanEvaluation(
        metrics={
            name: {
                **segmentation_metrics(mask.astype(bool), truth, spacing=scan.spacing, connectivity=config.connectivity),
                **lesion_volumes(mask, truth, scan.spacing),
            }
            for name, mask in masks.items()
        },
        masks=masks,
    )
