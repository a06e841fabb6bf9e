import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    ConfusionMatrixMetric,
    DiceMetric,
    compute_average_surface_distance,
    compute_hausdorff_distance,
)
from scipy import ndimage, stats

from msx.models.metrics import (
    EXTRA_METRIC_NAMES,
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    SHIFTS_METRIC_NAMES,
    SPLIT_METRIC_NAMES,
    _lesion_structure,
    _symmetric_surface_percentile,
    isbi_scores,
    lesion_f1,
    lesion_volumes,
    mean_isbi_score,
    ndsc,
    ndsc_r_aac,
    ndsc_retention_curve,
    retention_fractions,
    segmentation_metrics,
    split_metrics,
    summarise,
    uncertainty_scores,
)

from .metric_references import (
    LESION_KINDS,
    directed_surface_distances,
    mask_with,
    random_lesion_pair,
    reference_assd,
    reference_hd95,
    reference_lesion_f1,
    reference_ndsc,
    reference_r_aac,
    reference_retention_curve,
)

# Ground truth: a face-connected pair, and two voxels touching only at a corner.
GT = mask_with((5, 5, 5), [(0, 0, 0), (0, 0, 1), (2, 2, 2), (3, 3, 3)])
# Prediction: hits the pair and (3,3,3); (4,4,4) touches (3,3,3) at a corner; (0,4,4) and (1,3,4)
# share an edge and touch nothing.
PRED = mask_with((5, 5, 5), [(0, 0, 1), (3, 3, 3), (4, 4, 4), (0, 4, 4), (1, 3, 4)])


def test_voxel_metrics_by_hand():
    metrics = segmentation_metrics(PRED, GT)
    assert tuple(metrics) == METRIC_NAMES
    # |P| = 5, |G| = 4, overlap 2
    assert metrics["dsc"] == pytest.approx(4 / 9)
    assert metrics["tpr"] == pytest.approx(2 / 4)
    assert metrics["ppv"] == pytest.approx(2 / 5)
    assert metrics["avd"] == pytest.approx(100 * 1 / 4)


@pytest.mark.parametrize(
    "connectivity, ltpr, lfpr",
    [
        # 6: gt lesions {pair}, {222}, {333}: 2 of 3 hit; 5 predicted lesions, 3 touch nothing.
        (6, 2 / 3, 3 / 5),
        # 18: the edge-sharing false positives merge: 4 predicted lesions, 2 touch nothing.
        (18, 2 / 3, 2 / 4),
        # 26: {222, 333} is one gt lesion (hit), {333, 444} one predicted lesion (touching).
        (26, 2 / 2, 1 / 3),
    ],
)
def test_lesion_metrics_depend_on_connectivity(connectivity, ltpr, lfpr):
    metrics = segmentation_metrics(PRED, GT, connectivity=connectivity)
    assert metrics["ltpr"] == pytest.approx(ltpr)
    assert metrics["lfpr"] == pytest.approx(lfpr)


def test_unsupported_connectivity_is_named():
    with pytest.raises(ValueError, match="connectivity 8 "):
        segmentation_metrics(PRED, GT, connectivity=8)


def test_assd_anisotropic_by_hand():
    # spacing (0.5, 1, 2) mm. pred (0,0,3) -> gt (0,0,0): 6 mm; gt (2,0,0) -> pred: sqrt(1 + 36) mm.
    gt = mask_with((3, 1, 4), [(0, 0, 0), (2, 0, 0)])
    pred = mask_with((3, 1, 4), [(0, 0, 3)])
    metrics = segmentation_metrics(pred, gt, spacing=(0.5, 1.0, 2.0))
    # medpy: mean of the directed means (6 and (6 + sqrt 37) / 2), not the pooled mean of three distances.
    assert metrics["assd"] == pytest.approx((6 + (6 + math.sqrt(37)) / 2) / 2)


def test_other_metrics_ignore_spacing():
    isotropic = segmentation_metrics(PRED, GT)
    anisotropic = segmentation_metrics(PRED, GT, spacing=(0.5, 1.0, 3.0))
    assert {k: v for k, v in isotropic.items() if k != "assd"} == {
        k: v for k, v in anisotropic.items() if k != "assd"
    }


NAN = math.nan
EMPTY = np.zeros((3, 3, 3), dtype=bool)
# Several multi-voxel lesions, so that the empty-case answers cannot come from counting one voxel.
LESIONS = random_lesion_pair("spheres", seed=0, spacing=(0.5, 1.0, 2.5))[1]
NO_LESION = np.zeros_like(LESIONS)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        (NO_LESION, NO_LESION, dict(dsc=1, tpr=1, ppv=1, ltpr=1, lfpr=0, avd=0, assd=0, hd95=0)),
        (LESIONS, NO_LESION, dict(dsc=0, tpr=NAN, ppv=0, ltpr=NAN, lfpr=1, avd=NAN, assd=NAN, hd95=NAN)),
        (NO_LESION, LESIONS, dict(dsc=0, tpr=0, ppv=NAN, ltpr=0, lfpr=NAN, avd=100, assd=NAN, hd95=NAN)),
    ],
    ids=["both empty", "truth empty", "prediction empty"],
)
def test_empty_cases(pred, gt, expected, connectivity):
    metrics = segmentation_metrics(pred, gt, spacing=(0.5, 1.0, 2.5), connectivity=connectivity, extra=True)
    assert list(metrics) == list(METRIC_NAMES + EXTRA_METRIC_NAMES)
    for name in METRIC_NAMES + EXTRA_METRIC_NAMES:
        assert metrics[name] == pytest.approx(expected[name], nan_ok=True), name


def test_input_validation():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(EMPTY, np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="3-D"):
        segmentation_metrics(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(EMPTY, EMPTY, spacing=(1.0, 1.0))


def test_accepts_nonzero_labels_as_lesion():
    assert segmentation_metrics(PRED.astype(np.uint8) * 7, GT.astype(float)) == segmentation_metrics(PRED, GT)


def test_summarise_ignores_nan():
    per_scan = [
        {"dsc": 0.5, "ltpr": NAN},
        {"dsc": 0.7, "ltpr": 0.2},
        {"dsc": 0.9, "ltpr": 0.6},
    ]
    summary = summarise(per_scan)
    assert summary["dsc"] == pytest.approx((0.7, math.sqrt((0.04 + 0 + 0.04) / 3)))
    assert summary["ltpr"] == pytest.approx((0.4, 0.2))
    assert summarise(per_scan, ddof=1)["ltpr"] == pytest.approx((0.4, math.sqrt(0.08)))


def test_summarise_all_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarise([{"avd": NAN}, {"avd": NAN}])
        single = summarise([{"avd": 3.0}], ddof=1)
    assert all(math.isnan(value) for value in summary["avd"])
    assert single["avd"][0] == 3.0 and math.isnan(single["avd"][1])


def test_summarise_rejects_mismatched_metrics_and_empty_input():
    with pytest.raises(ValueError, match="same metrics"):
        summarise([{"dsc": 1.0}, {"tpr": 1.0}])
    assert summarise([]) == {}


# --- Shifts 2.0 measures (nDSC, lesion F1, nDSC retention curve and R-AAC) against the straightforward references ---

# (shape, lesion load): loads from a realistic 0.3% up to lesion-heavy, on masks small enough for the references.
SHIFTS_CASES = [((6, 7, 8), 0.003), ((10, 10, 10), 0.02), ((12, 9, 7), 0.15), ((5, 5, 5), 0.4)]


def _shifts_case(shape: tuple, load: float, seed: int):
    """(prediction, truth, uncertainty): the prediction is the truth with about a tenth of the voxels' state flipped
    on top of the lesion load; the uncertainty is rounded to a few levels so that many voxels tie."""
    rng = np.random.default_rng(seed)
    gt = rng.random(shape) < load
    gt.flat[rng.integers(gt.size)] = True
    pred = gt ^ (rng.random(shape) < max(load, 0.02))
    uncertainty = np.round(rng.random(shape) + 0.5 * (pred != gt), 1)
    return pred, gt, uncertainty


@pytest.mark.parametrize("shape, load", SHIFTS_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ndsc_and_lesion_f1_match_the_references(shape, load, seed):
    pred, gt, _ = _shifts_case(shape, load, seed)
    assert ndsc(pred, gt) == pytest.approx(reference_ndsc(pred, gt), abs=1e-5)
    for connectivity in (6, 18, 26):
        expected = reference_lesion_f1(pred, gt, _lesion_structure(connectivity))
        assert lesion_f1(pred, gt, connectivity=connectivity) == pytest.approx(expected, abs=1e-5)


# float32 maps take the sort of packed keys; float64 values with no exact float32 (0.1, 0.3, ...) the stable argsort.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, load", SHIFTS_CASES)
def test_ndsc_retention_curve_and_r_aac_match_the_reference(shape, load, dtype):
    pred, gt, uncertainty = _shifts_case(shape, load, seed=3)
    uncertainty = uncertainty.astype(dtype)
    fractions, values = ndsc_retention_curve(pred, gt, uncertainty)
    expected_fractions, expected_values = reference_retention_curve(pred, gt, uncertainty)
    np.testing.assert_allclose(fractions, expected_fractions, atol=1e-12)
    np.testing.assert_allclose(values, expected_values, atol=1e-5)
    assert ndsc_r_aac(pred, gt, uncertainty) == pytest.approx(reference_r_aac(pred, gt, uncertainty), abs=1e-5)


def test_retention_fractions_are_mswmls_log_spacing():
    fractions = retention_fractions()
    assert fractions.size == 200 and fractions[0] == 0 and fractions[-1] == 1
    assert fractions[1] == pytest.approx(np.log(2) / np.log(200))


def test_ndsc_empty_cases_follow_mswml():
    empty = np.zeros((4, 4, 4), bool)
    lesion = mask_with((4, 4, 4), [(1, 1, 1)])
    assert ndsc(empty, empty) == 1.0
    assert ndsc(lesion, empty) == 0.0  # an empty truth: k = 1 and no true positive
    assert ndsc(empty, lesion) == 0.0


def test_ndsc_reweights_false_positives_to_the_reference_load():
    # |G| = 1 of N = 64: k = 0.999 * 1 / (0.001 * 63); one hit and one false positive.
    gt = mask_with((4, 4, 4), [(1, 1, 1)])
    pred = mask_with((4, 4, 4), [(1, 1, 1), (3, 3, 3)])
    k = 0.999 / (0.001 * 63)
    assert ndsc(pred, gt) == pytest.approx(2 / (k + 2))


def test_lesion_f1_empty_cases_follow_mswml():
    empty = np.zeros((4, 4, 4), bool)
    lesion = mask_with((4, 4, 4), [(1, 1, 1)])
    assert lesion_f1(empty, empty) == 1.0
    assert lesion_f1(lesion, empty) == 0.0
    assert lesion_f1(empty, lesion) == 0.0


def test_lesion_f1_counts_a_match_from_an_iou_of_a_quarter():
    # A true lesion of 4 voxels; a predicted lesion covering 1 of them (IoU 1/4, a match) and one covering 1 of
    # another true lesion of 5 (IoU 1/5, a false positive and a false negative).
    gt = mask_with((9, 9, 9), [(0, 0, z) for z in range(4)] + [(5, 5, z) for z in range(5)])
    pred = mask_with((9, 9, 9), [(0, 0, 0), (5, 5, 0)])
    assert lesion_f1(pred, gt) == pytest.approx(1 / (1 + (1 + 1) / 2))


def test_retention_orders_ties_stably():
    # Four voxels of one uncertainty: the cut keeps the first in index order. With one voxel in the prediction wrong
    # (index 0 or index 3), the curve differs unless ties keep index order.
    gt = np.zeros((1, 1, 4), bool)
    gt[0, 0, 1] = True
    uncertainty = np.zeros((1, 1, 4))
    fractions = np.array([0.0, 0.25, 0.5, 1.0])
    wrong_first = gt.copy()
    wrong_first[0, 0, 0] = True
    wrong_last = gt.copy()
    wrong_last[0, 0, 3] = True
    k = 0.999 * 1 / (0.001 * 3)
    _, first = ndsc_retention_curve(wrong_first, gt, uncertainty, fractions=fractions)
    _, last = ndsc_retention_curve(wrong_last, gt, uncertainty, fractions=fractions)
    np.testing.assert_allclose(first, [1, 2 / (k + 2), 2 / (k + 2), 2 / (k + 2)])
    np.testing.assert_allclose(last, [1, 1, 1, 2 / (k + 2)])


def test_retention_counts_only_the_brain_masks_voxels():
    pred, gt, uncertainty = _shifts_case((8, 8, 8), 0.05, seed=5)
    brain = np.zeros((8, 8, 8), bool)
    brain[1:7, 2:8, 0:6] = True
    # Outside the brain the prediction is wrong everywhere: it must not count.
    pred = np.where(brain, pred, ~gt)
    expected = reference_r_aac(pred, gt, uncertainty, brain_mask=brain)
    assert ndsc_r_aac(pred, gt, uncertainty, brain_mask=brain) == pytest.approx(expected, abs=1e-5)
    assert ndsc_r_aac(pred[brain], gt[brain], uncertainty[brain]) == pytest.approx(expected, abs=1e-5)


def test_perfect_prediction_has_no_area_above_the_curve():
    _, gt, uncertainty = _shifts_case((6, 6, 6), 0.1, seed=2)
    assert ndsc_r_aac(gt, gt, uncertainty) == pytest.approx(0.0, abs=1e-12)


def test_retention_refuses_nan_uncertainty_and_mismatched_shapes():
    pred, gt, uncertainty = _shifts_case((4, 4, 4), 0.1, seed=0)
    uncertainty[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ndsc_r_aac(pred, gt, uncertainty)
    with pytest.raises(ValueError, match="shape"):
        ndsc_r_aac(pred, gt, np.zeros((4, 4, 5)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_retention_orders_negative_signed_zero_and_infinite_values(dtype):
    pred, gt, _ = _shifts_case((6, 6, 6), 0.1, seed=4)
    levels = np.array([-np.inf, -1.5, -0.0, 0.0, 2.0, np.inf]) if dtype != np.int16 else np.array([-300, -1, 0, 7])
    uncertainty = np.random.default_rng(4).choice(levels, size=pred.shape).astype(dtype)
    expected = reference_r_aac(pred, gt, uncertainty)
    assert ndsc_r_aac(pred, gt, uncertainty) == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The extra metrics
# HD95, the ISBI 2015 score and a fold's split scores (msx.models.metrics extras).
# --------------------------------------------------------------------------------------------------------------


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
    # in mm (3.6e-6 measured), looser than the 1e-6 of the agreement checks below for that reason alone.
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
        return {
            "split": split, "scan": scan, "strategy": strategy, **metrics, "pred_volume_mm3": pred_volume,
            "gt_volume_mm3": 100.0 * scan
        }

    rows = [row("val", 1, "mean", 0.2, 90.0), row("val", 2, "mean", math.nan, 210.0), row("val", 3, "mean", 0.6, 280.0)]
    rows += [row("test", 4, "mean", 0.5, 350.0), row("test", 4, "last", 0.1, 10.0)]

    metrics = split_metrics(rows)

    assert set(metrics) == {
        f"{split}/{strategy}/{metric}"
        for split, strategy in (("val", "mean"), ("test", "mean"), ("test", "last"))
        for metric in SPLIT_METRIC_NAMES
    }
    assert metrics["val/mean/dsc"] == pytest.approx(0.4)  # NaN left out
    assert metrics["val/mean/avd"] == pytest.approx(20.0)
    assert metrics["val/mean/isbi"] == pytest.approx(mean_isbi_score(rows[:3]))
    assert metrics["test/mean/dsc"] == 0.5 and metrics["test/last/dsc"] == 0.1
    assert math.isnan(metrics["test/mean/isbi"])  # one scan: no volume correlation


def test_every_reported_score_has_a_direction():
    assert set(HIGHER_IS_BETTER) == {*SPLIT_METRIC_NAMES, *EXTRA_METRIC_NAMES, *SHIFTS_METRIC_NAMES}


# --------------------------------------------------------------------------------------------------------------
# Agreement with independent implementations (SPACING as above)
# msx's metrics against independent implementations on random lesion masks, to 1e-6.
#
# References: MONAI for DSC, TPR, PPV and the directed mean surface distances of ASSD; scipy.ndimage.label
# with a hand-built neighbourhood for LTPR/LFPR; a k-d tree over surface voxels for ASSD and HD95 (MONAI's
# HD95 is defined differently, see the extra metrics above); scipy.stats.pearsonr for the ISBI score's Corr.
# Run with ``pytest -s`` to see the largest difference per metric.
# --------------------------------------------------------------------------------------------------------------


# MONAI computes in float32 (relative rounding 6e-8), well inside this for ratios and for the few-mm
# distances of these masks.
TOLERANCE = 1e-6
SEEDS = range(4)
CASES = [pytest.param(kind, seed, id=f"{kind}-seed{seed}") for kind in LESION_KINDS for seed in SEEDS]
SURFACE_SPACINGS = [SPACING, (1.0, 1.0, 1.0), (3.0, 0.7, 1.2)]


def as_monai(mask: np.ndarray) -> torch.Tensor:
    """(batch, channel, *spatial) float tensor, as MONAI's metrics take one-hot input."""
    return torch.from_numpy(mask)[None, None].float()


def monai_voxel_metric(metric: str, pred: np.ndarray, gt: np.ndarray) -> float:
    if metric == "dsc":
        dice = DiceMetric(include_background=True)
        dice(as_monai(pred), as_monai(gt))
        return dice.aggregate().item()
    monai_name = {"tpr": "sensitivity", "ppv": "precision"}[metric]
    confusion = ConfusionMatrixMetric(include_background=True, metric_name=monai_name)
    confusion(as_monai(pred), as_monai(gt))
    return confusion.aggregate()[0].item()


@pytest.mark.parametrize("metric", ["dsc", "tpr", "ppv"])
@pytest.mark.parametrize("kind, seed", CASES)
def test_voxel_metrics_match_monai(metric, kind, seed, agreement):
    pred, gt = random_lesion_pair(kind, seed, SPACING)
    msx_value = segmentation_metrics(pred, gt, spacing=SPACING)[metric]
    agreement.check(metric, msx_value, monai_voxel_metric(metric, pred, gt), TOLERANCE)


@pytest.mark.parametrize("kind, seed", CASES)
def test_avd_by_hand(kind, seed, agreement):
    pred, gt = random_lesion_pair(kind, seed, SPACING)
    by_hand = 100 * abs(int(pred.sum()) - int(gt.sum())) / int(gt.sum())
    agreement.check("avd", segmentation_metrics(pred, gt, spacing=SPACING)["avd"], by_hand, TOLERANCE)


def neighbourhood(connectivity: int) -> np.ndarray:
    """3x3x3 neighbourhood: offsets that change at most 1 (faces), 2 (+ edges) or 3 (+ corners) coordinates."""
    changed_coordinates = np.abs(np.indices((3, 3, 3)) - 1).sum(axis=0)
    structure = changed_coordinates <= {6: 1, 18: 2, 26: 3}[connectivity]
    assert structure.sum() == connectivity + 1
    return structure


def reference_lesion_rates(pred: np.ndarray, gt: np.ndarray, connectivity: int) -> dict[str, float]:
    """LTPR and LFPR one lesion at a time."""
    gt_labels, gt_lesions = ndimage.label(gt, structure=neighbourhood(connectivity))
    pred_labels, pred_lesions = ndimage.label(pred, structure=neighbourhood(connectivity))
    hit = sum(pred[gt_labels == lesion].any() for lesion in range(1, gt_lesions + 1))
    false = sum(not gt[pred_labels == lesion].any() for lesion in range(1, pred_lesions + 1))
    return {"ltpr": hit / gt_lesions, "lfpr": false / pred_lesions}


@pytest.mark.parametrize("metric", ["ltpr", "lfpr"])
@pytest.mark.parametrize("connectivity", [6, 18, 26], ids=lambda c: f"connectivity{c}")
@pytest.mark.parametrize("kind, seed", CASES)
def test_lesion_rates_match_labelling_lesion_by_lesion(metric, connectivity, kind, seed, agreement):
    pred, gt = random_lesion_pair(kind, seed, SPACING)
    msx_value = segmentation_metrics(pred, gt, spacing=SPACING, connectivity=connectivity)[metric]
    reference = reference_lesion_rates(pred, gt, connectivity)[metric]
    agreement.check(f"{metric} ({connectivity})", msx_value, reference, TOLERANCE)


@pytest.mark.parametrize("metric", ["assd", "hd95"])
@pytest.mark.parametrize("spacing", SURFACE_SPACINGS, ids=lambda s: "spacing" + "x".join(map(str, s)))
@pytest.mark.parametrize("kind, seed", CASES)
def test_surface_metrics_match_kd_tree(metric, spacing, kind, seed, agreement):
    pred, gt = random_lesion_pair(kind, seed, spacing)
    msx_value = segmentation_metrics(pred, gt, spacing=spacing, extra=True)[metric]
    reference = {"assd": reference_assd, "hd95": reference_hd95}[metric](pred, gt, spacing)
    agreement.check(metric, msx_value, reference, TOLERANCE)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize("kind, seed", CASES)
def test_assd_is_the_mean_of_monai_directed_surface_distances(kind, seed, agreement):
    # MONAI's symmetric=True pools both distance sets; medpy's ASSD averages the two directed means.
    pred, gt = random_lesion_pair(kind, seed, SPACING)

    def directed(source: np.ndarray, target: np.ndarray) -> float:
        return compute_average_surface_distance(
            as_monai(source), as_monai(target), include_background=True, spacing=SPACING
        ).item()

    monai_assd = (directed(pred, gt) + directed(gt, pred)) / 2
    agreement.check("assd (MONAI)", segmentation_metrics(pred, gt, spacing=SPACING)["assd"], monai_assd, TOLERANCE)


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_isbi_scores_with_pearson_over_the_scans(kind, agreement):
    pairs = [random_lesion_pair(kind, seed, SPACING) for seed in SEEDS]
    per_scan = [segmentation_metrics(pred, gt, spacing=SPACING) for pred, gt in pairs]
    voxel_volume = float(np.prod(SPACING))
    pred_volumes = [pred.sum() * voxel_volume for pred, _ in pairs]
    gt_volumes = [gt.sum() * voxel_volume for _, gt in pairs]
    corr = stats.pearsonr(pred_volumes, gt_volumes).statistic
    reference = [
        (scan["dsc"] + scan["ppv"]) / 8 + (1 - scan["lfpr"] + scan["ltpr"] + corr) / 4 for scan in per_scan
    ]
    agreement.check("isbi", isbi_scores(per_scan, pred_volumes, gt_volumes), reference, TOLERANCE)


def test_uncertainty_scores_hold_each_measures_r_aac_and_the_random_orders_over_the_brain():
    pred, gt, uncertainty = _shifts_case((12, 14, 10), 0.05, seed=5)
    pred, gt = pred.astype(bool), gt.astype(bool)
    brain = np.zeros(gt.shape, dtype=bool)
    brain[1:-1, 1:-1, 1:-1] = True
    random_order = np.random.default_rng(0).random(gt.shape)
    shifts = uncertainty_scores(pred, gt, {"total": uncertainty}, random_order, brain, connectivity=18)
    scores = shifts.scores
    assert scores == {
        "ndsc": pytest.approx(reference_ndsc(pred, gt), abs=1e-5),
        "lesion_f1": pytest.approx(reference_lesion_f1(pred, gt, _lesion_structure(18)), abs=1e-5),
        "r_aac_total": pytest.approx(reference_r_aac(pred[brain], gt[brain], uncertainty[brain]), abs=1e-5),
        "r_aac_random": pytest.approx(reference_r_aac(pred[brain], gt[brain], random_order[brain]), abs=1e-5),
    }
    # An uncertainty that ranks the errors first retains better than a random order.
    assert scores["r_aac_total"] < scores["r_aac_random"]
    # The curves the R-AACs are the areas above: nDSC at each retention fraction, 1 when all is replaced by the truth.
    fractions = retention_fractions()
    for measure, values in (("total", uncertainty), ("random", random_order)):
        _, expected = ndsc_retention_curve(pred, gt, values, brain_mask=brain)
        np.testing.assert_array_equal(shifts.curves[measure], expected)
        assert shifts.curves[measure][0] == pytest.approx(1.0)
        assert scores[f"r_aac_{measure}"] == pytest.approx(
            1 - np.trapezoid(shifts.curves[measure], fractions), abs=1e-12
        )


def test_split_metrics_average_the_uncertainty_scores_where_the_rows_have_them():
    rows = [
        {"split": "test", "scan": scan, "strategy": "mean", **dict.fromkeys(METRIC_NAMES, 0.5),
         "pred_volume_mm3": 10.0 * scan, "gt_volume_mm3": 12.0, "ndsc": 0.2 * scan, "r_aac_total": 0.1 * scan}
        for scan in (1, 2)
    ]
    metrics = split_metrics(rows)
    assert metrics["test/mean/ndsc"] == pytest.approx(0.3) and metrics["test/mean/r_aac_total"] == pytest.approx(0.15)
    assert "test/mean/lesion_f1" not in metrics  # not evaluated: not invented
