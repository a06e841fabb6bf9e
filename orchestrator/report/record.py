"""A study's latest launch read back from MLflow: its launch run, resolved spec, trial (fold) runs with their curves
and final outcomes, and the model versions registered from it.

A study is an MLflow experiment; its latest launch is the newest launch run, and the launch's trials are the fold
runs under its configuration runs (tracking/store.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient

from msx.models.fold import RETENTION_CURVES_FILE

from ..results import TrialOutcome
from ..study.search_record import SearchSummary, read_summary
from ..tracking.store import (
    SCAN_METRICS_ARTIFACT,
    SEARCH_ARTIFACT,
    SPEC_ARTIFACT,
    STUDY_TAG,
    child_runs,
    fold_run_outcome,
)
from ..trial import PHASE_SECONDS_PREFIX, STARTUP_PREFIX, TRAIN_LOSS, VALIDATION_DICE, TrialConfig

LOSS_CURVE = TRAIN_LOSS
# The Dice of that epoch's weights; the running best is a staircase that hides the training.
VALIDATION_CURVE = VALIDATION_DICE
# A trial's start-up, as its time breakdown counts it: from its process's start to its first training step.
STARTUP_SECONDS = f"{STARTUP_PREFIX}first_step_s"


STARTUP_PHASE = "start-up"


class ReportError(Exception):
    """A report that cannot be made: no such study, or nothing in it finished."""


@dataclass(frozen=True)
class TrialRun:
    """A trial's fold run, as the report reads it."""

    run_id: str
    name: str
    configuration: str
    backbone: str
    fold: int
    status: str
    # None unless the trial reached its final evaluation.
    outcome: TrialOutcome | None
    # metric -> ((epoch, value), ...)
    curves: dict[str, tuple[tuple[int, float], ...]]
    # Where its time went: "start-up" and the phases of its last run of workers (msx.models.fold.EpochReport
    # .phase_seconds), in seconds.
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class StudyRecord:
    """The latest launch of a study: its parent run, resolved spec, trials and registered versions."""

    study: str
    launch: str
    run_id: str
    status: str
    started: datetime
    ended: datetime | None
    params: dict[str, str]
    tags: dict[str, str]
    spec: dict[str, Any]
    trials: tuple[TrialRun, ...]
    registered: tuple[RegisteredVersion, ...]
    # The search's summary the launch logged (configurations pruned or complete, epochs saved); None before.
    search: SearchSummary | None = None


def study_names(client: MlflowClient) -> list[str]:
    """Experiments that hold at least one msx launch, the most recently launched first."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    launches = client.search_runs(
        list(experiments),
        filter_string=f"tags.`{STUDY_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=SEARCH_MAX_RESULTS_THRESHOLD,
    )
    return list(dict.fromkeys(experiments[run.info.experiment_id] for run in launches))


def resolve_study(tracking_uri: str, name: str | None) -> str:
    """`name` checked against the store's studies; with no name, the most recently launched study."""
    names = study_names(MlflowClient(tracking_uri))
    if not names:
        raise ReportError(f"no msx study in {tracking_uri}; `msx launch` makes one")
    if name is None:
        return names[0]
    if name not in names:
        raise ReportError(f"no study named {name!r} in {tracking_uri}; studies: {', '.join(sorted(names))}")
    return name


def read_study(client: MlflowClient, study: str) -> StudyRecord:
    experiment = client.get_experiment_by_name(study)
    parent = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    run_id = parent.info.run_id
    folds = [
        fold
        for configuration in child_runs(client, experiment.experiment_id, run_id)
        for fold in child_runs(client, experiment.experiment_id, configuration.info.run_id)
    ]
    with tempfile.TemporaryDirectory() as folder:
        spec = json.loads(Path(client.download_artifacts(run_id, SPEC_ARTIFACT, folder)).read_text())
        logged = {artifact.path for artifact in client.list_artifacts(run_id)}
        search = (
            read_summary(Path(client.download_artifacts(run_id, SEARCH_ARTIFACT, folder))) if SEARCH_ARTIFACT in logged
            else None
        )
    # search_model_versions leaves the aliases out; get_model_version has them.
    registered = tuple(
        RegisteredVersion(v.name, int(v.version), tuple(client.get_model_version(v.name, v.version).aliases))
        for v in client.search_model_versions(f"run_id = '{run_id}'")
    )
    return StudyRecord(
        study=study,
        launch=parent.info.run_name,
        run_id=run_id,
        status=parent.info.status,
        started=_utc(parent.info.start_time),
        ended=_utc(parent.info.end_time) if parent.info.end_time else None,
        params=dict(parent.data.params),
        tags=dict(parent.data.tags),
        spec=spec,
        trials=tuple(sorted((_trial_run(client, fold) for fold in folds), key=lambda t: (t.configuration, t.fold))),
        registered=tuple(sorted(registered, key=lambda v: (v.name, v.version))),
        search=search,
    )


def read_scan_rows(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    """A fold run's per-scan table (tracking/artifacts.py): protocol, split, scan and strategy as text, the rest as
    numbers; a row's empty cells (scores its protocol did not compute) are left out of it."""
    with (
        tempfile.TemporaryDirectory() as folder,
        open(client.download_artifacts(run_id, SCAN_METRICS_ARTIFACT, folder), newline="") as file,
    ):
        rows = list(csv.DictReader(file))
    text = ("protocol", "split", "scan", "strategy")
    return [{key: value if key in text else float(value) for key, value in row.items() if value != ""} for row in rows]


@dataclass(frozen=True)
class RetentionCurves:
    """A fold run's nDSC retention curves (models/fold.py's RETENTION_CURVES_FILE): per scan, strategy and
    uncertainty measure, nDSC at each retention fraction."""

    fractions: tuple[float, ...]
    curves: tuple[dict[str, Any], ...]  # split, scan, strategy, measure, ndsc (a list, one value per fraction)


def read_retention_curves(client: MlflowClient, run_id: str) -> RetentionCurves | None:
    """None for a fold run without curves (no uncertainty measures, or a launch from before they were kept)."""
    if not any(artifact.path == RETENTION_CURVES_FILE for artifact in client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as folder:
        recorded = json.loads(Path(client.download_artifacts(run_id, RETENTION_CURVES_FILE, folder)).read_text())
    return RetentionCurves(tuple(recorded["fractions"]), tuple(recorded["curves"]))


def _trial_run(client: MlflowClient, run: Run) -> TrialRun:
    trial = TrialConfig.from_tune(run.data.params)
    return TrialRun(
        run_id=run.info.run_id,
        name=run.info.run_name,
        configuration=trial.configuration,
        backbone=trial.backbone,
        fold=trial.fold,
        status=run.info.status,
        outcome=fold_run_outcome(run),
        curves={
            key: tuple(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)))
            for key in (LOSS_CURVE, VALIDATION_CURVE)
        },
        phase_seconds={
            **({STARTUP_PHASE: run.data.metrics[STARTUP_SECONDS]} if STARTUP_SECONDS in run.data.metrics else {}),
            **{
                key.removeprefix(PHASE_SECONDS_PREFIX): value
                for key, value in run.data.metrics.items() if key.startswith(PHASE_SECONDS_PREFIX)
            },
        },
    )


def _utc(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc)
