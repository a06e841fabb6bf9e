"""The quiet console in a process of its own, with real file descriptors: what Ray's and Tune's kinds of output
(logging handlers made before and during, print, raw writes to fd 2, child processes) do, and what reaches the
console."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys
    from pathlib import Path
    from msx.orchestrator.cli.console import QuietConsole

    early = logging.getLogger("ray")           # like Ray's handler, made at import with the real stderr
    early.addHandler(logging.StreamHandler())
    early.setLevel(logging.INFO)
    console = QuietConsole(Path(sys.argv[1]))
    with console as echo:
        echo("msx: study 'smoke' starts")
        early.info("Started a local Ray instance.")
        late = logging.getLogger("ray.tune")    # made meanwhile, like Tune's
        late.addHandler(logging.StreamHandler())
        late.propagate = False
        late.warning("process_trial_result took 0.559 s")
        print("Tune configuration box")
        os.write(2, b"raylet: C++ warning\\n")
        subprocess.run([sys.executable, "-c", "print('a worker process speaks')"], check=True)
        echo("msx: trials 10/10 done")
        if len(sys.argv) > 2:
            raise RuntimeError("the GCS died\\nsecond line of the message")
    """
)


def run(tmp_path, *extra):
    log = tmp_path / "logs" / "launch.log"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(log), *extra], capture_output=True, text=True, timeout=120
    )
    return result, log


# Integration: a process of its own by design (real file descriptors 1 and 2, a child process).
@pytest.mark.integration
def test_only_msx_lines_reach_the_console_and_the_rest_is_logged(tmp_path):
    result, log = run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["msx: study 'smoke' starts", "msx: trials 10/10 done"]
    assert result.stderr == ""
    logged = log.read_text()
    for line in ("Started a local Ray instance.", "process_trial_result took 0.559 s", "Tune configuration box",
                 "raylet: C++ warning", "a worker process speaks", "[msx] msx: trials 10/10 done"):
        assert line in logged


# Integration: a process of its own by design (real file descriptors 1 and 2, a child process).
@pytest.mark.integration
def test_an_error_is_one_line_naming_the_log_with_the_trace_in_it(tmp_path):
    # The console turns the error into a click.ClickException, which `msx` prints as "Error: ..." on stderr.
    script = tmp_path / "command.py"
    script.write_text(
        "import sys, click, runpy\n"
        "try:\n"
        f"    runpy.run_path({str(tmp_path / 'script.py')!r}, run_name='__main__')\n"
        "except click.ClickException as error:\n"
        "    error.show(); sys.exit(error.exit_code)\n"
    )
    (tmp_path / "script.py").write_text(SCRIPT)
    log = tmp_path / "logs" / "launch.log"
    result = subprocess.run(
        [sys.executable, str(script), str(log), "fail"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["msx: study 'smoke' starts", "msx: trials 10/10 done"]
    assert result.stderr.strip().splitlines() == [f"Error: RuntimeError: the GCS died (full trace in {log})"]
    logged = log.read_text()
    assert "Traceback (most recent call last)" in logged and "second line of the message" in logged


def test_a_launch_that_said_nothing_leaves_no_log(tmp_path):
    from msx.orchestrator.cli.console import QuietConsole

    log = tmp_path / "runs" / "logs" / "launch.log"
    with QuietConsole(log):
        pass
    assert list(tmp_path.iterdir()) == []  # nor the storage folder made for it


def test_echo_pickles_as_tune_saves_it(tmp_path):
    """Tune pickles its callbacks (the progress view holds echo) with the experiment's state."""
    import pickle

    from msx.orchestrator.cli.console import QuietConsole

    with QuietConsole(tmp_path / "launch.log") as echo:
        assert pickle.loads(pickle.dumps(echo)) is echo
        echo("msx: a line")
    assert (tmp_path / "launch.log").read_text() == "[msx] msx: a line\n"
