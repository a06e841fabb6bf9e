"""`msx ui` serves the study store on 127.0.0.1, and a browser shows the registered model with its alias.

The page is rendered by headless Chromium (installed by `make test`, see the Makefile); its screenshot is
kept under test-artifacts/ for a person to look at.
"""

import os
import shutil
import subprocess
import sys

import pytest

from msx.models.fold import MODEL_DIR
from tests.helpers import REPOSITORY, free_port, run_msx, save_tiny_checkpoint

from ..servers import wait_until_healthy
from .test_registry import MODEL, register

ARTIFACTS = REPOSITORY / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def ui_with_a_champion(tmp_path):
    """`msx ui` on a free port over a SQLite store holding MODEL version 1 with alias champion."""
    storage = tmp_path / "runs"
    storage.mkdir()
    store = (f"sqlite:///{storage / 'mlflow.db'}", storage)
    trial = tmp_path / "trial"
    save_tiny_checkpoint(trial / MODEL_DIR, {"fold": 1})
    assert register(store, trial, 0.5, "a" * 64).decision.promoted

    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen(
        [sys.executable, "-m", "msx.orchestrator.cli", "ui", "--storage", str(storage), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(ui, url, tmp_path / "ui.log")
        yield url, tmp_path / "ui.log"
    finally:
        os.killpg(ui.pid, 15)  # msx and the MLflow server it started
        try:
            ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, 9)
            ui.wait()
        log.close()


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs it with apt-get)")
@pytest.mark.timeout(300)
def test_the_model_page_shows_the_model_and_its_champion_alias(ui_with_a_champion):
    url, log = ui_with_a_champion
    assert f"Uvicorn running on {url} " in log.read_text()  # bound to the loopback address only
    page = f"{url}/#/models/{MODEL}"
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--window-size=1400,900", "--virtual-time-budget=20000"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert MODEL in dom
    assert "champion" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow-model-page.png"
    subprocess.run([*browser, f"--screenshot={screenshot}", page], capture_output=True, timeout=120, check=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ui_points_at_a_tracking_server_instead_of_serving_one():
    result = run_msx("ui", "--tracking-uri", "http://127.0.0.1:5999", cwd=REPOSITORY)
    assert result.returncode == 0
    assert "http://127.0.0.1:5999 is a tracking server, which serves its own UI" in result.stdout
