"""nDSC R-AAC of a full-size scan: msx's `ndsc_r_aac` (one sort, counts below each cut) against the straightforward
computation (mswml's: one sort, then at every retention fraction the prediction rebuilt and nDSC recomputed over
every voxel), on the same data in the same run.

The scan is 181 x 217 x 181 (MNI 1 mm) with about 0.3% of its voxels lesion; the prediction misses part of the
truth and adds false blobs; the uncertainty map (float32, as a NIfTI map is stored) is higher on the prediction's
errors. The straightforward arm runs a subset of the 200 fractions (every --baseline-stride-th) and its time is
extrapolated to 200, labelled so; its nDSC values on that subset are checked against `ndsc_retention_curve`'s. A
float64 copy of the map (divided by 3, so its values have no exact float32) times `ndsc_r_aac`'s coding of values by
their ranks.

    python benchmarks/retention.py                 # repeats 3, baseline stride 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from msx.models.metrics import ndsc, ndsc_r_aac, ndsc_retention_curve, retention_fractions

SHAPE = (181, 217, 181)
LESION_LOAD = 0.003


def synthetic_scan(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, truth, uncertainty, brain mask) of one full-size scan."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE, dtype=np.float32), 2.0)
    gt = field > np.quantile(field, 1 - LESION_LOAD)
    noisy = field + 0.5 * ndimage.gaussian_filter(rng.standard_normal(SHAPE, dtype=np.float32), 2.0)
    pred = noisy > np.quantile(noisy, 1 - LESION_LOAD)
    uncertainty = (rng.random(SHAPE, dtype=np.float32) * 0.5 + 0.5 * (pred != gt)).astype(np.float32)
    centre = (np.asarray(SHAPE) - 1) / 2
    grid = np.ogrid[tuple(slice(0, size) for size in SHAPE)]
    brain = sum(((axis - c) / (0.45 * size)) ** 2 for axis, c, size in zip(grid, centre, SHAPE, strict=True)) <= 1
    return pred, gt, uncertainty, brain


def straightforward_curve(pred, gt, uncertainty, fractions: np.ndarray) -> np.ndarray:
    """nDSC at each fraction, the prediction rebuilt and nDSC recomputed from scratch (mswml's way)."""
    order = np.argsort(uncertainty.ravel(), kind="stable")
    sorted_pred, sorted_gt = pred.ravel()[order], gt.ravel()[order]
    values = []
    for fraction in fractions:
        kept = int(sorted_gt.size * fraction)
        values.append(ndsc(np.concatenate([sorted_pred[:kept], sorted_gt[kept:]]), sorted_gt))
    return np.array(values)


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-stride", type=int, default=10)
    args = parser.parse_args()

    pred, gt, uncertainty, brain = synthetic_scan()
    print(f"scan {SHAPE}: {gt.mean():.4%} lesion, {pred.mean():.4%} predicted, brain mask {brain.mean():.1%} of voxels")
    fractions = retention_fractions()
    subset = fractions[:: args.baseline_stride]

    expected = straightforward_curve(pred, gt, uncertainty, subset)
    _, curve = ndsc_retention_curve(pred, gt, uncertainty)
    assert np.allclose(curve[:: args.baseline_stride], expected, atol=1e-6), "the two arms disagree"

    fast = [seconds(lambda: ndsc_r_aac(pred, gt, uncertainty)) for _ in range(args.repeats)]
    fast_brain = [seconds(lambda: ndsc_r_aac(pred, gt, uncertainty, brain_mask=brain)) for _ in range(args.repeats)]
    # float64 values with no exact float32 are coded by their ranks (one more, unstable, sort).
    float64_map = uncertainty.astype(np.float64) / 3
    fast_float64 = [seconds(lambda: ndsc_r_aac(pred, gt, float64_map)) for _ in range(args.repeats)]
    baseline_subset = seconds(lambda: straightforward_curve(pred, gt, uncertainty, subset))
    baseline = baseline_subset * fractions.size / subset.size
    fast_median = statistics.median(fast)
    print(f"R-AAC {ndsc_r_aac(pred, gt, uncertainty):.4f} (all voxels), "
          f"{ndsc_r_aac(pred, gt, uncertainty, brain_mask=brain):.4f} (brain mask)")
    print(f"straightforward, {subset.size} of {fractions.size} fractions: {baseline_subset:.2f} s; "
          f"extrapolated to {fractions.size}: {baseline:.1f} s")
    print(
        f"ndsc_r_aac, all {pred.size} voxels: median {fast_median:.2f} s of {args.repeats} "
        f"({', '.join(f'{t:.2f}' for t in fast)})"
    )
    print(f"ndsc_r_aac, brain mask ({int(brain.sum())} voxels): median {statistics.median(fast_brain):.2f} s")
    print(f"ndsc_r_aac, all voxels, float64 map (values coded by rank): median {statistics.median(fast_float64):.2f} s")
    print(f"speed-up (extrapolated baseline / ndsc_r_aac, all voxels): {baseline / fast_median:.0f}x")


if __name__ == "__main__":
    main()
