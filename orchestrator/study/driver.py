"""One study, end to end: data -> Ray Tune (trials on Ray Train) -> MLflow runs -> selection -> registry."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.utils import flatten_dict

from msx.models.data.cohort import Cohort
from msx.models.data.folds import resolve_folds

from ..cluster import local_ray
from ..cluster.capacity import check_cluster_hosts_a_trial, concurrent_trials
from ..results import (
    Selection,
    best_per_backbone,
    outcome_from_result,
    results_table,
    select_best,
    summarise_configurations,
)
from ..spec import ExperimentSpec
from ..tracking.callback import TrialRunsCallback
from ..tracking.provenance import Provenance
from ..tracking.registry import Registration, register_selection
from ..tracking.store import (
    CODE_VERSION_TAG,
    CONFIGURATION_TAG,
    DATA_FINGERPRINT_TAG,
    STUDY_TAG,
    child_runs,
    ensure_experiment,
    log_study_start,
)
from ..tracking.summaries import log_search_record
from ..trial import TrialConfig
from ..trials.live_epochs import actor_name, start_live_epochs
from ..trials.rung_gate import gate_name, start_rung_gate
from ..trials.trainable import TRIAL_RESOURCES, run_trial, start_ray_train_services
from . import interruption
from .configuration_search import ConfigurationScheduler, ConfigurationSearch
from .progress import ProgressView, progress_path
from .search import MODE, OPTIMISED_METRIC, rung_epochs
from .search_record import SearchSummary, read_summary, search_path
from .state import FAILED, FINISHED, INTERRUPTED, StudyState, write_state


@dataclass(frozen=True)
class StudyOutcome:
    table: str
    selection: Selection | None
    registration: Registration | None
    parent_run_id: str
    experiment_id: str
    trials_total: int
    trials_finished: int
    study: str = ""
    search: SearchSummary | None = None
    # Stopped by a signal (its number) or otherwise before the search finished: nothing was selected.
    interrupted: bool = False
    signal: int | None = None
    # Why the search itself stopped the study (interruption.stop_run), if it did.
    stop_reason: str | None = None


def start_ray(address: str | None, echo: Callable[[str], None]) -> str | None:
    """Connect to a cluster, or to this machine's local Ray (started if none runs); returns the dashboard URL.

    Without an address, the study takes a lease on the local Ray that every study on this machine shares
    (`local_ray`); `stop_ray` gives it back, and the last study to end stops that Ray.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return None
    if address:
        context = ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        url = context.dashboard_url
        if url:
            url = url if url.startswith("http") else f"http://{url}"
            echo(f"Ray dashboard: {url}")
        return url
    local = local_ray.acquire(echo)
    local_ray.use_token_authentication()
    try:
        # Its "connecting" lines would only repeat what msx says.
        ray.init(address=local.gcs_address, log_to_driver=False, logging_level=logging.WARNING)
    except BaseException:
        local_ray.release()
        raise
    return local.dashboard_url


def stop_ray() -> None:
    """Disconnect, and give back this driver's lease on the local Ray (the last one stops it)."""
    ray.shutdown()
    local_ray.release()


def run_study(
    spec: ExperimentSpec,
    cohort: Cohort,
    storage: Path,
    tracking_uri: str,
    provenance: Provenance,
    echo: Callable[[str], None] = print,
    resume: StudyState | None = None,
) -> StudyOutcome:
    """Run a new study, or with ``resume`` take over an unfinished one: trials that finished are kept,
    interrupted ones continue from their last checkpoint, the search continues from its saved state, and
    MLflow's runs are reused rather than made again.

    Refuses (ClusterTooSmallError) before recording anything when the cluster cannot host a trial's workers.
    A stop signal (Ctrl-C, SIGTERM) ends it as interrupted: nothing is selected or registered, and
    `msx launch --resume` continues it.
    """
    storage = storage.resolve()
    experiment_folder = storage / spec.name
    spec_dict = spec.to_dict()
    folds = resolve_folds(spec.data.folds, cohort.patients)
    total = len(spec.model.backbones) * spec.search.configurations_per_backbone * len(folds)
    check_cluster_hosts_a_trial(spec.resources, echo)
    client = MlflowClient(tracking_uri)

    if resume is None:
        state = _start_study(spec, spec_dict, cohort, storage, tracking_uri, provenance, client).held_by_this_process()
    else:
        state = resume.held_by_this_process()
        client.update_run(state.parent_run_id, status="RUNNING")
    write_state(storage, state)
    echo(f"MLflow: experiment {spec.name!r}, study run {state.study} ({tracking_uri})")
    start_ray_train_services()  # alongside the first trial's process rather than one by one in its controller

    # Trials report at their validations, with validation Dice; Tune's strict check would fail the whole study on a
    # result without it, which the search (reading the results that carry it) does not need.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Held while the study runs (it ends with this driver): each running trial's epoch for the progress lines.
    live_epochs = actor_name(state.study)
    live_epochs_actor = start_live_epochs(live_epochs)  # noqa: F841
    # Likewise: the folds' go-ahead at the search's rungs, where they wait for the search's decision.
    rungs = {backbone: rung_epochs(spec.for_backbone(backbone)) for backbone in spec.model.backbones}
    rung_gate = gate_name(state.study) if any(rungs.values()) else None
    rung_gate_actor = start_rung_gate(rung_gate)  # noqa: F841
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            spec=spec_dict,
            data_root=str(cohort.root),
            storage_path=str(experiment_folder / "train"),
            # Under the experiment's storage, never in the user's data folder.
            scan_cache=str(experiment_folder / "scan_cache"),
            live_epochs=live_epochs,
            rung_gate=rung_gate,
            rung_epochs=rungs,
        ),
        TRIAL_RESOURCES,
    )
    tune_path = state.tune_path(storage)
    search_file = search_path(storage, spec.name, state.study)
    if resume is not None and tune.Tuner.can_restore(str(tune_path)):
        echo(f"resuming {state.study} from {tune_path}")
        # Callbacks, searcher and scheduler come back with Tune's own saved state: the search's decisions too.
        tuner = tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        max_concurrent = concurrent_trials(spec.resources)
        echo(f"{total} trials at most ({len(spec.model.backbones)} backbones x "
             f"{spec.search.configurations_per_backbone} "
             f"configurations x {len(folds)} folds), up to {max_concurrent} at a time")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=OPTIMISED_METRIC,
                mode=MODE,
                # The searcher bounds the trials that hold workers; Tune's own bound would count paused ones.
                search_alg=ConfigurationSearch(spec, folds, max_concurrent, search_file, echo),
                scheduler=ConfigurationScheduler(),
                num_samples=total,
            ),
            run_config=tune.RunConfig(
                name=state.study,
                storage_path=str(tune_path.parent),
                # A trial whose own process died with its node is started again; its TorchTrainer then
                # continues from the last checkpoint (Train retries worker failures itself, see trials/trainable.py).
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                callbacks=[
                    TrialRunsCallback(
                        tracking_uri, spec.name, state.parent_run_id, spec.inference.strategies, len(folds)
                    ),
                    ProgressView(total, echo, progress_path(storage, spec.name, state.study), live_epochs=live_epochs),
                    interruption.StopSignals(),
                ],
                verbose=0,
            ),
        )
    interruption.reset()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        grid = tuner.fit()
    except (KeyboardInterrupt, SystemExit) as stop:  # a second Ctrl-C or SIGTERM: Tune's last saved state stands
        grid = None
        interruption.note(signal.SIGTERM if isinstance(stop, SystemExit) else signal.SIGINT)
    finally:
        if threading.current_thread() is threading.main_thread():
            for number, handler in handlers.items():
                signal.signal(number, handler)
    search = read_summary(search_file)
    if grid is None or interruption.INTERRUPTED.is_set() or search is None or not search.finished:
        client.set_terminated(state.parent_run_id, "KILLED")
        write_state(storage, state.ended_as(INTERRUPTED))
        return StudyOutcome(
            "", None, None, state.parent_run_id, state.experiment_id, total, 0,
            study=state.study, search=search, interrupted=True, signal=interruption.received_signal(),
            stop_reason=interruption.stop_reason(),
        )

    outcomes = [
        o for o in (outcome_from_result(TrialConfig.from_tune(r.config), flatten_dict(r.metrics or {})) for r in grid)
        if o
    ]
    configurations = summarise_configurations(outcomes, spec.inference.strategies, len(folds))
    metric = spec.registry.selection_metric
    selection = select_best(configurations, spec.inference.strategies, metric)
    table = results_table(
        best_per_backbone(configurations, spec.inference.strategies, metric), spec.inference.strategies
    )
    parent_run_id = state.parent_run_id
    client.log_text(parent_run_id, table, "results_table.txt")
    client.log_metric(parent_run_id, "trials_finished", len(outcomes))
    configuration_runs = {
        run.data.tags[CONFIGURATION_TAG]: run.info.run_id
        for run in child_runs(client, state.experiment_id, parent_run_id)
        if CONFIGURATION_TAG in run.data.tags
    }
    log_search_record(client, parent_run_id, configuration_runs, search)

    registration = None
    if selection is not None:
        client.log_metric(parent_run_id, f"selected_val_{metric}", selection.validation_score)
        client.set_tag(parent_run_id, "msx.selected_configuration", selection.configuration.configuration)
        client.set_tag(parent_run_id, "msx.selected_strategy", selection.strategy)
        registration = register_selection(
            selection, spec, spec.registry.model_name, parent_run_id, tracking_uri,
            experiment_folder / "registered" / state.study, provenance,
        )
    status = FINISHED if selection is not None else FAILED
    client.set_terminated(parent_run_id, status.upper())
    write_state(storage, state.ended_as(status))
    return StudyOutcome(
        table,
        selection,
        registration,
        parent_run_id,
        state.experiment_id,
        total,
        len(outcomes),
        study=state.study,
        search=search,
    )


def _start_study(
    spec: ExperimentSpec,
    spec_dict: dict,
    cohort: Cohort,
    storage: Path,
    tracking_uri: str,
    provenance: Provenance,
    client: MlflowClient,
) -> StudyState:
    experiment_id = ensure_experiment(tracking_uri, spec.name, storage / "mlartifacts")
    study_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = client.create_run(
        experiment_id,
        run_name=study_name,
        tags={
            STUDY_TAG: study_name,
            DATA_FINGERPRINT_TAG: provenance.data_fingerprint,
            CODE_VERSION_TAG: provenance.code_version,
        },
    )
    log_study_start(parent.info.run_id, tracking_uri, spec_dict, str(cohort.root))
    return StudyState(
        experiment=spec.name,
        study=study_name,
        spec=spec_dict,
        data_root=str(cohort.root),
        data_fingerprint=provenance.data_fingerprint,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent.info.run_id,
        started=time.time(),
    )
