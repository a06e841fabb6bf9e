"""Predicted masks on disk scored against their ground truths: every metric of each scan (with an uncertainty map, its
nDSC R-AAC too), and the ISBI score of the scans together (what `msx evaluate` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .metrics import ISBI_SCORE, isbi_scores, lesion_f1, ndsc, ndsc_r_aac, segmentation_metrics

_AFFINE_ATOL = 1e-3


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for unreadable files
        raise ValueError(f"{path}: not a readable NIfTI file ({error})") from None
    return image, array


def _count_non_finite(array: np.ndarray) -> int:
    return int((~np.isfinite(array)).sum()) if np.issubdtype(array.dtype, np.floating) else 0


def _read(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A mask: NaN > 0 is False, so a NaN voxel would silently score as background (an all-NaN prediction as an
    empty mask); it is refused."""
    image, array = _load(path)
    if bad := _count_non_finite(array):
        raise ValueError(
            f"{path}: {bad} of {array.size} voxels are NaN or infinite; a mask holds 0 and nonzero values only"
        )
    return image, array


def _read_uncertainty(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A voxel-wise uncertainty map: finite and non-negative (NaN cannot be ordered, and every uncertainty measure msx
    ranks voxels by is >= 0, so a negative value means a wrong file)."""
    image, array = _load(path)
    if bad := _count_non_finite(array):
        raise ValueError(f"{path}: {bad} of {array.size} voxels are NaN or infinite; an uncertainty map must be finite")
    if negative := int((array < 0).sum()):
        raise ValueError(f"{path}: {negative} of {array.size} voxels are negative; an uncertainty map must be >= 0")
    return image, array


def _check_same_grid(
    path: Path, image: nib.Nifti1Image, array: np.ndarray, pred: Path, pred_image: nib.Nifti1Image
) -> None:
    if array.shape != tuple(pred_image.shape):
        raise ValueError(f"{path}: shape {array.shape} differs from {pred}: {tuple(pred_image.shape)}")
    if not np.allclose(image.affine, pred_image.affine, atol=_AFFINE_ATOL):
        raise ValueError(f"{path}: affine differs from {pred}'s; the files are not on one grid")


@dataclass(frozen=True)
class ScanFiles:
    """One scan's files: its predicted and true masks, and optionally a voxel-wise uncertainty map of the prediction
    and a brain mask restricting the nDSC R-AAC to brain voxels."""

    pred: Path
    gt: Path
    uncertainty: Path | None = None
    brain_mask: Path | None = None


def _read_scan(scan: ScanFiles) -> dict[str, tuple[nib.Nifti1Image, np.ndarray]]:
    """Every file of a scan, read and checked: readable, finite masks, a valid uncertainty map, all on one grid."""
    files = {"pred": _read(scan.pred), "gt": _read(scan.gt)}
    pred_image = files["pred"][0]
    if scan.uncertainty is not None:
        files["uncertainty"] = _read_uncertainty(scan.uncertainty)
    if scan.brain_mask is not None:
        files["brain_mask"] = _read(scan.brain_mask)
    for name, (image, array) in files.items():
        if name != "pred":
            _check_same_grid(getattr(scan, name), image, array, scan.pred, pred_image)
    return files


def evaluate_mask_files(
    pairs: Sequence[tuple[Path, Path] | ScanFiles], connectivity: int = 6
) -> list[dict[str, float]]:
    """For each scan ((prediction, ground truth) pair of NIfTI masks, nonzero = lesion, or a :class:`ScanFiles`), on
    one voxel grid: the metrics of `segmentation_metrics(..., extra=True)`, ``ndsc`` and ``lesion_f1`` over the whole
    scan, ``ndsc_r_aac`` when the scan has an uncertainty map (over its brain mask's voxels when it has one, else over
    all), and the ISBI score, whose volume correlation runs over all the scans (so it is NaN for one).

    Every file of every scan is read and checked before anything is computed; ValueError names the first file that
    cannot be read, holds NaN (or, in an uncertainty map, a negative value) or is not on its prediction's grid."""
    scans = [scan if isinstance(scan, ScanFiles) else ScanFiles(*scan) for scan in pairs]
    for scan in scans:
        _read_scan(scan)
    per_scan, pred_volumes, gt_volumes = [], [], []
    for scan in scans:
        # Read again rather than kept from the check: a set of scans' uncertainty maps need not fit in memory at once.
        files = _read_scan(scan)
        pred, gt = files["pred"][1] > 0, files["gt"][1] > 0
        spacing = tuple(float(z) for z in files["gt"][0].header.get_zooms()[:3])
        metrics = segmentation_metrics(pred, gt, spacing=spacing, connectivity=connectivity, extra=True)
        metrics["ndsc"] = ndsc(pred, gt)
        metrics["lesion_f1"] = lesion_f1(pred, gt, connectivity=connectivity)
        if "uncertainty" in files:
            brain_mask = files["brain_mask"][1] > 0 if "brain_mask" in files else None
            metrics["ndsc_r_aac"] = ndsc_r_aac(pred, gt, files["uncertainty"][1], brain_mask=brain_mask)
        per_scan.append(metrics)
        # In mm^3: scans of different voxel sizes must share one unit for the correlation.
        voxel_volume = float(np.prod(spacing))
        pred_volumes.append(int(pred.sum()) * voxel_volume)
        gt_volumes.append(int(gt.sum()) * voxel_volume)
    for metrics, score in zip(per_scan, isbi_scores(per_scan, pred_volumes, gt_volumes), strict=True):
        metrics[ISBI_SCORE] = score
    return per_scan
