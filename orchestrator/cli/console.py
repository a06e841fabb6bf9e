"""The console of `msx launch`: msx's own lines there, Ray's, Tune's and MLflow's in a log file.

Ray, Tune and MLflow write through Python logging handlers that hold the stream they were made with, through
print(), and (Ray's core, in C++) straight to file descriptors 1 and 2. So the quiet console moves all three:
the handlers' streams, sys.stdout/sys.stderr, and, when this process writes to a real terminal or file, the
descriptors themselves (child processes started meanwhile inherit the log file). msx's lines go to the console
kept aside, and into the log too, so the log reads as one story. An error that escapes is written to the log
with its traceback and reaches the console as one line naming the log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import click

LOGS_FOLDER = "logs"


def launch_log_path(storage: Path) -> Path:
    return storage / LOGS_FOLDER / f"launch-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


# (console, log) while a QuietConsole is open. Module state rather than a closure: Tune pickles the callbacks that
# hold `echo` with its experiment state, and open files do not pickle.
_active: tuple[TextIO, TextIO] | None = None


def echo(line: str) -> None:
    """msx's own line: to the console and into the log while a QuietConsole is open, else as click.echo."""
    if _active is None:
        click.echo(line)
        return
    console, log = _active
    click.echo(line, file=console)
    log.write(f"[msx] {line}\n")


class QuietConsole:
    """``with QuietConsole(path) as echo:`` echo writes msx's lines to the console; everything else goes to ``path``."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log: TextIO | None = None
        self._saved_fds: tuple[int, int] | None = None
        self._console: TextIO | None = None
        self._streams: tuple[TextIO, TextIO] | None = None
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []
        self._made: list[Path] = []

    def __enter__(self) -> Callable[[str], None]:
        self._made = [folder for folder in (self.log_path.parent, *self.log_path.parent.parents) if not folder.exists()]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self._log = open(self.log_path, "a", buffering=1, encoding="utf-8")
        self._streams = (sys.stdout, sys.stderr)
        console = sys.stdout
        if _writes_to_descriptor(sys.stdout, 1) and _writes_to_descriptor(sys.stderr, 2):
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved_fds = (os.dup(1), os.dup(2))
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            console = self._console = open(self._saved_fds[0], "w", buffering=1, encoding="utf-8", closefd=False)
        for handler in _stream_handlers():
            if handler.stream in (*self._streams, sys.__stdout__, sys.__stderr__):
                self._handlers.append((handler, handler.stream))
                handler.setStream(log)
        sys.stdout = sys.stderr = log
        global _active
        _active = (console, log)
        return echo

    def __exit__(self, kind, error, trace) -> None:
        global _active
        _active = None
        log = self._log
        assert log is not None and self._streams is not None
        for handler, stream in self._handlers:
            handler.setStream(stream)
        sys.stdout, sys.stderr = self._streams
        if self._saved_fds is not None:
            log.flush()
            os.dup2(self._saved_fds[0], 1)
            os.dup2(self._saved_fds[1], 2)
            for fd in self._saved_fds:
                os.close(fd)
            if self._console is not None:
                self._console.close()
        unexpected = isinstance(error, Exception) and not isinstance(
            error, (click.ClickException, click.exceptions.Exit)
        )
        if unexpected:
            log.write("".join(traceback.format_exception(kind, error, trace)))
        # Left open: handlers made meanwhile (Ray's, Tune's) keep writing here until the process ends.
        log.flush()
        if log.tell() == 0:  # a launch refused before anything spoke (bad input): no log left behind
            self.log_path.unlink()
            for folder in self._made:  # the folders made for it, deepest first, unless something else is in them now
                with contextlib.suppress(OSError):
                    folder.rmdir()
        if unexpected:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise click.ClickException(
                f"{type(error).__name__}{': ' + first if first else ''} (full trace in {self.log_path})"
            ) from None


def _writes_to_descriptor(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, io.UnsupportedOperation, ValueError):  # a test runner's buffer, a closed stream
        return False


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    return [
        handler
        for logger in loggers
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]
