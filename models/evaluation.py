"""Predicted masks on disk scored against their ground truths: every metric of each scan, and the ISBI score of the
scans together (what `msx evaluate` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .metrics import ISBI_SCORE, isbi_scores, segmentation_metrics

_AFFINE_ATOL = 1e-3


def _read(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for unreadable files
        raise ValueError(f"{path}: not a readable NIfTI file ({error})") from None
    # NaN > 0 is False: a NaN voxel would silently score as background (an all-NaN prediction as an empty mask).
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{path}: {bad} of {array.size} voxels are NaN or infinite; a mask holds 0 and nonzero values only")
    return image, array


def evaluate_mask_files(
    pairs: Sequence[tuple[Path, Path]], connectivity: int = 6
) -> list[dict[str, float]]:
    """For each (prediction, ground truth) pair of NIfTI masks (nonzero = lesion), on one voxel grid: the metrics of
    `segmentation_metrics(..., extra=True)` and the ISBI score, whose volume correlation runs over all the pairs
    (so it is NaN for one). ValueError names a file that cannot be read or a pair that is not on one grid."""
    per_scan, pred_volumes, gt_volumes = [], [], []
    for pred, gt in pairs:
        pred_image, pred_array = _read(pred)
        gt_image, gt_array = _read(gt)
        if pred_array.shape != gt_array.shape:
            raise ValueError(f"{pred}: shape {pred_array.shape} differs from {gt}: {gt_array.shape}")
        if not np.allclose(pred_image.affine, gt_image.affine, atol=_AFFINE_ATOL):
            raise ValueError(f"{pred}: affine differs from {gt}'s; the masks are not on one grid")
        spacing = tuple(float(z) for z in gt_image.header.get_zooms()[:3])
        per_scan.append(
            segmentation_metrics(pred_array > 0, gt_array > 0, spacing=spacing, connectivity=connectivity, extra=True)
        )
        # In mm^3: scans of different voxel sizes must share one unit for the correlation.
        voxel_volume = float(np.prod(spacing))
        pred_volumes.append(int((pred_array > 0).sum()) * voxel_volume)
        gt_volumes.append(int((gt_array > 0).sum()) * voxel_volume)
    for metrics, score in zip(per_scan, isbi_scores(per_scan, pred_volumes, gt_volumes)):
        metrics[ISBI_SCORE] = score
    return per_scan
