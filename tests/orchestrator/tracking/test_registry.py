"""MLflow registry round trip on a real SQLite store: register, look up by alias, load, predict a mask."""

import json
import os
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from msx.models.fold import MODEL_DIR
from msx.models.lesion_maps import binary_entropy_bits
from msx.orchestrator.results import TrialOutcome, select_best, summarise_configurations
from msx.orchestrator.spec import spec_from_dict
from msx.orchestrator.tracking.provenance import Provenance
from msx.orchestrator.tracking.registry import describe_model, msx_requirement, register_selection
from msx.orchestrator.tracking.store import ensure_experiment, tracking_uri_scope
from msx.orchestrator.trial import TrialConfig
from tests.helpers import save_tiny_checkpoint, tiny_spec

STRATEGIES = ("mean", "last")


def fold_checkpoints(tmp_path, folds, backbone="unet"):
    spec = spec_from_dict(
        tiny_spec(
            "registry-test",
            model={"backbones": [backbone]},
            inference={"strategies": list(STRATEGIES), "ddim_steps": 2},
        )
    )
    outcomes = []
    for fold in folds:
        folder = tmp_path / "trials" / f"fold{fold}"
        save_tiny_checkpoint(folder / MODEL_DIR, {"fold": fold}, backbone)
        metrics = {f"{split}/{s}/dsc": 0.5 + 0.01 * fold for split in ("val", "test") for s in STRATEGIES}
        trial = TrialConfig(backbone, fold, f"{backbone}-c1", {"training.lr": 1e-3})
        outcomes.append(TrialOutcome(trial, metrics, str(folder)))
    return spec, outcomes


@pytest.mark.timeout(240)
def test_register_lookup_by_alias_load_and_predict(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MONAI's basic U-Net: the registry round trip is the same for every backbone, and its predictions here (two
    # folds, two ways) cost a third of the paper U-Net's.
    spec, outcomes = fold_checkpoints(tmp_path, folds=(1, 2), backbone="basic-unet")
    configurations = summarise_configurations(outcomes, STRATEGIES, fold_count=2)
    selection = select_best(configurations, STRATEGIES, "dsc")
    experiment_id = ensure_experiment(tracking_uri, spec.name, tmp_path / "artifacts")
    parent = MlflowClient(tracking_uri).create_run(experiment_id, run_name="study")

    provenance = Provenance(data_fingerprint="f" * 64, code_version="msx test")
    registration = register_selection(
        selection, spec, "msx-test", parent.info.run_id, tracking_uri, tmp_path / "work", provenance
    )
    uri = registration.model_uri
    assert (registration.version, uri) == (1, "models:/msx-test@champion")
    assert registration.summary == "models:/msx-test@champion (version 1)"

    info = describe_model("msx-test@champion", tracking_uri)
    assert info["version"] == 1 and "champion" in info["aliases"]
    assert info["run_id"] == parent.info.run_id
    assert info["tags"]["strategy"] == selection.strategy
    assert info["tags"]["data_fingerprint"] == "f" * 64 and info["tags"]["code_version"] == "msx test"
    assert info["tags"]["champion_decision"] == "became champion: there was no champion"
    assert info["tags"]["test_dsc"].startswith(f"{configurations[0].score(selection.strategy, 'dsc', 'test'):.4f}")
    assert describe_model("msx-test/1", tracking_uri)["version"] == 1
    assert describe_model("msx-test", tracking_uri)["version"] == 1

    with tracking_uri_scope(tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(uri))
        model = mlflow.pyfunc.load_model(uri)
        bundled = json.loads(Path(mlflow.artifacts.download_artifacts(f"{uri}/artifacts/selection.json")).read_text())
    # Models from code: MLflow runs msx's file to build the model; nothing in the model is a pickle.
    logged = Model.load(str(local))
    flavor = logged.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and (local / "segmenter_code.py").is_file()
    assert not [path for path in local.rglob("*") if path.suffix in (".pkl", ".pickle")]
    assert logged.signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (3, -1, -1, -1)}}
    ]
    assert logged.signature.outputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, -1, -1)}}
    ]
    example = np.asarray(json.loads((local / "input_example.json").read_text()), dtype=np.float32)
    assert example.shape == (3, 8, 8, 8) and example.max() > 0
    requirements = (local / "requirements.txt").read_text().splitlines()
    # How msx itself is installed here (this checkout, editable), then the pinned libraries it runs with.
    assert requirements[0] == msx_requirement() and requirements[0].startswith("msx @ file://")
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert (bundled["data_fingerprint"], bundled["code_version"]) == ("f" * 64, "msx test")
    assert os.environ.get("MLFLOW_TRACKING_URI") != tracking_uri  # nothing leaks to later commands
    image = np.zeros((3, 20, 24, 18), dtype=np.float32)
    image[:, 3:17, 4:20, 2:16] = np.random.default_rng(0).normal(1.0, 0.2, size=(3, 14, 16, 14))
    mask = model.predict(image)
    assert mask.shape == image.shape[1:] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert not mask[image[0] == 0].any()  # nothing predicted outside the (non-zero) brain

    # The maps' method of the unwrapped model: the same mask, the folds' mean probability and every measure over
    # the folds' chains pooled.
    mask_again, maps = model.unwrap_python_model().predict_with_maps(image)
    np.testing.assert_array_equal(mask_again, mask)
    assert sorted(maps.uncertainty) == ["data", "knowledge", "steps", "total"]
    for volume in (maps.probability, *maps.uncertainty.values()):
        assert volume.shape == image.shape[1:] and volume.dtype == np.float32
        assert (volume[image[0] == 0] == 0).all() and (volume >= 0).all() and (volume <= 1).all()
    steps = binary_entropy_bits(torch.from_numpy(maps.probability)).numpy()
    np.testing.assert_allclose(maps.uncertainty["steps"], steps, atol=1e-6)
    np.testing.assert_allclose(
        maps.uncertainty["knowledge"], np.clip(maps.uncertainty["total"] - maps.uncertainty["data"], 0, None), atol=1e-6
    )


def test_unknown_model_lookup_raises(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(LookupError, match="no registered model named 'nope'"):
        describe_model("nope", tracking_uri)
