"""msx's metrics against independent implementations on random lesion masks, to 1e-6.

References: MONAI for DSC, TPR, PPV and the directed mean surface distances of ASSD; scipy.ndimage.label
with a hand-built neighbourhood for LTPR/LFPR; a k-d tree over surface voxels for ASSD and HD95 (MONAI's
HD95 is defined differently, see test_metrics_extra.py); scipy.stats.pearsonr for the ISBI score's Corr.
Run with ``pytest -s`` to see the largest difference per metric.
"""

import numpy as np
import pytest
import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric, compute_average_surface_distance
from scipy import ndimage, stats

from msx.models.metrics import isbi_scores, segmentation_metrics

from .metric_references import LESION_KINDS, random_lesion_pair, reference_assd, reference_hd95

# MONAI computes in float32 (relative rounding 6e-8), well inside this for ratios and for the few-mm
# distances of these masks.
TOLERANCE = 1e-6
SPACING = (0.5, 1.0, 2.5)
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
