"""What the commands share: how a bad input becomes one line of error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from msx.models.registry import UnknownNameError

from ..spec import SpecError

# Errors that describe bad input: printed as one line, exit status 1, before anything expensive starts.
INPUT_ERRORS = (SpecError, UnknownNameError, ValueError, FileNotFoundError)


def fail_cleanly(error: Exception) -> click.ClickException:
    return click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__)


def storage_option(help_text: str = "Folder of the default MLflow store (env MSX_STORAGE).") -> Callable:
    """--storage (env MSX_STORAGE, default msx_runs): where studies, checkpoints and the default store live."""
    return click.option(
        "--storage", envvar="MSX_STORAGE", type=click.Path(path_type=Path), default=Path("msx_runs"),
        show_default=True, help=help_text,
    )


def tracking_uri_option(command: Callable) -> Callable:
    """--tracking-uri (env MLFLOW_TRACKING_URI; default: the SQLite file in --storage)."""
    return click.option(
        "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
        help="MLflow tracking URI (default: SQLite file in --storage).",
    )(command)
