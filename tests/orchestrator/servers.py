"""Servers the tests start (mlflow server, msx ui): starting and stopping an MLflow server, waiting for a health
check."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def wait_until_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 120) -> None:
    """Return once ``url``/health answers 200; fail with the server's log if it exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server did not answer in {timeout_s:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port` over the SQLite store and artifact folder in `folder`
    (kept across restarts), once it answers; its log is appended to `folder`/server.log."""
    log = folder / "server.log"
    with log.open("a") as output:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"), "server",
                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination", str(folder / "artifacts"),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            # The job runner's extra processes only cost memory here.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}", log)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: subprocess.Popen) -> None:
    """Terminate a server the tests started (mlflow server takes its uvicorn worker with it)."""
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
