"""A study's results as the report shows them, recomputed from its record with the functions the launch itself used
(results.py), so the report agrees with what the launch printed and registered."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from msx.models.engine import InferenceConfig

from ..results import ConfigurationResult, Selection, best_per_backbone, select_best, summarise_configurations
from .comparisons import ComparedRow
from .record import ReportError, StudyRecord, TrialRun, read_scan_rows


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
        raise ReportError(f"study {record.study!r}, launch {record.launch}: {trials_line(record.trials)}; nothing to report")
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
        compared.append(ProtocolScores(protocol, tuple(scored[r.configuration] for r in rows if r.configuration in scored)))
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


def compared_rows(client: MlflowClient, record: StudyRecord, summary: StudySummary) -> list[ComparedRow]:
    """Each backbone's chosen configuration with its strategy chosen on validation and its folds' per-scan rows under
    the study's own protocol (a compared protocol's rows are scored on the same scans and would pair twice)."""
    metric = record.spec["registry"]["selection_metric"]
    compared = []
    for row in summary.rows:
        selection = select_best([row], summary.strategies, metric)
        if selection is None:
            continue
        runs = {trial.fold: trial.run_id for trial in record.trials if trial.configuration == row.configuration and trial.outcome}
        scan_rows = {fold: _scan_rows_or_none(client, run, summary.protocol) for fold, run in runs.items()}
        compared.append(ComparedRow(row.backbone, selection.strategy, scan_rows))
    return compared


def _scan_rows_or_none(client: MlflowClient, run_id: str, protocol: str) -> list:
    # A driver that could not read the checkpoint's folder (storage only the cluster sees) logged no table: that
    # fold's patients then pair with nothing, and the comparisons' n says so.
    try:
        rows = read_scan_rows(client, run_id)
    except (OSError, MlflowException):
        return []
    # Launches from before protocols existed logged rows without one, all of the study's protocol.
    return [row for row in rows if row.get("protocol", protocol) == protocol]
