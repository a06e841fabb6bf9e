"""A fold's final checkpoint on its MLflow run: the per-scan metrics as a CSV table, the model folder, the overlays."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from msx.models.fold import MODEL_DIR, OVERLAY_DIR, RETENTION_CURVES_FILE, SCAN_METRICS_FILE

from .store import CHECKPOINT_TAG, SCAN_METRICS_ARTIFACT


def write_scan_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The worker's per-scan rows (split, scan, strategy, then every metric) as one CSV table; a score that a row's
    protocol did not compute (the uncertainty scores of a compared protocol) is an empty cell."""
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["split", "scan", "strategy"]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def log_final_checkpoint(client: MlflowClient, run_id: str, checkpoint_path: str) -> None:
    """The final checkpoint's per-scan metrics (as CSV), retention curves, model folder and example overlays, on the
    fold run.

    Copied only from storage this driver reads as a folder (local, or shared among the nodes); elsewhere
    the tag is the reference.
    """
    client.set_tag(run_id, CHECKPOINT_TAG, checkpoint_path)
    folder = Path(checkpoint_path)
    if not folder.is_dir():
        return
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / SCAN_METRICS_ARTIFACT
        write_scan_metrics_csv(table, json.loads((folder / SCAN_METRICS_FILE).read_text()))
        client.log_artifact(run_id, str(table))
    if (folder / RETENTION_CURVES_FILE).is_file():
        client.log_artifact(run_id, str(folder / RETENTION_CURVES_FILE))
    client.log_artifacts(run_id, str(folder / MODEL_DIR), MODEL_DIR)
    if (folder / OVERLAY_DIR).is_dir():
        client.log_artifacts(run_id, str(folder / OVERLAY_DIR), OVERLAY_DIR)
