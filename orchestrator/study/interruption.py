"""Ctrl-C and SIGTERM during a study: its trials stop at their last checkpoints, and the study can be resumed.

Tune already ends a run well on its stop signal: it leaves its loop, saves the experiment's state with every
unfinished trial as it stood, then stops the trials; `Tuner.restore` continues from that state. msx adds:
SIGTERM, what a batch scheduler sends, acts like that first Ctrl-C; the driver learns that the run was
interrupted (Tune returns as if it had ended) so that it records the study as interrupted and registers
nothing; a second Ctrl-C stops at once (Tune puts the previous SIGINT handler back after the first). The
search ends a run the same way, with its reason, when it finds it can no longer go on (`stop_run`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from ray.tune import Callback

# Process-wide, as signals are: set by the first stop signal of a Tune run, or by `stop_run`.
INTERRUPTED = threading.Event()
_received: list[int] = []
_reasons: list[str] = []
# Tune's own stop handler of the current run, kept by StopSignals.setup.
_tune_stop: list[Callable] = []


def received_signal() -> int | None:
    return _received[-1] if _received else None


def stop_reason() -> str | None:
    """Why the search ended the run (`stop_run`), if it did."""
    return _reasons[-1] if _reasons else None


def reset() -> None:
    INTERRUPTED.clear()
    _received.clear()
    _reasons.clear()
    _tune_stop.clear()


def note(signum: int) -> None:
    _received.append(signum)
    INTERRUPTED.set()


def stop_run(reason: str) -> None:
    """End the current Tune run as a first Ctrl-C does: its state saved, its trials at their last checkpoints, the
    study resumable. Called from Tune's loop (the driver's main thread)."""
    _reasons.append(reason)
    INTERRUPTED.set()
    if _tune_stop and callable(_tune_stop[-1]):
        _tune_stop[-1](signal.SIGUSR1, None)


class StopSignals(Callback):
    """Routes SIGINT and SIGTERM to Tune's own stop handler, noting that the run was interrupted.

    Installed when Tune sets its callbacks up, after Tune has put its handler on SIGINT and SIGUSR1.
    """

    def setup(self, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # Tune's handler is always on SIGUSR1; on SIGINT only unless TUNE_DISABLE_SIGINT_HANDLER is set.
        tune_stop = signal.getsignal(signal.SIGUSR1)
        _tune_stop.append(tune_stop)
        previous_term = signal.getsignal(signal.SIGTERM)

        def on_signal(signum: int, frame) -> None:
            signal.signal(signal.SIGTERM, previous_term)
            note(signum)
            print(
                f"\n{signal.Signals(signum).name} received: the trials stop at their last checkpoints and the "
                "search's state is saved, to be resumed; Ctrl-C again stops at once",
                flush=True,
            )
            if callable(tune_stop):
                tune_stop(signum, frame)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
