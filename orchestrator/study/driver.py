"""One study, end to end: data -> Ray Tune (trials on Ray Train) -> MLflow runs -> selection -> registry."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.utils import flatten_dict

from msx.models.data.cohort import Cohort
from msx.models.data.folds import resolve_folds

from ..cluster.jobs import free_local_port
from ..results import Selection, best_per_backbone, outcome_from_result, results_table, select_best, summarise_configurations
from ..spec import ExperimentSpec
from ..tracking.callback import TrialRunsCallback
from ..tracking.provenance import Provenance
from ..tracking.registry import Registration, register_selection
from ..tracking.store import CODE_VERSION_TAG, DATA_FINGERPRINT_TAG, STUDY_TAG, ensure_experiment, log_study_start
from ..trial import TrialConfig
from ..trials.trainable import TRIAL_RESOURCES, run_trial
from .progress import ProgressView, progress_path
from .search import MODE, OPTIMISED_METRIC, LosoGridSearcher, build_scheduler
from .state import FAILED, FINISHED, StudyState, write_state


@dataclass(frozen=True)
class StudyOutcome:
    table: str
    selection: Selection | None
    registration: Registration | None
    parent_run_id: str
    experiment_id: str
    trials_total: int
    trials_finished: int


def start_ray(address: str | None, echo: Callable[[str], None]) -> str | None:
    """Connect to a cluster, or start a local one bound to 127.0.0.1; returns the dashboard URL.

    With no address and a Ray instance already running on this machine, msx joins it: Ray Train's
    placement-group cleaner finds "the" local instance by process scan and fails when there are two.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return None
    if not address:
        # Private, but it is the scan Ray itself uses to find local instances.
        from ray._private.services import find_gcs_addresses

        running = sorted(find_gcs_addresses())
        if len(running) > 1:
            raise RuntimeError(f"several Ray instances run on this machine ({', '.join(running)}); choose one with --address")
        if running:
            address = running[0]
            echo(f"joining the Ray instance already running at {address}")
    if address:
        context = ray.init(address=address, log_to_driver=False)
    else:
        port = free_local_port()
        # Ray Train's placement-group cleaner, in a worker, finds the cluster's state API through this
        # variable, else through /tmp/ray/ray_current_cluster, which a `ray start --head` that was not
        # stopped cleanly leaves pointing at a dead cluster: the cleaner then fails, and every trial that
        # Tune stops (ASHA, or its last report) leaks its workers' CPUs until the study deadlocks. Workers
        # inherit the environment of the node processes ray.init starts, so the variable is set for that call
        # only: left in this process, it would point a later Ray of the same process at this one's address.
        previous = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            context = ray.init(
                address="local",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                log_to_driver=False,
            )
        finally:
            if previous is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS")
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = previous
    url = context.dashboard_url
    if url:
        url = url if url.startswith("http") else f"http://{url}"
        echo(f"Ray dashboard: {url}")
    return url


def concurrent_trials(spec: ExperimentSpec) -> int:
    """As many trials at once as the cluster has workers' resources for (at least one)."""
    if spec.resources.max_concurrent_trials:
        return spec.resources.max_concurrent_trials
    available = ray.cluster_resources()
    resources = spec.resources
    by_cpu = available.get("CPU", 0) // (resources.cpus_per_worker * resources.workers_per_trial)
    if resources.use_gpu:
        by_gpu = available.get("GPU", 0) // (resources.gpus_per_worker * resources.workers_per_trial)
        return max(1, int(min(by_cpu, by_gpu)))
    return max(1, int(by_cpu))


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
    MLflow's runs are reused rather than made again."""
    storage = storage.resolve()
    experiment_folder = storage / spec.name
    spec_dict = spec.to_dict()
    folds = resolve_folds(spec.data.folds, cohort.patients)
    total = len(spec.model.backbones) * spec.search.configurations_per_backbone * len(folds)
    client = MlflowClient(tracking_uri)

    if resume is None:
        state = _start_study(spec, spec_dict, cohort, storage, tracking_uri, provenance, client).held_by_this_process()
    else:
        state = resume.held_by_this_process()
        client.update_run(state.parent_run_id, status="RUNNING")
    write_state(storage, state)
    echo(f"MLflow: experiment {spec.name!r}, study run {state.study} ({tracking_uri})")

    # Validation Dice arrives every `validate_every` epochs, not with every report; ASHA and the searcher
    # read the results that carry it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            spec=spec_dict,
            data_root=str(cohort.root),
            storage_path=str(experiment_folder / "train"),
            # Under the experiment's storage, never in the user's data folder.
            scan_cache=str(experiment_folder / "scan_cache"),
        ),
        TRIAL_RESOURCES,
    )
    tune_path = state.tune_path(storage)
    if resume is not None and tune.Tuner.can_restore(str(tune_path)):
        echo(f"resuming {state.study} from {tune_path}")
        # Callbacks, searcher and scheduler come back with Tune's own saved state.
        tuner = tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        max_concurrent = concurrent_trials(spec)
        echo(f"{total} trials ({len(spec.model.backbones)} backbones x {spec.search.configurations_per_backbone} "
             f"configurations x {len(folds)} folds), up to {max_concurrent} at a time")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=OPTIMISED_METRIC,
                mode=MODE,
                search_alg=LosoGridSearcher(spec, folds),
                scheduler=build_scheduler(spec),
                num_samples=total,
                max_concurrent_trials=max_concurrent,
                time_budget_s=spec.search.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=state.study,
                storage_path=str(tune_path.parent),
                # A trial whose own process died with its node is started again; its TorchTrainer then
                # continues from the last checkpoint (Train retries worker failures itself, see trials/trainable.py).
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                callbacks=[
                    TrialRunsCallback(tracking_uri, spec.name, state.parent_run_id, spec.inference.strategies, len(folds)),
                    ProgressView(total, echo, progress_path(storage, spec.name, state.study)),
                ],
                verbose=0,
            ),
        )
    grid = tuner.fit()

    outcomes = [o for o in (outcome_from_result(TrialConfig.from_tune(r.config), flatten_dict(r.metrics or {})) for r in grid) if o]
    configurations = summarise_configurations(outcomes, spec.inference.strategies, len(folds))
    metric = spec.registry.selection_metric
    selection = select_best(configurations, spec.inference.strategies, metric)
    table = results_table(best_per_backbone(configurations, spec.inference.strategies, metric), spec.inference.strategies)
    parent_run_id = state.parent_run_id
    client.log_text(parent_run_id, table, "results_table.txt")
    client.log_metric(parent_run_id, "trials_finished", len(outcomes))

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
    return StudyOutcome(table, selection, registration, parent_run_id, state.experiment_id, total, len(outcomes))


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
        tags={STUDY_TAG: study_name, DATA_FINGERPRINT_TAG: provenance.data_fingerprint, CODE_VERSION_TAG: provenance.code_version},
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
