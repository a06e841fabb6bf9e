"""The registered model served by MLflow's own server (`mlflow models serve`, on 127.0.0.1) answers a request
with the mask `msx predict` writes for the same scan."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from msx.orchestrator.cli import main
from msx.orchestrator.results import select_best, summarise_configurations
from msx.orchestrator.tracking.provenance import Provenance
from msx.orchestrator.tracking.registry import register_selection
from msx.orchestrator.tracking.store import ensure_experiment
from tests.helpers import free_port, save_nifti
from tests.orchestrator.servers import wait_until_healthy
from tests.orchestrator.tracking.test_registry import STRATEGIES, fold_checkpoints

pytestmark = pytest.mark.integration

MODALITIES = ("flair", "mprage", "t2")


@pytest.fixture
def served_model(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec, outcomes = fold_checkpoints(tmp_path, folds=(1, 2))
    selection = select_best(summarise_configurations(outcomes, STRATEGIES, fold_count=2), STRATEGIES, "dsc")
    experiment_id = ensure_experiment(tracking_uri, spec.name, tmp_path / "artifacts")
    parent = MlflowClient(tracking_uri).create_run(experiment_id, run_name="study")
    uri = register_selection(
        selection, spec, "msx-serve", parent.info.run_id, tracking_uri, tmp_path / "work",
        Provenance("f" * 64, "msx test")
    ).model_uri
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=output, stderr=subprocess.STDOUT,
            # As in an activated venv (the README's way): MLflow runs the venv's uvicorn by name.
            env={
                **os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
            },
            start_new_session=True,  # its workers in one group, stopped together below
        )
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}", log, timeout_s=300)
        yield uri, tracking_uri, f"http://127.0.0.1:{port}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.mark.timeout(900)
def test_served_mask_is_msx_predicts_mask(served_model, tmp_path):
    uri, tracking_uri, url = served_model
    image = np.zeros((3, 20, 24, 18), dtype=np.float32)
    image[:, 3:17, 4:20, 2:16] = np.random.default_rng(1).normal(1.0, 0.2, size=(3, 14, 16, 14)).astype(np.float32)

    # As the README shows it: the image as "inputs", (channels, X, Y, Z) in the model's modality order.
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps({"inputs": image.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as answer:
        served = np.asarray(json.loads(answer.read())["predictions"])
    assert served.shape == image.shape[1:]
    assert set(np.unique(served)) <= {0, 1}

    files = []
    for channel, name in enumerate(MODALITIES):
        files += [f"--{name}", str(save_nifti(tmp_path / "scan" / f"{name}.nii.gz", image[channel]))]
    out = tmp_path / "predicted_mask.nii.gz"
    result = CliRunner().invoke(
        main, ["predict", "--model", uri, *files, "--out", str(out), "--tracking-uri", tracking_uri],
        env={"MLFLOW_TRACKING_URI": None},
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    np.testing.assert_array_equal(served, np.asarray(nib.load(out).dataobj))

    # A request the signature refuses: two channels for a three-modality model.
    bad = urllib.request.Request(
        f"{url}/invocations", data=json.dumps({"inputs": image[:2].tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=120)
    assert refused.value.code == 400 and "shape" in refused.value.read().decode().lower()
