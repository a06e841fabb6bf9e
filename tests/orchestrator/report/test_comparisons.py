"""Paired comparisons of the report against values worked out by hand."""

import math

import numpy as np
import pytest

from msx.models.metrics import isbi_scores
from msx.orchestrator.report.comparisons import (
    ComparedRow,
    PairedComparison,
    compare_family,
    holm,
    paired_difference,
    patient_of,
    per_patient_values,
    study_comparisons,
)


def test_holm_steps_down_and_keeps_order():
    # Sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04 = 0.04, raised to the running 0.06.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.2, math.nan, 0.6])  # NaN is not in the family: m = 2
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 capped at 1; 0.9 raised to the running 1


def _values(differences):
    first = {(1, f"p{i}"): 1.0 + d for i, d in enumerate(differences)}
    second = {(1, f"p{i}"): 1.0 for i in range(len(differences))}
    return first, second


@pytest.mark.parametrize(
    "differences, p",
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5], 2 / 2**5),  # every difference one way: the most extreme outcome of 5
        ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 2 / 2**6),
        # W- = 4 (rank of -0.4); subsets of ranks 1..6 summing to at most 4: {}, 1, 2, 3, 4, 12, 13 -> 2 x 7 / 64.
        ([0.1, 0.2, 0.3, -0.4, 0.5, 0.6], 14 / 64),
        ([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 2 / 2**5),  # the zero difference is dropped
    ],
)
def test_exact_wilcoxon_p(differences, p):
    n, nonzero, mean, low, high, found = paired_difference(*_values(differences), np.random.default_rng(0))
    assert n == len(differences) and nonzero == np.count_nonzero(differences)
    assert found == pytest.approx(p)
    assert mean == pytest.approx(np.mean(differences))
    assert min(differences) <= low <= mean <= high <= max(differences)


def test_bootstrap_interval_of_the_mean_difference():
    rng = np.random.default_rng(1)
    differences = rng.normal(0.05, 0.02, size=40)
    _, _, mean, low, high, p = paired_difference(*_values(differences), np.random.default_rng(0))
    # The normal-theory interval of the mean, which the percentile bootstrap approaches at this n.
    half = 1.96 * differences.std(ddof=1) / math.sqrt(40)
    assert low == pytest.approx(mean - half, abs=0.3 * half) and high == pytest.approx(mean + half, abs=0.3 * half)
    assert p < 1e-6
    # No difference at all: the interval is the point 0, p is 1.
    assert paired_difference(*_values([0.0] * 5), np.random.default_rng(0))[2:] == (0.0, 0.0, 0.0, 1.0)


def test_only_shared_units_are_paired():
    first = {(1, "a"): 0.5, (2, "b"): 0.6, (3, "c"): 0.7}
    second = {(1, "a"): 0.4, (3, "c"): 0.5}
    n, nonzero, mean, *_ = paired_difference(first, second, np.random.default_rng(0))
    assert (n, nonzero, mean) == (2, 2, pytest.approx(0.15))


def test_smallest_possible_p_says_when_n_is_too_small():
    def comparison(nonzero):
        return PairedComparison("f", "test", "dsc", "a", "b", nonzero, nonzero, 0.1, 0.0, 0.2, 0.0625, 0.0625)

    assert comparison(5).smallest_possible_p == pytest.approx(0.0625) and comparison(5).too_few
    assert comparison(6).smallest_possible_p == pytest.approx(0.03125) and not comparison(6).too_few
    assert comparison(0).too_few


def test_patient_of_a_scan():
    assert patient_of("training04_02") == "training04"
    assert patient_of("sub-01") == "sub-01"


def _row(split, scan, strategy, dsc, pred, gt):
    return {"split": split, "scan": scan, "strategy": strategy, "dsc": dsc, "ppv": 0.5, "lfpr": 0.2, "ltpr": 0.6,
            "tpr": 0.5, "avd": 10.0, "assd": 1.0, "pred_volume_mm3": pred, "gt_volume_mm3": gt}


def test_patient_values_average_its_scans_and_use_the_folds_volume_correlation():
    rows = [
        _row("test", "training05_01", "mean", 0.6, 100.0, 120.0),
        _row("test", "training05_02", "mean", 0.8, 300.0, 280.0),
        _row("test", "training05_03", "mean", math.nan, 200.0, 150.0),
        _row("val", "training04_01", "mean", 0.1, 1.0, 2.0),
        _row("test", "training05_01", "last", 0.0, 1.0, 2.0),
    ]
    assert per_patient_values({3: rows}, "test", "mean", "dsc") == {(3, "training05"): pytest.approx(0.7)}
    expected = np.mean(isbi_scores(
        [{"dsc": r["dsc"], "ppv": 0.5, "lfpr": 0.2, "ltpr": 0.6} for r in rows[:3]],
        [100.0, 300.0, 200.0], [120.0, 280.0, 150.0],
    )[:2])  # the NaN DSC's scan has a NaN score, left out; its volumes still count in the correlation
    assert per_patient_values({3: rows}, "test", "mean", "isbi") == {(3, "training05"): pytest.approx(expected)}


def test_family_is_corrected_together():
    arms = {"a": {(1, f"p{i}"): 0.9 for i in range(6)}, "b": {(1, f"p{i}"): 0.5 + 0.01 * i for i in range(6)},
            "c": {(1, f"p{i}"): 0.5 - 0.01 * i for i in range(6)}}
    found = compare_family("x", "test", "dsc", arms, [("a", "b"), ("a", "c")], np.random.default_rng(0))
    assert [c.p for c in found] == pytest.approx([2 / 64, 2 / 64])
    assert [c.p_holm for c in found] == pytest.approx([4 / 64, 4 / 64])
    assert not any(c.supported for c in found)  # 0.0625 after correcting for two


def test_study_comparisons_families():
    rng = np.random.default_rng(3)

    def fold_rows(shift):
        return {
            fold: [
                _row(split, f"training{fold:02d}_{t:02d}", s, float(rng.uniform(0.4, 0.6)) + shift * (s == "mean"),
                     float(rng.uniform(100, 900)), float(rng.uniform(100, 900)))
                for split in ("val", "test") for t in (1, 2, 3) for s in ("mean", "last", "staple")
            ]
            for fold in range(1, 6)
        }

    rows = [ComparedRow("unet", "mean", fold_rows(0.2)), ComparedRow("segresnet", "last", fold_rows(0.0))]
    found = study_comparisons(rows, ("mean", "last", "staple"), ("test",))
    keys = [(c.family, c.metric, c.first, c.second) for c in found]
    assert keys == [
        ("unet: strategies", "dsc", "last", "mean"), ("unet: strategies", "dsc", "staple", "mean"),
        ("segresnet: strategies", "dsc", "mean", "last"), ("segresnet: strategies", "dsc", "staple", "last"),
        ("backbones", "dsc", "unet (mean)", "segresnet (last)"),
        ("unet: strategies", "isbi", "last", "mean"), ("unet: strategies", "isbi", "staple", "mean"),
        ("segresnet: strategies", "isbi", "mean", "last"), ("segresnet: strategies", "isbi", "staple", "last"),
        ("backbones", "isbi", "unet (mean)", "segresnet (last)"),
    ]
    assert all(c.n == 5 and c.too_few for c in found)  # five patients, one per fold
    unet_last = found[0]
    assert unet_last.mean_difference < -0.1 and unet_last.p == pytest.approx(2 / 32) and not unet_last.supported
    # Seeded: the same study gives the same intervals.
    assert study_comparisons(rows, ("mean", "last", "staple"), ("test",)) == found
