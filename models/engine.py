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
from .diffusion import DiffusionConfig, LossWeights, diffusion_loss, sample_scan, sample_scan_fused
from .lesion_maps import LesionMaps, binary_entropy_bits, lesion_probability
from .metrics import lesion_volumes, segmentation_metrics
from .protocols import PROTOCOLS


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


def _scan_scores(
    net: torch.nn.Module,
    image: np.ndarray,
    config: InferenceConfig,
    device: torch.device,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
    with_probability: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, GridRestore]:
    """Each strategy's score (lesion where > 0) and, if asked, the lesion probability, on the preprocessed scan's
    grid, from ONE sampling pass under the config's protocol; and the map back to the input grid."""
    protocol = PROTOCOLS.get(config.protocol)
    for name in config.strategies:
        protocol.strategy(name)  # a typo fails here, with the valid names, before any sampling
    net.eval()
    prepared, grid = prepare_scan_for_inference(image, config.roi_size)
    sampling = dict(
        num_steps=config.ddim_steps, num_samples=config.samples, roi_size=config.roi_size, overlap=config.overlap,
        sw_batch_size=config.sw_batch_size, config=diffusion, generator=generator, autocast_dtype=autocast_dtype,
        x0=protocol.x0,
    )
    if not protocol.fuse_per_window:
        step_logits = sample_scan(net, prepared.to(device), **sampling)
        probability = lesion_probability(step_logits) if with_probability else None
        return protocol.scores(step_logits, config.strategies), probability, grid

    def fuse(windows: torch.Tensor) -> torch.Tensor:
        """(windows, steps, samples, *roi) -> (windows, strategies [+ probability], *roi), stitched afterwards."""
        fused = []
        for step_logits in windows:
            maps = list(protocol.scores(step_logits, config.strategies).values())
            if with_probability:
                maps.append(lesion_probability(step_logits))
            fused.append(torch.stack([m.float() for m in maps]))
        return torch.stack(fused)

    stitched = sample_scan_fused(net, prepared.to(device), fuse=fuse, **sampling)
    scores = dict(zip(config.strategies, stitched))
    return scores, stitched[len(config.strategies)] if with_probability else None, grid


def _restored_masks(scores: dict[str, torch.Tensor], grid: GridRestore) -> dict[str, np.ndarray]:
    # A NaN score (the reference's STAPLE over a window where no step votes lesion) is background.
    return {name: grid.restore((score > 0).cpu().numpy()) for name, score in scores.items()}


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
    scores, _, grid = _scan_scores(net, image, config, device, diffusion, generator, autocast_dtype, False)
    return _restored_masks(scores, grid)


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
    scores, probability, grid = _scan_scores(net, image, config, device, diffusion, generator, autocast_dtype, True)
    return ScanSegmentation(
        masks=_restored_masks(scores, grid),
        maps=LesionMaps(
            probability=grid.restore(probability.cpu().numpy()),
            uncertainty=grid.restore(binary_entropy_bits(probability).cpu().numpy()),
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
