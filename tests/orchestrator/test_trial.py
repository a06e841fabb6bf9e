"""The typed trial and the dict Tune (and MLflow's params) carry it as."""

import pytest

from msx.orchestrator.spec import load_spec
from msx.orchestrator.trial import TrialConfig

TRIAL = TrialConfig("segresnet", 3, "segresnet-c2", {"training.lr": 2e-3, "inference.ddim_steps": 5})


def test_tune_dict_round_trip():
    config = TRIAL.to_tune()
    assert config == {
        "backbone": "segresnet", "fold": 3, "configuration": "segresnet-c2", "training.lr": 2e-3,
        "inference.ddim_steps": 5
    }
    assert TrialConfig.from_tune(config) == TRIAL


def test_from_mlflow_params_where_every_value_is_a_string():
    params = {key: str(value) for key, value in TRIAL.to_tune().items()}
    trial = TrialConfig.from_tune(params)
    assert (trial.backbone, trial.fold, trial.configuration) == ("segresnet", 3, "segresnet-c2")
    assert trial.searched == {"training.lr": "0.002", "inference.ddim_steps": "5"}


def test_names_and_the_configurations_shared_params():
    assert (TRIAL.run_name, TRIAL.label) == ("segresnet-c2-fold3", "segresnet-c2 fold 3")
    assert TRIAL.configuration_params() == {
        "backbone": "segresnet", "configuration": "segresnet-c2", "training.lr": 2e-3, "inference.ddim_steps": 5
    }


def test_the_trials_spec_has_its_one_backbone_and_its_searched_values():
    experiment = load_spec("smoke")
    spec = TRIAL.spec_of(experiment)
    assert spec.model.backbones == ("segresnet",)
    assert spec.training.lr == pytest.approx(2e-3) and spec.inference.ddim_steps == 5
    assert spec.data == experiment.data and spec.search == experiment.search
    assert spec.fold_config(TRIAL.backbone).network.backbone == "segresnet"
