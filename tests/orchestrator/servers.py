"""Waiting for a server process the tests started (mlflow server, msx ui) to answer its health check."""

import subprocess
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
