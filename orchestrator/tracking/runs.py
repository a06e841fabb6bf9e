"""The launch's run tree in MLflow: a configuration's run and a trial's run, found by their tags or made.

Runs are found by tag before one is made, so a write made twice (its answer was lost, or a resumed driver makes it
again) gives the same run back, never a second one.
"""

from __future__ import annotations

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from ..trial import TrialConfig
from .store import CONFIGURATION_TAG, PARENT_RUN_TAG, TRIAL_ID_TAG


class RunTree:
    """The runs under the launch run `parent_run_id` of experiment `experiment_name`, and what the store has told
    about them: the experiment's id, and run ids by trial id and by configuration."""

    def __init__(self, experiment_name: str, parent_run_id: str) -> None:
        self.experiment_name = experiment_name
        self.parent_run_id = parent_run_id
        self._experiment_id: str | None = None
        self._trial_runs: dict[str, str] = {}
        self._configuration_runs: dict[str, str] = {}

    def experiment(self, client: MlflowClient) -> str:
        if self._experiment_id is None:
            self._experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        return self._experiment_id

    def _find_run(self, client: MlflowClient, filter_string: str) -> str | None:
        runs = client.search_runs([self.experiment(client)], filter_string=filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def configuration_run(self, client: MlflowClient, trial: TrialConfig) -> str:
        """The run of the trial's configuration, under the launch run; made, with its params, when its first fold
        starts."""
        name = trial.configuration
        if name not in self._configuration_runs:
            run_id = self._find_run(
                client, f"tags.`{CONFIGURATION_TAG}` = '{name}' AND tags.`{PARENT_RUN_TAG}` = '{self.parent_run_id}'"
            )
            if run_id is None:
                run_id = client.create_run(
                    self.experiment(client),
                    run_name=name,
                    tags={PARENT_RUN_TAG: self.parent_run_id, CONFIGURATION_TAG: name},
                ).info.run_id
            # Also for a run found: the write that made it may have failed before its params were logged.
            client.log_batch(
                run_id, params=[Param(key, str(value)) for key, value in trial.configuration_params().items()]
            )
            self._configuration_runs[name] = run_id
        return self._configuration_runs[name]

    def trial_run(self, client: MlflowClient, trial_id: str) -> str:
        """The run of a trial that has started."""
        if trial_id not in self._trial_runs:
            run_id = self._find_run(client, f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'")
            if run_id is None:
                raise LookupError(f"trial {trial_id} has no MLflow run in experiment {self.experiment_name!r}")
            self._trial_runs[trial_id] = run_id
        return self._trial_runs[trial_id]

    def open_trial_run(self, client: MlflowClient, trial_id: str, trial: TrialConfig) -> str:
        """The trial's run under its configuration's run, made or (the trial runs again) marked running again."""
        configuration_run = self.configuration_run(client, trial)
        run_id = self._trial_runs.get(trial_id) or self._find_run(client, f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'")
        if run_id is None:
            run_id = client.create_run(
                self.experiment(client),
                run_name=trial.run_name,
                tags={PARENT_RUN_TAG: configuration_run, TRIAL_ID_TAG: trial_id},
            ).info.run_id
        else:
            # The trial runs again (its driver restarted, or Tune retries it): so does its run.
            client.update_run(run_id, status="RUNNING")
        self._trial_runs[trial_id] = run_id
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in trial.to_tune().items()])
        return run_id
