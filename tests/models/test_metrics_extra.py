"""HD95, the ISBI 2015 score and a fold's split scores (msx.models.metrics extras)."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from msx.models.metrics import (
    EXTRA_METRIC_NAMES,
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    SPLIT_METRIC_NAMES,
    _symmetric_surface_percentile,
    isbi_scores,
    lesion_volumes,
    mean_isbi_score,
    segmentation_metrics,
    split_metrics,
)

from .metric_references import LESION_KINDS, directed_surface_distances, random_lesion_pair

SPACING = (0.5, 1.0, 2.5)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize("kind", LESION_KINDS)
def test_surfaces_and_spacing_agree_with_monai(kind):
    """MONAI's HD95 is max(directed 95th percentiles), ours (medpy's) pools both distance sets, so they
    differ in general. What they share is checked exactly: the surfaces and spacing-aware distances,
    through MONAI's directed percentiles against the reference, and the pooled percentile 100 (the
    plain Hausdorff distance, where max of maxima == max of the pooled set)."""
    pred, gt = random_lesion_pair(kind, 0, SPACING)
    p = torch.as_tensor(pred[None, None])
    g = torch.as_tensor(gt[None, None])

    def monai(**kwargs) -> float:
        return float(compute_hausdorff_distance(p, g, include_background=True, spacing=SPACING, **kwargs))

    forward = directed_surface_distances(pred, gt, SPACING)
    backward = directed_surface_distances(gt, pred, SPACING)
    # MONAI's directed distances go from y_pred's surface to y's. Its torch.quantile runs in float32, where
    # the interpolation position 0.95 * (n - 1) is off by up to ~3e-5 for n ~ 1000 surface voxels: 1e-5
    # in mm (3.6e-6 measured), looser than the 1e-6 of test_metrics_agreement.py for that reason alone.
    assert monai(percentile=95, directed=True) == pytest.approx(np.percentile(forward, 95), abs=1e-5)
    assert monai(percentile=None) == pytest.approx(_symmetric_surface_percentile(pred, gt, SPACING, 100), abs=1e-5)
    assert monai(percentile=95) == pytest.approx(
        max(np.percentile(forward, 95), np.percentile(backward, 95)), abs=1e-5
    )


def test_hd95_single_voxels_by_hand():
    pred = np.zeros((4, 4, 4), bool)
    gt = np.zeros((4, 4, 4), bool)
    pred[0, 0, 0] = gt[1, 2, 0] = True
    expected = math.hypot(0.5 * 1, 1.0 * 2)
    assert segmentation_metrics(pred, gt, spacing=SPACING, extra=True)["hd95"] == pytest.approx(expected)


def test_extra_keys_only_on_request():
    # Their values in the empty cases are checked in test_metrics.py's test_empty_cases.
    pred, gt = random_lesion_pair("spheres", 0, SPACING)
    assert tuple(segmentation_metrics(pred, gt)) == METRIC_NAMES
    assert tuple(segmentation_metrics(pred, gt, extra=True)) == METRIC_NAMES + EXTRA_METRIC_NAMES


def test_isbi_scores_by_hand():
    per_scan = [
        dict(dsc=0.8, ppv=0.6, lfpr=0.2, ltpr=0.5),
        dict(dsc=0.4, ppv=1.0, lfpr=0.0, ltpr=0.25),
        dict(dsc=0.0, ppv=0.0, lfpr=1.0, ltpr=0.0),
    ]
    pred_volumes = [10.0, 20.0, 60.0]
    gt_volumes = [12.0, 18.0, 30.0]
    # Pearson by hand: pred mean 30, deviations -20, -10, 30; truth mean 20, deviations -8, -2, 10.
    # cov = 160 + 20 + 300 = 480; |pred| = sqrt(400 + 100 + 900) = sqrt(1400); |truth| = sqrt(64 + 4 + 100).
    corr = 480 / math.sqrt(1400 * 168)
    expected = [
        0.8 / 8 + 0.6 / 8 + 0.8 / 4 + 0.5 / 4 + corr / 4,
        0.4 / 8 + 1.0 / 8 + 1.0 / 4 + 0.25 / 4 + corr / 4,
        0.0 + 0.0 + 0.0 + 0.0 + corr / 4,
    ]
    assert isbi_scores(per_scan, pred_volumes, gt_volumes) == pytest.approx(expected)


def test_isbi_scores_undefined_and_mismatched():
    scan = dict(dsc=1.0, ppv=1.0, lfpr=0.0, ltpr=1.0)
    assert all(math.isnan(s) for s in isbi_scores([scan], [5.0], [5.0]))  # one scan: no correlation
    assert all(math.isnan(s) for s in isbi_scores([scan, scan], [5.0, 5.0], [4.0, 6.0]))  # constant volumes
    perfect = isbi_scores([scan, scan], [4.0, 6.0], [4.0, 6.0])
    assert perfect == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="per scan"):
        isbi_scores([scan], [1.0, 2.0], [1.0, 2.0])


def test_lesion_volumes_in_mm3():
    pred = np.zeros((4, 4, 4), bool)
    gt = np.zeros((4, 4, 4), np.uint8)
    pred[0, :2, :3] = True
    gt[1:3, 0, 0] = 1
    voxel = 0.5 * 1.0 * 2.5
    assert lesion_volumes(pred, gt, SPACING) == {"pred_volume_mm3": 6 * voxel, "gt_volume_mm3": 2 * voxel}
    assert lesion_volumes(np.zeros_like(pred), gt) == {"pred_volume_mm3": 0.0, "gt_volume_mm3": 2.0}


def test_mean_isbi_score_correlates_over_the_scans_given_and_leaves_out_undefined_scores():
    per_scan = [
        {"dsc": 0.8, "ppv": 0.6, "lfpr": 0.2, "ltpr": 0.5, "pred_volume_mm3": 10.0, "gt_volume_mm3": 12.0},
        {"dsc": 0.4, "ppv": 1.0, "lfpr": 0.0, "ltpr": 0.25, "pred_volume_mm3": 20.0, "gt_volume_mm3": 18.0},
        # An empty prediction: PPV and LFPR undefined, so is its score; its volume still counts in Corr.
        {"dsc": 0.0, "ppv": math.nan, "lfpr": math.nan, "ltpr": 0.0, "pred_volume_mm3": 0.0, "gt_volume_mm3": 30.0},
    ]
    # Pearson by hand: pred mean 10, deviations 0, 10, -10; truth mean 20, deviations -8, -2, 10.
    corr = (0 - 20 - 100) / math.sqrt(200 * 168)
    first = 0.8 / 8 + 0.6 / 8 + 0.8 / 4 + 0.5 / 4 + corr / 4
    second = 0.4 / 8 + 1.0 / 8 + 1.0 / 4 + 0.25 / 4 + corr / 4
    assert mean_isbi_score(per_scan) == pytest.approx((first + second) / 2)
    assert math.isnan(mean_isbi_score(per_scan[:1]))  # one scan: no correlation
    assert math.isnan(mean_isbi_score([]))


def test_split_metrics_are_means_over_the_splits_scans_with_the_isbi_score_over_the_same_scans():
    def row(split, scan, strategy, dsc, pred_volume):
        metrics = {"dsc": dsc, "tpr": 0.5, "ppv": 0.6, "ltpr": 0.7, "lfpr": 0.1, "avd": 20.0, "assd": 1.0}
        return {"split": split, "scan": scan, "strategy": strategy, **metrics, "pred_volume_mm3": pred_volume, "gt_volume_mm3": 100.0 * scan}

    rows = [row("val", 1, "mean", 0.2, 90.0), row("val", 2, "mean", math.nan, 210.0), row("val", 3, "mean", 0.6, 280.0)]
    rows += [row("test", 4, "mean", 0.5, 350.0), row("test", 4, "last", 0.1, 10.0)]

    metrics = split_metrics(rows)

    assert set(metrics) == {f"{split}/{strategy}/{metric}" for split, strategy in (("val", "mean"), ("test", "mean"), ("test", "last"))
                            for metric in SPLIT_METRIC_NAMES}
    assert metrics["val/mean/dsc"] == pytest.approx(0.4)  # NaN left out
    assert metrics["val/mean/avd"] == pytest.approx(20.0)
    assert metrics["val/mean/isbi"] == pytest.approx(mean_isbi_score(rows[:3]))
    assert metrics["test/mean/dsc"] == 0.5 and metrics["test/last/dsc"] == 0.1
    assert math.isnan(metrics["test/mean/isbi"])  # one scan: no volume correlation


def test_every_reported_score_has_a_direction():
    assert set(HIGHER_IS_BETTER) == {*SPLIT_METRIC_NAMES, *EXTRA_METRIC_NAMES}
