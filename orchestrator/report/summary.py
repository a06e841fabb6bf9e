"""A study's results as the report shows them, recomputed from its record with the functions the launch itself used
(results.py), so the report agrees with what the launch printed and registered."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from msx.models.engine import InferenceConfig

from ..results import ConfigurationResult, Selection, best_per_backbone, select_best, summarise_configurations
from .comparisons import ComparedRow
from .record import ReportError, RetentionCurves, StudyRecord, TrialRun, read_retention_curves, read_scan_rows


@dataclass(frozen=True)
class ProtocolScores:
    """The rows' configurations (the same trained weights) scored under a compared inference protocol."""

    protocol: str
    rows: tuple[ConfigurationResult, ...]


@dataclass(frozen=True)
class StudySummary:
    strategies: tuple[str, ...]
    fold_count: int
    # Each backbone's configuration chosen on validation: the rows of the tables and figures.
    rows: tuple[ConfigurationResult, ...]
    selection: Selection | None
    # The study's inference protocol, and the rows under each protocol its final evaluation was also scored with.
    protocol: str = InferenceConfig.protocol
    compared: tuple[ProtocolScores, ...] = ()


def summarise_study(record: StudyRecord) -> StudySummary:
    """The launch's tables and selection, recomputed from its finished trials."""
    strategies = tuple(record.spec["inference"]["strategies"])
    outcomes = [trial.outcome for trial in record.trials if trial.outcome is not None]
    if not outcomes:
        raise ReportError(
            f"study {record.study!r}, launch {record.launch}: {trials_line(record.trials)}; nothing to report"
        )
    # The spec names its folds by plan ("paper", "loso") whose size depends on the cohort; a launch creates
    # every fold's run of a configuration when it starts it, so the runs give the fold count.
    fold_count = len({trial.fold for trial in record.trials})
    configurations = summarise_configurations(outcomes, strategies, fold_count)
    if not configurations:
        raise ReportError(
            f"study {record.study!r}, launch {record.launch}: no configuration finished all its {fold_count} folds "
            f"({trials_line(record.trials)})"
        )
    metric = record.spec["registry"]["selection_metric"]
    rows = tuple(best_per_backbone(configurations, strategies, metric))
    inference = record.spec["inference"]
    compared = []
    for protocol in inference.get("compare_protocols", ()):
        scored = {c.configuration: c for c in summarise_configurations(outcomes, strategies, fold_count, protocol)}
        compared.append(
            ProtocolScores(protocol, tuple(scored[r.configuration] for r in rows if r.configuration in scored))
        )
    return StudySummary(
        strategies=strategies,
        fold_count=fold_count,
        rows=rows,
        selection=select_best(configurations, strategies, metric),
        # Launches from before protocols existed ran msx's.
        protocol=inference.get("protocol", "msx"),
        compared=tuple(compared),
    )


def unfinished_label(trial: TrialRun) -> str:
    # Tune ends a trial its scheduler stopped as FINISHED too; only the missing final evaluation tells.
    return "stopped early" if trial.status == "FINISHED" else trial.status.lower()


def trials_line(trials: tuple[TrialRun, ...]) -> str:
    """'10 of 12 trials finished; not finished: 1 failed, 1 stopped early'."""
    finished = sum(trial.outcome is not None for trial in trials)
    line = f"{finished} of {len(trials)} trials finished"
    not_finished = Counter(unfinished_label(trial) for trial in trials if trial.outcome is None)
    if not_finished:
        line += "; not finished: " + ", ".join(f"{count} {label}" for label, count in sorted(not_finished.items()))
    return line


def describe_configuration(configuration: ConfigurationResult) -> str:
    searched = ", ".join(f"{key}={value}" for key, value in sorted(configuration.searched.items()))
    return f"{configuration.configuration} ({searched})" if searched else configuration.configuration


def _chosen_strategies(
    record: StudyRecord, summary: StudySummary
) -> list[tuple[ConfigurationResult, str, dict[int, str]]]:
    """Each backbone's chosen configuration with its strategy chosen on validation and its finished folds' runs
    (fold -> run id); a configuration without a validation score is left out."""
    metric = record.spec["registry"]["selection_metric"]
    chosen = []
    for row in summary.rows:
        selection = select_best([row], summary.strategies, metric)
        if selection is not None:
            runs = {t.fold: t.run_id for t in record.trials if t.configuration == row.configuration and t.outcome}
            chosen.append((row, selection.strategy, runs))
    return chosen


def compared_rows(client: MlflowClient, record: StudyRecord, summary: StudySummary) -> list[ComparedRow]:
    """Each backbone's chosen configuration with its strategy chosen on validation and its folds' per-scan rows under
    the study's own protocol (a compared protocol's rows are scored on the same scans and would pair twice)."""
    return [
        ComparedRow(
            row.backbone,
            strategy,
            {fold: _scan_rows_or_none(client, run, summary.protocol) for fold, run in runs.items()},
        )
        for row, strategy, runs in _chosen_strategies(record, summary)
    ]


@dataclass(frozen=True)
class RetentionSummary:
    """A backbone's mean nDSC retention curves at its chosen strategy: per measure, the mean over folds of each
    fold's mean over its scans of the split. R-AAC is linear in the curve, so each mean curve's R-AAC is the mean
    R-AAC of the uncertainty table."""

    backbone: str
    strategy: str
    folds: int
    fractions: tuple[float, ...]
    curves: dict[str, tuple[float, ...]]  # measure -> nDSC at each fraction


def retention_summaries(
    client: MlflowClient, record: StudyRecord, summary: StudySummary, split: str = "test"
) -> list[RetentionSummary]:
    """The retention curves of each backbone's chosen configuration and strategy, from its folds that kept any."""
    summaries = []
    for row, strategy, runs in _chosen_strategies(record, summary):
        per_fold: list[dict[str, np.ndarray]] = []
        fractions: tuple[float, ...] = ()
        for run in runs.values():
            recorded = _retention_or_none(client, run)
            if recorded is None:
                continue
            by_measure: dict[str, list[list[float]]] = {}
            for curve in recorded.curves:
                if curve["split"] == split and curve["strategy"] == strategy:
                    by_measure.setdefault(curve["measure"], []).append(curve["ndsc"])
            if by_measure:
                fractions = recorded.fractions
                per_fold.append({measure: np.mean(curves, axis=0) for measure, curves in by_measure.items()})
        measures = [measure for measure in per_fold[0] if all(measure in fold for fold in per_fold)] if per_fold else []
        if measures:
            curves = {m: tuple(float(v) for v in np.mean([fold[m] for fold in per_fold], axis=0)) for m in measures}
            summaries.append(RetentionSummary(row.backbone, strategy, len(per_fold), fractions, curves))
    return summaries


def _retention_or_none(client: MlflowClient, run_id: str) -> RetentionCurves | None:
    # As _scan_rows_or_none: storage only the cluster saw logged nothing.
    try:
        return read_retention_curves(client, run_id)
    except (OSError, MlflowException):
        return None


def _scan_rows_or_none(client: MlflowClient, run_id: str, protocol: str) -> list:
    # A driver that could not read the checkpoint's folder (storage only the cluster sees) logged no table: that
    # fold's patients then pair with nothing, and the comparisons' n says so.
    try:
        rows = read_scan_rows(client, run_id)
    except (OSError, MlflowException):
        return []
    # Launches from before protocols existed logged rows without one, all of the study's protocol.
    return [row for row in rows if row.get("protocol", protocol) == protocol]
