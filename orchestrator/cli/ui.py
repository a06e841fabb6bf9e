"""`msx ui`: the MLflow UI over the study store, on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import storage_option, tracking_uri_option


@click.command()
@click.option("--port", type=int, default=5000, show_default=True, help="Port of the UI, on 127.0.0.1 only.")
@tracking_uri_option
@storage_option("Folder of the default MLflow store (env MSX_STORAGE).")
def ui(port: int, tracking_uri: str | None, storage: Path) -> None:
    """Start the MLflow UI on 127.0.0.1 for the study store; Ctrl-C stops it."""
    import os
    import subprocess

    from ..tracking.store import default_tracking_uri

    uri = tracking_uri or default_tracking_uri(storage.resolve())
    if uri.startswith(("http://", "https://")):
        click.echo(f"{uri} is a tracking server, which serves its own UI: open {uri}")
        return
    click.echo(
        f"MLflow UI: http://127.0.0.1:{port} (registered models: http://127.0.0.1:{port}/#/models); Ctrl-C stops it"
    )
    # Bound to 127.0.0.1 whatever MLflow's default: the store holds unpublished patient results.
    # MLflow's job runner only serves GenAI features and would start extra processes.
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        raise SystemExit(subprocess.call(command, env=environment))
    except KeyboardInterrupt:
        raise SystemExit(0) from None
