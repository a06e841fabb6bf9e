"""Which differences in a study's tables are real: paired comparisons of strategies (within a backbone) and of
backbones (each at its strategy chosen on validation), per split, for DSC and the ISBI score; and, where the folds
scored uncertainty, of each backbone's uncertainty measures against a random voxel order and of the backbones on
each measure, by nDSC R-AAC (lower is better) of the chosen strategy's masks.

The unit is the patient within its fold: a patient's time points share anatomy, lesions and scanner, so its scans
are not independent samples, and testing over scans would overstate the evidence. Each patient's value is the mean
over its scans in that fold's split (the ISBI score of a scan uses the volume correlation over its fold's scans of
the split, as the tables do); two arms are paired on the patients both have a finite value for.

Each pair gets the Wilcoxon signed-rank test (two-sided, scipy; exact for the small n of these studies, zero
differences dropped as Wilcoxon did), the Holm correction within its family (the comparisons of one table for one
split and metric), and a percentile bootstrap confidence interval of the mean paired difference (scipy's
bootstrap over the differences, i.e. resampling whole pairs). With m non-zero differences the exact two-sided p
cannot go below 2 / 2^m: under six patients no difference can reach p < 0.05, whatever its size.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats

from msx.models.metrics import ISBI_SCORE, R_AAC_PREFIX, RANDOM_UNCERTAINTY, isbi_scores, r_aac_key

ALPHA = 0.05
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
COMPARED_METRICS = ("dsc", ISBI_SCORE)
# The metric of a family whose arms are one backbone's uncertainty measures: each arm is its own measure's R-AAC.
MEASURES_METRIC = "R-AAC"
_SCAN_ID = re.compile(r"^(.*)_(\d+)$")  # trainingPP_TT: the patient is what precedes the time point

# (fold, patient) -> value
PairedValues = dict[tuple[int, str], float]


@dataclass(frozen=True)
class PairedComparison:
    """``first`` minus ``second`` over the units both have (n), in one family of comparisons."""

    family: str
    split: str
    metric: str
    first: str
    second: str
    n: int
    nonzero: int
    mean_difference: float
    ci_low: float
    ci_high: float
    p: float
    p_holm: float

    @property
    def smallest_possible_p(self) -> float:
        """The exact two-sided Wilcoxon p of the most extreme outcome with this many non-zero differences."""
        return min(1.0, 2.0 / 2**self.nonzero) if self.nonzero else 1.0

    @property
    def too_few(self) -> bool:
        """No outcome could be significant at ALPHA with this n."""
        return self.smallest_possible_p >= ALPHA

    @property
    def supported(self) -> bool:
        return not math.isnan(self.p_holm) and self.p_holm < ALPHA

    @property
    def is_r_aac(self) -> bool:
        """Compares R-AAC, where lower is better (DSC and ISBI: higher)."""
        return self.metric == MEASURES_METRIC or self.metric.startswith(R_AAC_PREFIX)


def patient_of(scan_id: str) -> str:
    """``training04_02`` -> ``training04``; any other name is its own patient."""
    match = _SCAN_ID.match(scan_id)
    return match[1] if match else scan_id


def per_patient_values(
    fold_rows: Mapping[int, Sequence[Mapping[str, Any]]], split: str, strategy: str, metric: str
) -> PairedValues:
    """(fold, patient) -> the patient's mean ``metric`` over its scans of ``split`` under ``strategy``.

    ``fold_rows``: fold -> that fold's per-scan rows (``split``, ``scan``, ``strategy``, the metrics and lesion
    volumes, as the worker writes them). NaN or absent scan values are left out (a compared protocol's rows hold no
    uncertainty scores, and empty cells are dropped on reading); a patient with none is left out.
    """
    values: dict[tuple[int, str], list[float]] = {}
    for fold, rows in fold_rows.items():
        scans = [row for row in rows if row["split"] == split and row["strategy"] == strategy]
        if metric == ISBI_SCORE:
            scores = isbi_scores(
                [{name: float(row[name]) for name in ("dsc", "ppv", "lfpr", "ltpr")} for row in scans],
                [float(row["pred_volume_mm3"]) for row in scans],
                [float(row["gt_volume_mm3"]) for row in scans],
            ) if scans else []
        else:
            scores = [float(row.get(metric, math.nan)) for row in scans]
        for row, score in zip(scans, scores, strict=True):
            if not math.isnan(score):
                values.setdefault((fold, patient_of(str(row["scan"]))), []).append(score)
    return {unit: float(np.mean(scores)) for unit, scores in values.items()}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count in the family).

    By hand: scipy has only Benjamini-Hochberg (false_discovery_control), and statsmodels' multipletests is not
    worth a dependency for these few lines.
    """
    finite = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_difference(
    first: PairedValues, second: PairedValues, rng: np.random.Generator
) -> tuple[int, int, float, float, float, float]:
    """(n, non-zero differences, mean difference, CI low, CI high, Wilcoxon p) of first - second over shared units."""
    units = sorted(set(first) & set(second))
    differences = np.array([first[unit] - second[unit] for unit in units])
    n = len(units)
    nonzero = int(np.count_nonzero(differences))
    if n == 0:
        return 0, 0, math.nan, math.nan, math.nan, math.nan
    mean = float(differences.mean())
    if n < 2 or np.ptp(differences) == 0:
        low = high = mean  # one value or all equal: every resample has the same mean
    else:
        interval = stats.bootstrap(
            (differences,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
            method="percentile", rng=rng,
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
    if nonzero == 0:
        p = 1.0
    else:
        with warnings.catch_warnings():  # scipy warns when it drops the zero differences, as asked
            warnings.simplefilter("ignore")
            p = float(stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)
    return n, nonzero, mean, low, high, p


def compare_family(
    family: str, split: str, metric: str, arms: Mapping[str, PairedValues], pairs: Iterable[tuple[str, str]],
    rng: np.random.Generator,
) -> list[PairedComparison]:
    """The pairs of ``arms`` (label -> per-unit values) compared, their p-values Holm-corrected together."""
    raw = [(first, second, *paired_difference(arms[first], arms[second], rng)) for first, second in pairs]
    adjusted = holm([result[-1] for result in raw])
    return [
        PairedComparison(family, split, metric, first, second, n, nonzero, mean, low, high, p, p_holm)
        for (first, second, n, nonzero, mean, low, high, p), p_holm in zip(raw, adjusted, strict=True)
    ]


@dataclass(frozen=True)
class ComparedRow:
    """A backbone's configuration chosen on validation: its per-fold scan rows and its strategy chosen on validation."""

    backbone: str
    strategy: str
    fold_rows: Mapping[int, Sequence[Mapping[str, Any]]]


def uncertainty_measures(
    fold_rows: Mapping[int, Sequence[Mapping[str, Any]]], split: str, strategy: str
) -> list[str]:
    """The measures whose R-AAC some scan of ``split`` under ``strategy`` holds, in order of appearance,
    RANDOM_UNCERTAINTY last (the common comparator)."""
    measures = dict.fromkeys(
        key.removeprefix(R_AAC_PREFIX)
        for rows in fold_rows.values()
        for row in rows
        if row["split"] == split and row["strategy"] == strategy
        for key in row
        if key.startswith(R_AAC_PREFIX)
    )
    random_last = [RANDOM_UNCERTAINTY] if RANDOM_UNCERTAINTY in measures else []
    return [measure for measure in measures if measure != RANDOM_UNCERTAINTY] + random_last


def uncertainty_comparisons(
    rows: Sequence[ComparedRow], split: str, rng: np.random.Generator
) -> list[PairedComparison]:
    """Within each backbone, every uncertainty measure's R-AAC against the random order's, at its chosen strategy;
    then the backbones pairwise on each measure's R-AAC, among those whose rows hold it. None without R-AAC."""
    comparisons: list[PairedComparison] = []
    held = {row.backbone: uncertainty_measures(row.fold_rows, split, row.strategy) for row in rows}
    for row in rows:
        measures = held[row.backbone]
        if RANDOM_UNCERTAINTY not in measures:
            continue
        arms = {m: per_patient_values(row.fold_rows, split, row.strategy, r_aac_key(m)) for m in measures}
        against_random = [(m, RANDOM_UNCERTAINTY) for m in measures if m != RANDOM_UNCERTAINTY]
        family = f"{row.backbone} ({row.strategy}): uncertainty measures"
        comparisons += compare_family(family, split, MEASURES_METRIC, arms, against_random, rng)
    every_measure = dict.fromkeys(m for measures in held.values() for m in measures)
    for measure in sorted(every_measure, key=lambda m: m == RANDOM_UNCERTAINTY):  # stable: random last
        metric = r_aac_key(measure)
        arms = {
            f"{row.backbone} ({row.strategy})": per_patient_values(row.fold_rows, split, row.strategy, metric)
            for row in rows
            if measure in held[row.backbone]
        }
        if len(arms) > 1:
            comparisons += compare_family("backbones", split, metric, arms, list(combinations(arms, 2)), rng)
    return comparisons


def study_comparisons(
    rows: Sequence[ComparedRow], strategies: Sequence[str], splits: Sequence[str], seed: int = 0
) -> list[PairedComparison]:
    """Per split: for each metric of COMPARED_METRICS, within each backbone every other strategy against its chosen
    one, then the backbones pairwise, each at its chosen strategy; then the R-AAC comparisons
    (uncertainty_comparisons). Seeded: the same study gives the same intervals."""
    rng = np.random.default_rng(seed)
    # A stream of its own, so that a study's DSC and ISBI intervals do not depend on whether its folds scored
    # uncertainty.
    uncertainty_rng = np.random.default_rng((seed, 1))
    comparisons: list[PairedComparison] = []
    for split in splits:
        for metric in COMPARED_METRICS:
            for row in rows:
                arms = {s: per_patient_values(row.fold_rows, split, s, metric) for s in strategies}
                others = [(s, row.strategy) for s in strategies if s != row.strategy]
                comparisons += compare_family(f"{row.backbone}: strategies", split, metric, arms, others, rng)
            if len(rows) > 1:
                arms = {
                    f"{row.backbone} ({row.strategy})": per_patient_values(row.fold_rows, split, row.strategy, metric)
                    for row in rows
                }
                comparisons += compare_family("backbones", split, metric, arms, list(combinations(arms, 2)), rng)
        comparisons += uncertainty_comparisons(rows, split, uncertainty_rng)
    return comparisons
