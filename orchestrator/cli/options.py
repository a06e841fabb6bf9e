"""What the commands share: how a bad input becomes one line of error."""

from __future__ import annotations

import click

from msx.models.registry import UnknownNameError

from ..spec import SpecError

# Errors that describe bad input: printed as one line, exit status 1, before anything expensive starts.
INPUT_ERRORS = (SpecError, UnknownNameError, ValueError, FileNotFoundError)


def fail_cleanly(error: Exception) -> click.ClickException:
    return click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__)
