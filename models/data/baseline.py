"""The FLAIR threshold baseline: how well one brightness cut finds a cohort's lesions.

A segmentation method earns its keep only above this floor. On real FLAIR a single threshold is
defeated by lesions fainter than the cortex, by periventricular hyperintensity and by bias fields; a
synthetic cohort that a threshold solves cannot tell methods apart. The baseline z-scores each scan's
FLAIR over its brain (the non-zero voxels, as msx's preprocessing does) and picks the one threshold,
shared by all scans, that maximises the mean per-scan Dice against the reference masks. It is
computed from per-scan histograms, so every candidate threshold costs one cumulative sum.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Candidate z-score thresholds: lesions are found, if at all, between the white matter's mean and far
# above it; a 0.02 step is finer than any Dice difference that matters.
_THRESHOLDS = np.arange(-1.0, 10.0, 0.02)


@dataclass(frozen=True)
class ThresholdBaseline:
    """The best single threshold (in z-score units) and the Dice it reaches on each scan."""

    threshold: float
    dices: tuple[float, ...]  # per scan, in input order, at ``threshold``
    best_per_scan: tuple[float, ...]  # per scan, each at its own best threshold (an upper bound)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.dices))


def brain_zscore(flair: np.ndarray) -> np.ndarray:
    """FLAIR z-scored over the brain (its non-zero voxels), as msx's preprocessing does; 0 outside the brain."""
    brain = flair != 0
    if not brain.any():
        raise ValueError("a FLAIR volume has no non-zero (brain) voxel")
    values = flair[brain].astype(np.float64)
    z = np.zeros(flair.shape, dtype=np.float64)
    z[brain] = (values - values.mean()) / max(values.std(), np.finfo(np.float64).tiny)
    return z


def flair_threshold_baseline(scans: Iterable[tuple[np.ndarray, np.ndarray]]) -> ThresholdBaseline:
    """The best global threshold on z-scored FLAIR for ``(flair, mask)`` pairs of any shape.

    The brain is where FLAIR is non-zero; mask voxels outside it count as missed.
    """
    dices = []
    for flair, mask in scans:
        if flair.shape != mask.shape:
            raise ValueError(f"FLAIR has shape {flair.shape} but its mask {mask.shape}")
        brain = flair != 0
        z = brain_zscore(flair)[brain]
        lesion = mask[brain].astype(bool)
        # Voxels at or above each threshold: total and lesion, from histograms over the threshold bins.
        bins = np.searchsorted(_THRESHOLDS, z, side="right")  # z >= _THRESHOLDS[k] for all k < bins
        above = np.cumsum(np.bincount(bins, minlength=_THRESHOLDS.size + 1)[::-1])[::-1][1:]
        hits = np.cumsum(np.bincount(bins[lesion], minlength=_THRESHOLDS.size + 1)[::-1])[::-1][1:]
        truth = np.count_nonzero(mask)
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(above + truth > 0, 2 * hits / (above + truth), 1.0)
        dices.append(dice)
    if not dices:
        raise ValueError("the threshold baseline needs at least one scan")
    table = np.stack(dices)
    best = int(np.argmax(table.mean(axis=0)))
    return ThresholdBaseline(
        threshold=float(_THRESHOLDS[best]),
        dices=tuple(float(d) for d in table[:, best]),
        best_per_scan=tuple(float(d) for d in table.max(axis=1)),
    )
