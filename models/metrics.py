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

The Shifts 2.0 MS-lesion benchmark's measures (Malinin et al. 2022; definitions as in the public code,
Shifts-Project/shifts, mswml/metrics.py), each for one scan:
- :func:`ndsc`: normalised Dice (Raina et al. 2023), Dice with the false positives reweighted as if the scan's lesion
  load were ``r`` (0.1%), so that scans of small and of large lesion loads are scored on one scale.
- :func:`lesion_f1`: F1 over lesions, a lesion counting as found when its best IoU with a lesion of the other mask
  reaches 0.25.
- :func:`ndsc_retention_curve` and :func:`ndsc_r_aac`: how well a voxel-wise uncertainty ranks the errors: nDSC as
  the most uncertain voxels are handed over to the ground truth, and the area above that curve (lower is better).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.integrate import trapezoid

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
    ISBI_SCORE: True, "ndsc": True, "lesion_f1": True,
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


def lesion_volumes(
    pred: npt.ArrayLike, gt: npt.ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """The predicted and the true lesion volume in mm^3 (``VOLUME_NAMES``; nonzero = lesion)."""
    voxel_mm3 = float(np.prod(spacing))
    return {name: int(np.count_nonzero(mask)) * voxel_mm3 for name, mask in zip(VOLUME_NAMES, (pred, gt), strict=True)}


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
    corr = math.nan if pred.size < 2 or pred.std() == 0 or truth.std() == 0 else float(np.corrcoef(pred, truth)[0, 1])
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
    """A fold's scores from its per-scan rows (``split``, ``scan``, ``strategy``, METRIC_NAMES and VOLUME_NAMES, and
    the uncertainty scores where evaluated): ``{split}/{strategy}/{name}`` for each of SPLIT_METRIC_NAMES and those
    scores, the mean over the split's scans with NaN left out (NaN when no value is finite), and the ISBI score of
    the split's scans."""
    scans_of: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        scans_of.setdefault((row["split"], row["strategy"]), []).append(row)
    metrics = {}
    for (split, strategy), scans in scans_of.items():
        for metric in (*METRIC_NAMES, *(name for name in scans[0] if is_uncertainty_score(name))):
            values = np.array([scan[metric] for scan in scans], dtype=float)
            finite = values[~np.isnan(values)]
            metrics[f"{split}/{strategy}/{metric}"] = float(finite.mean()) if finite.size else math.nan
        # The volume correlation needs the split's scans together: a mean of per-scan scores would not do.
        metrics[f"{split}/{strategy}/{ISBI_SCORE}"] = mean_isbi_score(scans)
    return metrics


def protocol_prefix(protocol: str | None) -> str:
    """How a compared inference protocol's final metrics are keyed: ``{protocol}/{split}/{strategy}/{metric}``; the
    study's own protocol (None) keeps ``{split}/{strategy}/{metric}``."""
    return f"{protocol}/" if protocol else ""


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


# Shifts 2.0 (mswml/metrics.py): nDSC's reference lesion load, the lesion IoU that counts as a match, and the number
# of retention fractions of the nDSC retention curve.
NDSC_REFERENCE_LOAD = 0.001
LESION_IOU_THRESHOLD = 0.25
RETENTION_POINTS = 200


def _ndsc_from_counts(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, gt_count: int, voxel_count: int, r: float
) -> np.ndarray:
    """nDSC from voxel counts (arrays of them: one per retention fraction), as mswml's ``dice_norm_metric``.

    The false positives are scaled by k = (1 - r) / r * |G| / (N - |G|), the ratio of the scan's lesion load odds to the
    reference load's, so a scan scores as if its lesion load were r; k = 1 when the truth is empty. Both masks empty
    score 1. (A truth filling every voxel leaves no false positive to scale: mswml's k is infinite there and its
    0 * inf gives NaN; here the term is 0.)
    """
    tp, fp, fn = (np.asarray(count, dtype=np.float64) for count in (tp, fp, fn))
    if gt_count == 0:
        k = 1.0
    elif gt_count == voxel_count:
        k = 0.0
    else:
        k = (1 - r) * gt_count / (r * (voxel_count - gt_count))
    denominator = k * fp + 2 * tp + fn
    # The denominator is 0 only when both masks are empty (tp + fn = |G| = 0 and fp = 0).
    return np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1.0), 1.0)


def ndsc(pred: npt.ArrayLike, gt: npt.ArrayLike, r: float = NDSC_REFERENCE_LOAD) -> float:
    """Normalised Dice similarity coefficient (nDSC; Raina et al. 2023, as Shifts 2.0's mswml computes it) of a binary
    prediction against its ground truth (nonzero = lesion), over all the voxels given.

    nDSC = 2 TP / (k FP + 2 TP + FN) with k = (1 - r) |G| / (r (N - |G|)) (1 when the truth is empty); both masks
    empty score 1, an empty truth with a nonempty prediction 0.
    """
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    tp = np.count_nonzero(pred & gt)
    fp = np.count_nonzero(pred) - tp
    gt_count = np.count_nonzero(gt)
    return float(_ndsc_from_counts(tp, fp, gt_count - tp, gt_count, gt.size, r))


def _best_lesion_ious(
    pred_labels: np.ndarray, pred_count: int, gt_labels: np.ndarray, gt_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each predicted lesion (labels 1..pred_count) and each true lesion: its largest IoU with a lesion of the other
    mask, 0 when it overlaps none. Element 0 of each array is the background's and unused."""
    overlap = (pred_labels > 0) & (gt_labels > 0)
    # One code per overlapping (predicted, true) lesion pair; its count is the pair's intersection in voxels.
    pair_codes, intersections = np.unique(
        pred_labels[overlap].astype(np.int64) * (gt_count + 1) + gt_labels[overlap], return_counts=True
    )
    pred_of_pair, gt_of_pair = np.divmod(pair_codes, gt_count + 1)
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=pred_count + 1)
    gt_sizes = np.bincount(gt_labels.ravel(), minlength=gt_count + 1)
    ious = intersections / (pred_sizes[pred_of_pair] + gt_sizes[gt_of_pair] - intersections)
    best_pred_iou = np.zeros(pred_count + 1)
    best_gt_iou = np.zeros(gt_count + 1)
    np.maximum.at(best_pred_iou, pred_of_pair, ious)
    np.maximum.at(best_gt_iou, gt_of_pair, ious)
    return best_pred_iou[1:], best_gt_iou[1:]


def lesion_f1(
    pred: npt.ArrayLike, gt: npt.ArrayLike, connectivity: int = 6, iou_threshold: float = LESION_IOU_THRESHOLD
) -> float:
    """Lesion-scale F1 (Shifts 2.0, mswml's ``lesion_f1_score``) of a binary prediction against its ground truth.

    Lesions are connected components (``connectivity`` 6, 18 or 26; mswml labels with scipy's default, 6). A predicted
    lesion is a true positive when its largest IoU with a true lesion is at least ``iou_threshold``, else a false
    positive; a true lesion whose largest IoU with a predicted lesion is below it is a false negative.
    F1 = TP / (TP + (FP + FN) / 2), and 1 when there is no lesion in either mask.
    """
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    structure = _lesion_structure(connectivity)
    pred_labels, pred_count = ndimage.label(pred, structure=structure)
    gt_labels, gt_count = ndimage.label(gt, structure=structure)
    best_pred_iou, best_gt_iou = _best_lesion_ious(pred_labels, pred_count, gt_labels, gt_count)
    tp = int(np.count_nonzero(best_pred_iou >= iou_threshold))
    fp = pred_count - tp
    fn = int(np.count_nonzero(best_gt_iou < iou_threshold))
    denominator = tp + (fp + fn) / 2
    return tp / denominator if denominator else 1.0


def retention_fractions(points: int = RETENTION_POINTS) -> np.ndarray:
    """mswml's retention fractions: log(1..points) / log(points), from 0 to 1 and denser towards 1, where a scan's few
    lesion voxels make the curve change most."""
    fractions = np.log(np.arange(1, points + 1))
    return fractions / fractions[-1]


def _order_preserving_code(values: np.ndarray) -> np.ndarray | None:
    """uint32 codes ordered as ``values`` (equal values, equal codes), or None when the values do not all fit float32
    exactly. A float32's bits order as unsigned integers once negative values have all bits flipped and the others
    only their sign bit."""
    as_float32 = values.astype(np.float32) + np.float32(0.0)  # + 0 turns -0.0 into 0.0, which compares equal to it
    if not np.array_equal(as_float32, values):
        return None
    bits = as_float32.view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))


def _dense_value_ranks(values: np.ndarray) -> np.ndarray:
    """uint32 codes ordered as ``values``: each value's place among the distinct values, from one unstable sort."""
    order = np.argsort(values)
    ordered = values[order]
    codes = np.empty(values.size, dtype=np.uint32)
    codes[order] = np.concatenate([[0], np.cumsum(ordered[1:] != ordered[:-1])])
    return codes


def _stable_ranks(values: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Places of the flat indices ``voxels`` in the stable ascending order of the 1-D ``values`` (ties in index order).

    Each voxel's key packs a uint32 code ordered as its value above its index: the keys are unique, so one unstable
    sort of them (several times faster than a stable argsort of the values) gives the stable order. Values that fit
    float32 (what a NIfTI map holds) are their own code; others are coded by their rank among the distinct values.
    """
    if values.size >= 2**32:
        raise ValueError(f"{values.size} voxels do not fit the 32-bit index of the ordering keys")
    code = _order_preserving_code(values)
    if code is None:
        code = _dense_value_ranks(values)
    keys = np.empty(values.size, dtype=np.uint64)
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    halves = keys.view(np.uint32).reshape(-1, 2)
    halves[:, low] = np.arange(values.size, dtype=np.uint32)
    halves[:, high] = code
    voxel_keys = keys[voxels]
    keys.sort()
    return np.searchsorted(keys, voxel_keys)

def ndsc_retention_curve(
    pred: npt.ArrayLike,
    gt: npt.ArrayLike,
    uncertainty: npt.ArrayLike,
    fractions: npt.ArrayLike | None = None,
    brain_mask: npt.ArrayLike | None = None,
    r: float = NDSC_REFERENCE_LOAD,
) -> tuple[np.ndarray, np.ndarray]:
    """(fractions, nDSC at each): the nDSC retention curve of Shifts 2.0 (mswml's ``ndsc_aac_metric``).

    The voxels (those of ``brain_mask`` when given, else all) are ordered by ``uncertainty``, least uncertain first,
    ties in index order (a stable sort). At retention fraction f the first int(N f) keep their prediction and the
    rest are replaced by the ground truth; nDSC is then computed over the N voxels. ``fractions`` defaults to
    :func:`retention_fractions`.

    The nDSC of every fraction comes from one sort: the replaced voxels are all correct, so only the counts of true
    positives, false positives and false negatives among the kept prefix change, and each is a count of sorted
    positions below the cut.
    """
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    # Kept in its own dtype: a float32 map sorts as it would in float64, and faster.
    uncertainty = np.asarray(uncertainty)
    if not pred.shape == gt.shape == uncertainty.shape:
        raise ValueError(
            f"prediction {pred.shape}, ground truth {gt.shape} and uncertainty {uncertainty.shape} differ in shape"
        )
    if np.issubdtype(uncertainty.dtype, np.floating) and np.isnan(uncertainty).any():
        raise ValueError("the uncertainty map holds NaN; it cannot order the voxels")
    fractions = retention_fractions() if fractions is None else np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size == 0 or fractions.min() < 0 or fractions.max() > 1:
        raise ValueError("retention fractions must be a nonempty 1-D sequence of values in [0, 1]")
    if brain_mask is None:
        pred, gt, uncertainty = pred.ravel(), gt.ravel(), uncertainty.ravel()
    else:
        brain_mask = np.asarray(brain_mask).astype(bool)
        if brain_mask.shape != pred.shape:
            raise ValueError(f"brain mask shape {brain_mask.shape} differs from prediction shape {pred.shape}")
        pred, gt, uncertainty = pred[brain_mask], gt[brain_mask], uncertainty[brain_mask]

    voxel_count = gt.size
    kept = (voxel_count * fractions).astype(np.int64)  # mswml's int(N * f)
    # Only the errors' places in the order matter: the kept prefix's true positives follow from its false negatives.
    false_positives = np.flatnonzero(pred & ~gt)
    false_negatives = np.flatnonzero(~pred & gt)
    ranks = _stable_ranks(uncertainty, np.concatenate([false_positives, false_negatives]))
    fp_ranks, fn_ranks = np.sort(ranks[: false_positives.size]), np.sort(ranks[false_positives.size :])
    kept_fp = np.searchsorted(fp_ranks, kept)
    kept_fn = np.searchsorted(fn_ranks, kept)
    gt_count = int(np.count_nonzero(gt))
    # Every true voxel that is not a kept false negative is a true positive: kept and hit, or replaced by the truth.
    tp = gt_count - kept_fn
    return fractions, _ndsc_from_counts(tp, kept_fp, kept_fn, gt_count, voxel_count, r)


def ndsc_r_aac(
    pred: npt.ArrayLike,
    gt: npt.ArrayLike,
    uncertainty: npt.ArrayLike,
    fractions: npt.ArrayLike | None = None,
    brain_mask: npt.ArrayLike | None = None,
    r: float = NDSC_REFERENCE_LOAD,
) -> float:
    """nDSC R-AAC (Shifts 2.0): 1 minus the trapezoid area under :func:`ndsc_retention_curve`; lower is better (0 when
    the prediction is perfect)."""
    fractions, values = ndsc_retention_curve(pred, gt, uncertainty, fractions=fractions, brain_mask=brain_mask, r=r)
    return r_aac_of_curve(values, fractions)


def r_aac_of_curve(values: npt.ArrayLike, fractions: npt.ArrayLike | None = None) -> float:
    """1 minus the trapezoid area under a retention curve (``fractions`` default: :func:`retention_fractions`).
    Linear in the curve: the R-AAC of a mean curve is the mean of the curves' R-AACs."""
    fractions = retention_fractions(len(values)) if fractions is None else fractions
    return float(1.0 - trapezoid(values, fractions))


# The Shifts 2.0 scores of a mask: nDSC and lesion F1 of the mask itself, and for each uncertainty measure the nDSC
# R-AAC of the mask under that measure's map, keyed `r_aac_<measure>` (`r_aac_key`); RANDOM_UNCERTAINTY's is the
# R-AAC under a random voxel order, what an uncertainty that knows nothing scores.
SHIFTS_METRIC_NAMES = ("ndsc", "lesion_f1")
R_AAC_PREFIX = "r_aac_"
RANDOM_UNCERTAINTY = "random"


def r_aac_key(measure: str) -> str:
    return f"{R_AAC_PREFIX}{measure}"


def is_uncertainty_score(name: str) -> bool:
    """A per-scan score of `uncertainty_scores`: averaged over a split's scans like METRIC_NAMES."""
    return name in SHIFTS_METRIC_NAMES or name.startswith(R_AAC_PREFIX)


@dataclass(frozen=True)
class ShiftsScores:
    """A mask's Shifts 2.0 scores (`uncertainty_scores`) and the retention curves its R-AACs are the areas above."""

    scores: dict[str, float]  # ndsc, lesion_f1, then r_aac_<measure> for each measure and RANDOM_UNCERTAINTY
    curves: dict[str, np.ndarray]  # measure (and RANDOM_UNCERTAINTY) -> nDSC at each of retention_fractions()


def uncertainty_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    uncertainty: Mapping[str, np.ndarray],
    random_order: np.ndarray,
    brain_mask: np.ndarray | None = None,
    connectivity: int = 6,
) -> ShiftsScores:
    """nDSC and lesion F1 of ``pred`` over the whole scan, and its nDSC retention curve and R-AAC under each map of
    ``uncertainty`` (measure -> map) and under ``random_order`` (as RANDOM_UNCERTAINTY), over ``brain_mask``'s
    voxels."""
    scores = {"ndsc": ndsc(pred, gt), "lesion_f1": lesion_f1(pred, gt, connectivity=connectivity)}
    curves = {}
    for measure, values in {**uncertainty, RANDOM_UNCERTAINTY: random_order}.items():
        fractions, curves[measure] = ndsc_retention_curve(pred, gt, values, brain_mask=brain_mask)
        scores[r_aac_key(measure)] = r_aac_of_curve(curves[measure], fractions)
    return ShiftsScores(scores, curves)
