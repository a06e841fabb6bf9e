"""From finished trials to the study's answer: LOSO tables and the selected configuration.

Selection uses validation patients only; test metrics are aggregated for the report and never looked at
when choosing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msx.models.fold import EVALUATED_SPLITS
from msx.models.metrics import HIGHER_IS_BETTER, SPLIT_METRIC_NAMES, is_uncertainty_score, protocol_prefix

from .trial import FINAL_REPORT, TrialConfig


@dataclass(frozen=True)
class TrialOutcome:
    """One finished trial: its final metrics (`val/mean/dsc`, ...) and the folder of its final checkpoint."""

    trial: TrialConfig
    metrics: dict[str, float]
    checkpoint_path: str | None


@dataclass(frozen=True)
class ConfigurationResult:
    configuration: str
    backbone: str
    searched: dict[str, Any]
    folds: tuple[TrialOutcome, ...]
    # (split, strategy, metric) -> (mean, std) over folds
    summary: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)

    def score(self, strategy: str, metric: str, split: str = "val") -> float:
        return self.summary.get((split, strategy, metric), (math.nan, math.nan))[0]


@dataclass(frozen=True)
class Selection:
    configuration: ConfigurationResult
    strategy: str
    metric: str
    validation_score: float


def outcome_from_result(trial: TrialConfig, metrics: dict[str, Any]) -> TrialOutcome | None:
    """None for trials that did not reach their final evaluation (failed or stopped early).

    `metrics` is flat: "test/mean/dsc", as the worker reported it (Tune nests such keys; flatten first).
    """
    if not metrics or not metrics.get(FINAL_REPORT):
        return None
    return TrialOutcome(
        trial=trial,
        metrics={k: float(v) for k, v in metrics.items() if "/" in k and isinstance(v, (int, float))},
        checkpoint_path=metrics.get("checkpoint_path"),
    )


def summarise_configurations(
    outcomes: Iterable[TrialOutcome], strategies: tuple[str, ...], fold_count: int, protocol: str | None = None
) -> list[ConfigurationResult]:
    """Configurations with every fold finished, each summarised as mean +- std over folds.

    `protocol`: a compared protocol's metrics instead of the study's own (`protocol_prefix`).
    """
    prefix = protocol_prefix(protocol)
    by_configuration: dict[str, list[TrialOutcome]] = {}
    for outcome in outcomes:
        by_configuration.setdefault(outcome.trial.configuration, []).append(outcome)
    results = []
    for name, folds in sorted(by_configuration.items()):
        if len({f.trial.fold for f in folds}) < fold_count:
            continue
        folds = sorted(folds, key=lambda f: f.trial.fold)
        summary = {}
        for split in EVALUATED_SPLITS:
            for strategy in strategies:
                for metric in (*SPLIT_METRIC_NAMES, *_uncertainty_scores_of(folds, f"{prefix}{split}/{strategy}/")):
                    values = np.array([f.metrics.get(f"{prefix}{split}/{strategy}/{metric}", math.nan) for f in folds])
                    finite = values[~np.isnan(values)]
                    summary[(split, strategy, metric)] = (
                        (float(finite.mean()), float(finite.std())) if finite.size else (math.nan, math.nan)
                    )
        trial = folds[0].trial
        results.append(ConfigurationResult(name, trial.backbone, dict(trial.searched), tuple(folds), summary))
    return results


def _uncertainty_scores_of(folds: list[TrialOutcome], key_prefix: str) -> list[str]:
    """The uncertainty scores (metrics.is_uncertainty_score) the folds report under ``key_prefix``, in their order."""
    names = (key.removeprefix(key_prefix) for fold in folds for key in fold.metrics if key.startswith(key_prefix))
    return list(dict.fromkeys(name for name in names if is_uncertainty_score(name)))


def select_best(
    configurations: list[ConfigurationResult], strategies: tuple[str, ...], metric: str
) -> Selection | None:
    """The (configuration, strategy) with the best mean validation score over folds."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    candidates = [
        (sign * c.score(s, metric), c, s)
        for c in configurations
        for s in strategies
        if not math.isnan(c.score(s, metric))
    ]
    if not candidates:
        return None
    _, configuration, strategy = max(candidates, key=lambda item: item[0])
    return Selection(configuration, strategy, metric, configuration.score(strategy, metric))


def best_per_backbone(
    configurations: list[ConfigurationResult], strategies: tuple[str, ...], metric: str
) -> list[ConfigurationResult]:
    """For the table: each backbone's configuration chosen on validation."""
    chosen = {}
    for backbone in sorted({c.backbone for c in configurations}):
        selection = select_best([c for c in configurations if c.backbone == backbone], strategies, metric)
        if selection is not None:
            chosen[backbone] = selection.configuration
    return list(chosen.values())


@dataclass(frozen=True)
class SummaryCell:
    """One metric of one (backbone, strategy) row: mean and std over folds, and whether it is its column's best."""

    mean: float
    std: float
    best: bool


def summary_rows(
    configurations: list[ConfigurationResult], strategies: tuple[str, ...], split: str = "test"
) -> list[tuple[str, str, tuple[SummaryCell, ...]]]:
    """(backbone, strategy, one cell per metric of SPLIT_METRIC_NAMES) rows; the best mean of each column marked,
    lower being better for LFPR, AVD and ASSD."""
    best = {}
    for metric in SPLIT_METRIC_NAMES:
        means = [c.summary[(split, s, metric)][0] for c in configurations for s in strategies]
        means = [m for m in means if not math.isnan(m)]
        if means:
            best[metric] = max(means) if HIGHER_IS_BETTER[metric] else min(means)
    rows = []
    for configuration in configurations:
        for strategy in strategies:
            cells = []
            for metric in SPLIT_METRIC_NAMES:
                mean, std = configuration.summary[(split, strategy, metric)]
                cells.append(SummaryCell(mean, std, metric in best and mean == best[metric]))
            rows.append((configuration.backbone, strategy, tuple(cells)))
    return rows


def format_cell(cell: SummaryCell) -> str:
    return "n/a" if math.isnan(cell.mean) else f"{cell.mean:.3f} ± {cell.std:.3f}"


def results_table(
    configurations: list[ConfigurationResult], strategies: tuple[str, ...], split: str = "test"
) -> str:
    """Backbone x strategy rows, metric columns, mean +- std over folds; the best value per column starred."""
    headers = ["backbone", "strategy"] + [m.upper() for m in SPLIT_METRIC_NAMES]
    rows = [
        [backbone, strategy] + [format_cell(cell) + ("*" if cell.best else "") for cell in cells]
        for backbone, strategy, cells in summary_rows(configurations, strategies, split)
    ]
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) for line in [headers] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
