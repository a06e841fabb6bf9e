"""Per-scan lesion segmentation metrics (ISBI 2015 / MSSegDiff conventions), spacing-aware.

Keys of :func:`segmentation_metrics` (``METRIC_NAMES``):
- ``dsc``, ``tpr`` (sensitivity), ``ppv`` (precision): voxel-wise.
- ``ltpr``: fraction of ground-truth lesions hit by at least one predicted voxel.
- ``lfpr``: fraction of predicted lesions that touch no ground-truth voxel.
  Lesions are 3-D connected components with face (6), edge (18) or vertex (26) connectivity.
- ``avd``: |V_pred - V_gt| / V_gt in percent.
- ``assd``: average symmetric surface distance in mm, as medpy defines it: a surface is a mask minus
  its 6-connected erosion, and ASSD is the mean of the two directed mean surface distances. (MONAI's
  symmetric average pools both distance sets instead, which weighs the larger surface more.)

``EXTRA_METRIC_NAMES`` (only with ``segmentation_metrics(..., extra=True)``, so tables built on the seven
paper metrics keep their shape):
- ``hd95``: 95th percentile (numpy's linear interpolation) of the symmetric surface distances in mm, as
  medpy's ``hd95`` defines it: the distances from the prediction's surface to the truth's and from the
  truth's surface to the prediction's are pooled into one set. (MONAI's ``compute_hausdorff_distance``
  with ``percentile=95`` instead takes the larger of the two directed 95th percentiles; the two agree for
  the plain Hausdorff distance, percentile 100.) Empty cases as ASSD: 0 when both are empty, else NaN
  when either is.

:func:`lesion_volumes` gives a scan's predicted and true lesion volumes in mm^3 (``VOLUME_NAMES``), which
:func:`isbi_scores` (the ISBI 2015 challenge score per scan) and :func:`mean_isbi_score` (its mean over a set
of scans) correlate over scans.

Empty masks:
- both empty: dsc 1, tpr 1, ppv 1, ltpr 1, lfpr 0, avd 0, assd 0 (a perfect answer).
- otherwise a ratio whose denominator is empty is NaN: ground truth empty -> tpr, ltpr, avd NaN;
  prediction empty -> ppv, lfpr NaN; either one empty -> assd NaN; dsc is 0 when exactly one is empty.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

METRIC_NAMES = ("dsc", "tpr", "ppv", "ltpr", "lfpr", "avd", "assd")
# Reported on request only (segmentation_metrics(extra=True)); not one of the paper's seven.
EXTRA_METRIC_NAMES = ("hd95",)
# Keys of :func:`lesion_volumes`: a scan's lesion volumes, not a score (a mean of them over scans means nothing).
VOLUME_NAMES = ("pred_volume_mm3", "gt_volume_mm3")
# The raw ISBI 2015 score of a set of scans (:func:`mean_isbi_score`): it needs the scans together, for its volume
# correlation, so it is a score of a split, never of one scan alone.
ISBI_SCORE = "isbi"
# What a split of a fold (its validation or its test scans) is scored by (:func:`split_metrics`): the tables'
# columns, and what a selection may rank by.
SPLIT_METRIC_NAMES = (*METRIC_NAMES, ISBI_SCORE)
# The direction of "better" of every score msx reports.
HIGHER_IS_BETTER = {
    "dsc": True, "tpr": True, "ppv": True, "ltpr": True, "lfpr": False, "avd": False, "assd": False, "hd95": False,
    ISBI_SCORE: True,
}

# Lesion connectivity -> rank argument of scipy.ndimage.generate_binary_structure(3, rank).
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}

_BOTH_EMPTY = {"dsc": 1.0, "tpr": 1.0, "ppv": 1.0, "ltpr": 1.0, "lfpr": 0.0, "avd": 0.0, "assd": 0.0}
_BOTH_EMPTY_EXTRA = {"hd95": 0.0}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _lesion_structure(connectivity: int) -> np.ndarray:
    try:
        rank = _CONNECTIVITY_RANK[connectivity]
    except KeyError:
        raise ValueError(
            f"connectivity {connectivity!r} is not supported; use one of {sorted(_CONNECTIVITY_RANK)}"
        ) from None
    return ndimage.generate_binary_structure(3, rank)


def _fraction_of_lesions_touching(mask: np.ndarray, other: np.ndarray, structure: np.ndarray) -> float:
    """Fraction of the connected components of ``mask`` that share at least one voxel with ``other``."""
    labels, lesion_count = ndimage.label(mask, structure=structure)
    touched = np.unique(labels[other & mask])
    return _ratio(touched.size, lesion_count)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask minus its 6-connected erosion (voxels on the array border count as surface)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def _surface_distances(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from each surface voxel of ``source`` to the nearest surface voxel of ``target``."""
    distance_to_target = ndimage.distance_transform_edt(~_surface(target), sampling=spacing)
    return distance_to_target[_surface(source)]


def _mean_surface_distance(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean distance in mm from each surface voxel of ``source`` to the nearest surface voxel of ``target``."""
    return float(_surface_distances(source, target, spacing).mean())


def _symmetric_surface_percentile(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float = 95.0
) -> float:
    """Percentile of the pooled (prediction -> truth and truth -> prediction) surface distances, in mm."""
    pooled = np.concatenate([_surface_distances(pred, gt, spacing), _surface_distances(gt, pred, spacing)])
    return float(np.percentile(pooled, percentile))


def segmentation_metrics(
    pred: npt.ArrayLike,
    gt: npt.ArrayLike,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    connectivity: int = 6,
    extra: bool = False,
) -> dict[str, float]:
    """All of ``METRIC_NAMES`` for one 3-D binary prediction against its ground truth (nonzero = lesion).

    With ``extra=True`` the ``EXTRA_METRIC_NAMES`` (hd95) follow the seven paper metrics.
    """
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"masks must be 3-D, got {pred.ndim}-D")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {tuple(spacing)}")
    structure = _lesion_structure(connectivity)

    pred_volume = int(pred.sum())
    gt_volume = int(gt.sum())
    if pred_volume == 0 and gt_volume == 0:
        return {**_BOTH_EMPTY, **(_BOTH_EMPTY_EXTRA if extra else {})}
    overlap = int((pred & gt).sum())
    assd = (
        (_mean_surface_distance(pred, gt, spacing) + _mean_surface_distance(gt, pred, spacing)) / 2
        if pred_volume and gt_volume
        else math.nan
    )
    metrics = {
        "dsc": 2 * overlap / (pred_volume + gt_volume),
        "tpr": _ratio(overlap, gt_volume),
        "ppv": _ratio(overlap, pred_volume),
        "ltpr": _fraction_of_lesions_touching(gt, pred, structure),
        "lfpr": 1 - _fraction_of_lesions_touching(pred, gt, structure),
        "avd": _ratio(100 * abs(pred_volume - gt_volume), gt_volume),
        "assd": assd,
    }
    if extra:
        both = pred_volume and gt_volume
        metrics["hd95"] = _symmetric_surface_percentile(pred, gt, spacing, 95.0) if both else math.nan
    return metrics


def lesion_volumes(pred: npt.ArrayLike, gt: npt.ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """The predicted and the true lesion volume in mm^3 (``VOLUME_NAMES``; nonzero = lesion)."""
    voxel_mm3 = float(np.prod(spacing))
    return {name: int(np.count_nonzero(mask)) * voxel_mm3 for name, mask in zip(VOLUME_NAMES, (pred, gt))}


def isbi_scores(
    per_scan: Sequence[Mapping[str, float]], pred_volumes: Sequence[float], gt_volumes: Sequence[float]
) -> list[float]:
    """Raw (unscaled) ISBI 2015 challenge score of each scan against one rater.

    score = DSC/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4, where ``per_scan[i]`` holds scan i's
    ``dsc``, ``ppv``, ``lfpr`` and ``ltpr`` (as :func:`segmentation_metrics` gives them) and Corr is the
    Pearson correlation of ``pred_volumes`` with ``gt_volumes`` over ALL the scans passed (one value shared
    by every scan, so which scans are evaluated together changes every score). Volumes may be in voxels or
    mm^3 but must use one unit for all scans. The raw score lies in [-0.25, 1] (1: perfect). The
    challenge (Carass et al., NeuroImage 2017) averaged it over raters and scans and then rescaled it
    linearly so that the inter-rater agreement scores 90; that rescaling needs the inter-rater raw score
    and is not applied here.

    Undefined parts give NaN: Corr with fewer than two scans or constant volumes (then every score is
    NaN), and a scan whose PPV or LFPR is NaN (empty prediction).
    """
    if not len(per_scan) == len(pred_volumes) == len(gt_volumes):
        raise ValueError(
            f"need one metrics dict and two volumes per scan, got {len(per_scan)} metrics dicts, "
            f"{len(pred_volumes)} predicted and {len(gt_volumes)} true volumes"
        )
    pred = np.asarray(pred_volumes, dtype=float)
    truth = np.asarray(gt_volumes, dtype=float)
    if pred.size < 2 or pred.std() == 0 or truth.std() == 0:
        corr = math.nan
    else:
        corr = float(np.corrcoef(pred, truth)[0, 1])
    return [
        scan["dsc"] / 8 + scan["ppv"] / 8 + (1 - scan["lfpr"]) / 4 + scan["ltpr"] / 4 + corr / 4
        for scan in per_scan
    ]


def mean_isbi_score(per_scan: Sequence[Mapping[str, float]]) -> float:
    """Mean over scans of :func:`isbi_scores`, its volume correlation running over the same scans.

    ``per_scan[i]`` holds scan i's ``dsc``, ``ppv``, ``lfpr``, ``ltpr`` and its ``VOLUME_NAMES``. Scans whose
    score is NaN (empty prediction) are left out; NaN when no score is defined (fewer than two scans,
    constant volumes).
    """
    pred_key, gt_key = VOLUME_NAMES
    scores = np.array(
        isbi_scores(per_scan, [scan[pred_key] for scan in per_scan], [scan[gt_key] for scan in per_scan]), dtype=float
    )
    finite = scores[~np.isnan(scores)]
    return float(finite.mean()) if finite.size else math.nan


def split_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """A fold's scores from its per-scan rows (``split``, ``scan``, ``strategy``, METRIC_NAMES and VOLUME_NAMES):
    ``{split}/{strategy}/{name}`` for each of SPLIT_METRIC_NAMES, the mean over the split's scans with NaN left out
    (NaN when no value is finite), and the ISBI score of the split's scans."""
    scans_of: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        scans_of.setdefault((row["split"], row["strategy"]), []).append(row)
    metrics = {}
    for (split, strategy), scans in scans_of.items():
        for metric in METRIC_NAMES:
            values = np.array([scan[metric] for scan in scans], dtype=float)
            finite = values[~np.isnan(values)]
            metrics[f"{split}/{strategy}/{metric}"] = float(finite.mean()) if finite.size else math.nan
        # The volume correlation needs the split's scans together: a mean of per-scan scores would not do.
        metrics[f"{split}/{strategy}/{ISBI_SCORE}"] = mean_isbi_score(scans)
    return metrics


def summarise(per_scan: Sequence[dict[str, float]], ddof: int = 0) -> dict[str, tuple[float, float]]:
    """NaN-aware (mean, std) of each metric over scans; a metric with no finite value gives (NaN, NaN).

    ``ddof`` is the standard deviation's delta degrees of freedom (0: population std, as numpy's
    default); the std is NaN when there are no more than ``ddof`` non-NaN values.
    """
    if not per_scan:
        return {}
    names = list(per_scan[0])
    for scan in per_scan:
        if set(scan) != set(names):
            raise ValueError(f"every scan must report the same metrics {names}, got {list(scan)}")
    summary = {}
    for name in names:
        values = np.array([scan[name] for scan in per_scan], dtype=float)
        values = values[~np.isnan(values)]
        # Computed by hand rather than with np.nanmean/np.nanstd, which warn on all-NaN input.
        mean = float(values.mean()) if values.size else math.nan
        std = float(values.std(ddof=ddof)) if values.size > ddof else math.nan
        summary[name] = (mean, std)
    return summary
