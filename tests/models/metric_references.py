"""Random lesion masks and independent reference implementations that msx's metrics are checked against.

The surface references share no code path with msx.models.metrics: surfaces come from an explicit
face-neighbour test rather than ndimage.binary_erosion, and distances from a k-d tree over the surface
voxels' positions in mm rather than distance_transform_edt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

LESION_KINDS = ("spheres", "smoothed-noise", "salt-and-pepper")
SHAPE = (24, 20, 12)


def mask_with(shape: tuple, voxels: list) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


def _render_spheres(shape: tuple, spacing: Sequence[float], centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of balls (centres in voxel indices, radii in mm): ellipsoids in voxels when spacing is anisotropic."""
    positions = np.moveaxis(np.indices(shape), 0, -1) * np.asarray(spacing)
    mask = np.zeros(shape, dtype=bool)
    for centre, radius in zip(centres, radii, strict=True):
        mask |= np.linalg.norm(positions - centre * np.asarray(spacing), axis=-1) <= radius
    return mask


def _sphere_pair(rng: np.random.Generator, shape: tuple, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Truth: 4-7 balls; prediction: the same balls moved and resized, about a quarter missed, plus 0-3 false ones."""
    count = rng.integers(4, 8)
    centres = rng.integers(0, shape, size=(count, 3))
    radii = rng.uniform(1.0, 4.0, count)
    kept = rng.random(count) >= 0.25
    kept[0] = True  # the prediction is never empty
    moved = np.clip(centres + rng.integers(-2, 3, size=centres.shape), 0, np.asarray(shape) - 1)
    false_count = rng.integers(0, 4)
    pred_centres = np.concatenate([moved[kept], rng.integers(0, shape, size=(false_count, 3))])
    pred_radii = np.concatenate([radii[kept] * rng.uniform(0.7, 1.3, kept.sum()), rng.uniform(1.0, 3.0, false_count)])
    # A centre sits on a voxel and every radius is >= 0.7 mm, so no ball renders empty.
    return _render_spheres(shape, spacing, pred_centres, pred_radii), _render_spheres(shape, spacing, centres, radii)


def _smoothed_noise_pair(
    rng: np.random.Generator, shape: tuple, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Blobs of thresholded smooth noise (about 2 mm correlation length); the prediction adds smooth noise of its
    own."""
    sigma = 2.0 / np.asarray(spacing)
    truth_field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    pred_field = truth_field + 0.5 * ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    gt = truth_field > truth_field.std()
    pred = pred_field > pred_field.std()
    gt.flat[truth_field.argmax()] = pred.flat[pred_field.argmax()] = True  # never empty
    return pred, gt


def _salt_and_pepper_pair(rng: np.random.Generator, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Independent voxels: many one-voxel lesions and surfaces of every shape."""
    gt = rng.random(shape) < 0.25
    pred = rng.random(shape) < 0.2
    gt[0, 0, 0] = pred[-1, -1, -1] = True  # never empty
    return pred, gt


def random_lesion_pair(
    kind: str, seed: int, spacing: Sequence[float], shape: tuple = SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) bool masks of one of ``LESION_KINDS``, both non-empty."""
    rng = np.random.default_rng(seed)
    if kind == "spheres":
        return _sphere_pair(rng, shape, spacing)
    if kind == "smoothed-noise":
        return _smoothed_noise_pair(rng, shape, spacing)
    if kind == "salt-and-pepper":
        return _salt_and_pepper_pair(rng, shape)
    raise ValueError(f"unknown lesion kind {kind!r}; use one of {LESION_KINDS}")


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside the mask or outside the array."""
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(3):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def directed_surface_distances(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from each surface voxel of ``source`` to the nearest surface voxel of ``target``."""
    target_points = np.argwhere(surface(target)) * np.asarray(spacing)
    source_points = np.argwhere(surface(source)) * np.asarray(spacing)
    return cKDTree(target_points).query(source_points)[0]


def reference_assd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """medpy's ASSD: the mean of the two directed mean surface distances."""
    return (
        directed_surface_distances(pred, gt, spacing).mean() + directed_surface_distances(gt, pred, spacing).mean()
    ) / 2


def reference_hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """medpy's HD95: the 95th percentile of both directed distance sets pooled."""
    pooled = np.concatenate(
        [directed_surface_distances(pred, gt, spacing), directed_surface_distances(gt, pred, spacing)]
    )
    return float(np.percentile(pooled, 95))


# Shifts 2.0 references, written from the definitions in mswml/metrics.py: nDSC from float sums, the retention curve
# by rebuilding the prediction at every fraction, and lesion F1 by comparing every pair of lesion masks.


def reference_ndsc(pred: np.ndarray, gt: np.ndarray, r: float = 0.001) -> float:
    seg = pred.astype(np.float64).ravel()
    truth = gt.astype(np.float64).ravel()
    if seg.sum() + truth.sum() == 0:
        return 1.0
    k = 1.0 if truth.sum() == 0 else (1 - r) * truth.sum() / (r * (truth.size - truth.sum()))
    tp = seg[truth == 1].sum()
    fp = seg[truth == 0].sum()
    fn = truth[seg == 0].sum()
    return 2 * tp / (k * fp + 2 * tp + fn)


def reference_retention_curve(pred: np.ndarray, gt: np.ndarray, uncertainty: np.ndarray, brain_mask=None):
    """(fractions, nDSC): at each fraction the least uncertain int(N f) voxels keep the prediction, the rest take the
    truth. Ties keep index order: the voxels are sorted by (uncertainty, index) as a list of tuples."""
    selected = np.ones(pred.shape, bool) if brain_mask is None else brain_mask.astype(bool)
    pred, gt, uncertainty = pred[selected], gt[selected], uncertainty[selected]
    order = [index for _, index in sorted((float(u), index) for index, u in enumerate(uncertainty))]
    sorted_pred, sorted_gt = pred[order], gt[order]
    fractions = np.array([np.log(k) / np.log(200) for k in range(1, 201)])
    values = []
    for fraction in fractions:
        kept = int(len(sorted_gt) * fraction)
        values.append(reference_ndsc(np.concatenate([sorted_pred[:kept], sorted_gt[kept:]]), sorted_gt))
    return fractions, np.array(values)


def reference_r_aac(pred, gt, uncertainty, brain_mask=None) -> float:
    fractions, values = reference_retention_curve(pred, gt, uncertainty, brain_mask)
    area = sum((fractions[i + 1] - fractions[i]) * (values[i + 1] + values[i]) / 2 for i in range(len(fractions) - 1))
    return 1 - area


def reference_lesion_f1(pred: np.ndarray, gt: np.ndarray, structure: np.ndarray, threshold: float = 0.25) -> float:
    pred_labels, pred_count = ndimage.label(pred, structure=structure)
    gt_labels, gt_count = ndimage.label(gt, structure=structure)
    pred_lesions = [pred_labels == label for label in range(1, pred_count + 1)]
    gt_lesions = [gt_labels == label for label in range(1, gt_count + 1)]

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / (a | b).sum()

    tp = fp = fn = 0
    for lesion in pred_lesions:
        best = max([iou(lesion, other) for other in gt_lesions], default=0.0)
        tp, fp = (tp + 1, fp) if best >= threshold else (tp, fp + 1)
    for lesion in gt_lesions:
        best = max([iou(lesion, other) for other in pred_lesions], default=0.0)
        fn += best < threshold
    return 1.0 if tp + (fp + fn) / 2 == 0 else tp / (tp + (fp + fn) / 2)
