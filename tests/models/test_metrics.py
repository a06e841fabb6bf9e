import math
import warnings

import numpy as np
import pytest

from msx.models.metrics import EXTRA_METRIC_NAMES, METRIC_NAMES, segmentation_metrics, summarise

from .metric_references import mask_with, random_lesion_pair


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
