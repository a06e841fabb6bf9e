"""Paired comparisons of the report against values worked out by hand."""

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

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


def _uncertainty_row(split, scan, strategy, **r_aac):
    return {**_row(split, scan, strategy, 0.5, 100.0, 120.0), **{f"r_aac_{m}": value for m, value in r_aac.items()}}


def test_absent_scores_are_left_out_of_the_patients_mean():
    rows = [
        _uncertainty_row("test", "training05_01", "mean", total=0.2),
        _uncertainty_row("test", "training05_02", "mean", total=0.4),
        _uncertainty_row("test", "training05_03", "mean"),  # a row without uncertainty scores, as read from a CSV
        _uncertainty_row("test", "training06_01", "mean"),
    ]
    assert per_patient_values({2: rows}, "test", "mean", "r_aac_total") == {(2, "training05"): pytest.approx(0.3)}


def _uncertainty_study(rng, lower_total):
    """Five folds of one test patient with three scans each under the chosen strategy "mean": R-AAC under total,
    knowledge and random (whose key comes first, as the worker writes it), total lowered by ``lower_total``."""
    def scores():
        random = float(rng.uniform(0.5, 0.7))
        return {"random": random, "total": random - lower_total + float(rng.uniform(-0.02, 0.02)),
                "knowledge": float(rng.uniform(0.5, 0.7))}

    return {
        fold: [_uncertainty_row("test", f"training{fold:02d}_{t:02d}", s, **scores()) for t in (1, 2, 3)
               for s in ("mean", "last")]
        for fold in range(1, 6)
    }


def _patient_means(fold_rows, key, strategy="mean"):
    """Fold -> its patient's mean ``key`` over the test scans, by hand."""
    return {fold: np.mean([r[key] for r in rows if r["strategy"] == strategy and key in r])
            for fold, rows in fold_rows.items()}


def test_each_measure_against_random_is_one_holm_family_of_patient_means():
    fold_rows = _uncertainty_study(np.random.default_rng(5), lower_total=0.1)
    found = study_comparisons([ComparedRow("unet", "mean", fold_rows)], ("mean", "last"), ("test",))
    measures = [c for c in found if c.family == "unet (mean): uncertainty measures"]
    # One backbone: no backbones family; the strategies' DSC and ISBI families come first, unchanged.
    assert [(c.family, c.metric) for c in found if c not in measures] == [("unet: strategies", "dsc"),
                                                                          ("unet: strategies", "isbi")]
    assert [(c.metric, c.first, c.second) for c in measures] == [("R-AAC", "total", "random"),
                                                                 ("R-AAC", "knowledge", "random")]
    random = _patient_means(fold_rows, "r_aac_random")
    p = []
    for comparison in measures:
        measure = _patient_means(fold_rows, f"r_aac_{comparison.first}")
        differences = [measure[fold] - random[fold] for fold in sorted(fold_rows)]
        assert comparison.n == 5 and comparison.is_r_aac
        assert comparison.mean_difference == pytest.approx(np.mean(differences))
        assert comparison.p == pytest.approx(wilcoxon(differences).pvalue)
        p.append(comparison.p)
    assert measures[0].mean_difference < -0.05  # total ranks the errors better than random: lower R-AAC
    assert [c.p_holm for c in measures] == pytest.approx(holm(p))
    assert measures[0].p_holm == pytest.approx(min(1.0, 2 * min(p)))  # the smaller p, times the family's two


def _without_r_aac(fold_rows):
    return {fold: [{key: value for key, value in r.items() if not key.startswith("r_aac_")} for r in rows]
            for fold, rows in fold_rows.items()}


def test_backbones_are_compared_on_each_measures_r_aac_and_absent_keys_are_skipped():
    rng = np.random.default_rng(8)
    unet, segresnet, swin = (_uncertainty_study(rng, lower_total) for lower_total in (0.1, 0.0, 0.05))
    # A compared protocol's row of segresnet's: no uncertainty scores, left out of its patients' means.
    segresnet[1].append(_row("test", "training01_04", "last", 0.5, 100.0, 120.0))
    # swin's chains were not sampled: its rows hold no R-AAC, so it takes part in no uncertainty comparison.
    swin = _without_r_aac(swin)
    rows = [ComparedRow("unet", "mean", unet), ComparedRow("segresnet", "last", segresnet),
            ComparedRow("swin", "mean", swin)]
    found = study_comparisons(rows, ("mean", "last"), ("test",))
    keys = [(c.family, c.metric, c.first, c.second) for c in found if c.is_r_aac]
    assert keys == [
        ("unet (mean): uncertainty measures", "R-AAC", "total", "random"),
        ("unet (mean): uncertainty measures", "R-AAC", "knowledge", "random"),
        ("segresnet (last): uncertainty measures", "R-AAC", "total", "random"),
        ("segresnet (last): uncertainty measures", "R-AAC", "knowledge", "random"),
        ("backbones", "r_aac_total", "unet (mean)", "segresnet (last)"),
        ("backbones", "r_aac_knowledge", "unet (mean)", "segresnet (last)"),
        ("backbones", "r_aac_random", "unet (mean)", "segresnet (last)"),
    ]
    for comparison in (c for c in found if c.family == "backbones" and c.is_r_aac):
        a = _patient_means(unet, comparison.metric, "mean")
        b = _patient_means(segresnet, comparison.metric, "last")
        differences = [a[fold] - b[fold] for fold in sorted(a)]
        assert comparison.n == 5
        assert comparison.mean_difference == pytest.approx(np.mean(differences))
        assert comparison.p == pytest.approx(wilcoxon(differences).pvalue) == pytest.approx(comparison.p_holm)
    # The DSC and ISBI backbones families still pair all three.
    assert [(c.first, c.second) for c in found if c.family == "backbones" and c.metric == "dsc"] == [
        ("unet (mean)", "segresnet (last)"), ("unet (mean)", "swin (mean)"), ("segresnet (last)", "swin (mean)"),
    ]
    # ... with the intervals they had without any R-AAC: the uncertainty comparisons draw from a stream of their own.
    without = [ComparedRow(r.backbone, r.strategy, _without_r_aac(r.fold_rows)) for r in rows]
    assert study_comparisons(without, ("mean", "last"), ("test",)) == [c for c in found if not c.is_r_aac]


def test_no_r_aac_comparisons_without_r_aac_scores():
    rng = np.random.default_rng(2)
    fold_rows = {fold: [_row("test", f"training{fold:02d}_01", s, float(rng.uniform(0.4, 0.6)), 100.0, 120.0)
                        for s in ("mean", "last")] for fold in range(1, 6)}
    rows = [ComparedRow("unet", "mean", fold_rows), ComparedRow("segresnet", "last", fold_rows)]
    found = study_comparisons(rows, ("mean", "last"), ("test", "val"))
    assert found and not any(c.is_r_aac or "uncertainty" in c.family for c in found)
    assert {c.metric for c in found} == {"dsc", "isbi"}
