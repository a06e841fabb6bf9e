"""Ctrl-C and SIGTERM during a Tune run reach Tune's own stop handler and mark the run interrupted; real
signals sent to this process. (A real `msx launch` stopped by SIGINT and resumed: test_study_lifecycle_e2e.py.)"""

import os
import signal

import pytest

from msx.orchestrator.study import interruption

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}


@pytest.fixture
def tune_handlers():
    """Stand-ins for what Tune installs before its callbacks' setup: its stop handler on SIGUSR1 (and SIGINT).

    The process starts as `msx launch` does, whatever earlier tests in this process left: Python's own Ctrl-C
    handler (the one Tune puts back after the first signal) and the stop signals not blocked.
    """
    saved = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    saved_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    calls: list[int] = []

    def tune_stop(signum, frame):
        calls.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as Tune does after the first signal

    signal.signal(signal.SIGUSR1, tune_stop)
    signal.signal(signal.SIGINT, tune_stop)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    interruption.reset()
    yield calls
    for number, handler in saved.items():
        signal.signal(number, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
    interruption.reset()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_stop_signal_ends_the_tune_run_and_marks_it_interrupted(tune_handlers, signum, capsys):
    interruption.StopSignals().setup()
    os.kill(os.getpid(), signum)
    assert tune_handlers == [signum]  # Tune's handler ran: it ends its loop and saves the experiment
    assert interruption.INTERRUPTED.is_set() and interruption.received_signal() == signum
    assert (
        f"{signal.Signals(signum).name} received: the trials stop at their last checkpoints" in capsys.readouterr().out
    )
    # Next time: SIGTERM's previous handler (here the default), and Python's KeyboardInterrupt on Ctrl-C.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_the_search_ends_a_stalled_run_through_tunes_handler_with_its_reason(tune_handlers):
    interruption.StopSignals().setup()
    interruption.stop_run("stalled: unet-c1: fold(s) 3 wait at the epoch-4 rung")
    assert tune_handlers == [signal.SIGUSR1]  # Tune's own stop: it saves the experiment, the study stays resumable
    assert interruption.INTERRUPTED.is_set() and interruption.received_signal() is None
    assert interruption.stop_reason() == "stalled: unet-c1: fold(s) 3 wait at the epoch-4 rung"
    interruption.reset()
    assert interruption.stop_reason() is None and not interruption.INTERRUPTED.is_set()
