"""The study record and progress snapshot that `msx launch --resume` and `msx status` read: real files."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time

import pytest

from msx.models.data.folds import resolve_folds
from msx.orchestrator.spec import load_spec, spec_from_dict
from msx.orchestrator.study.configuration_search import ConfigurationSearch
from msx.orchestrator.study.progress import Progress, progress_path
from msx.orchestrator.study.search_record import search_path
from msx.orchestrator.study.state import (
    FINISHED,
    INTERRUPTED,
    RUNNING,
    StudyState,
    find_study,
    read_state,
    state_path,
    unfinished_study,
    write_state,
)
from msx.orchestrator.study.status import status_lines
from tests.helpers import run_msx


def state(experiment="smoke", study="smoke-20261127-100000", started=1000.0, **changes) -> StudyState:
    base = StudyState(
        experiment=experiment, study=study, spec=load_spec("smoke").to_dict(), data_root="/data/cohort",
        data_fingerprint="f" * 64, tracking_uri="sqlite:///runs/mlflow.db", experiment_id="1",
        parent_run_id="abc", started=started,
    )
    return dataclasses.replace(base, **changes)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_record_round_trips_as_json(tmp_path):
    record = state().held_by_this_process()
    write_state(tmp_path, record)
    path = state_path(tmp_path, "smoke", record.study)
    assert path.name.endswith(".study.json")
    assert read_state(path) == record
    assert not list(path.parent.glob("*.tmp"))


def test_damaged_record_is_named(tmp_path):
    path = state_path(tmp_path, "smoke", "smoke-1")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="smoke-1.study.json: not a readable msx study record"):
        find_study(tmp_path, "smoke")


def test_find_by_study_by_experiment_and_latest(tmp_path):
    write_state(tmp_path, state(study="smoke-a", started=1.0))
    write_state(tmp_path, state(study="smoke-b", started=2.0))
    write_state(tmp_path, state(experiment="paper", study="paper-a", started=3.0))
    assert find_study(tmp_path, "smoke").study == "smoke-b"
    assert find_study(tmp_path, "smoke-a").study == "smoke-a"
    assert find_study(tmp_path, None).study == "paper-a"
    with pytest.raises(ValueError, match="no study or experiment named 'hpo'.*experiments here: paper, smoke"):
        find_study(tmp_path, "hpo")
    with pytest.raises(ValueError, match="no studies here yet"):
        find_study(tmp_path / "empty", None)


def test_only_the_latest_study_of_an_experiment_counts_as_unfinished(tmp_path):
    write_state(tmp_path, state(study="smoke-a", started=1.0))
    assert unfinished_study(tmp_path, "smoke").study == "smoke-a"
    write_state(tmp_path, state(study="smoke-b", started=2.0).ended_as(FINISHED))
    assert unfinished_study(tmp_path, "smoke") is None


def test_driver_alive_only_while_its_process_runs_on_this_host():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive = state(status=RUNNING, driver_host=socket.gethostname(), driver_pid=sleeper.pid)
        assert alive.driver_alive()
        assert not dataclasses.replace(alive, driver_host="another-host").driver_alive()
        assert not alive.ended_as(FINISHED).driver_alive()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not alive.driver_alive()


def write_progress(storage, record, **values):
    progress = Progress(
        total=10, done=3, running=("unet-c1 fold 4: epoch 8",), failed=(), pending=6, best_score=0.8123,
        best_trial="unet-c1 fold 2", elapsed_s=100.0, updated=time.time() - 5,
    )
    path = progress_path(storage, record.experiment, record.study)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(progress, **values))))


def test_status_of_an_interrupted_study_says_how_to_resume(tmp_path):
    record = dataclasses.replace(state(), driver_host=socket.gethostname(), driver_pid=dead_pid())
    write_state(tmp_path, record)
    write_progress(tmp_path, record)
    lines = status_lines(tmp_path, "smoke")
    assert f"interrupted: its driver (pid {record.driver_pid}" in lines[0]
    assert f"msx launch --resume {record.study}" in lines[0]
    assert "trials: 3/10 done, 1 running, 0 failed, 6 pending" in lines
    assert "best validation Dice so far: 0.8123 (unet-c1 fold 2)" in lines
    assert "  running  unet-c1 fold 4: epoch 8" in lines


def test_status_of_a_running_and_of_a_finished_study(tmp_path):
    running = state().held_by_this_process()
    # This process is the "driver"; driver_alive never counts the asking process itself.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_state(tmp_path, dataclasses.replace(running, driver_pid=sleeper.pid))
        assert f"running (driver pid {sleeper.pid}" in status_lines(tmp_path, None)[0]
    finally:
        sleeper.kill()
        sleeper.wait()
    write_state(tmp_path, running.ended_as(FINISHED))
    lines = status_lines(tmp_path, running.study)
    assert "finished at" in lines[0]
    assert lines[1] == "no trial has been scheduled yet"


def test_status_command_errors_in_one_line(tmp_path):
    result = run_msx("status", "nope", "--storage", tmp_path, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: no study or experiment named 'nope' under {tmp_path} (no studies here yet)"
    ]


def test_a_study_stopped_by_ctrl_c_is_unfinished_and_its_status_lists_its_configurations(tmp_path):
    record = state().ended_as(INTERRUPTED)
    write_state(tmp_path, record)
    assert unfinished_study(tmp_path, "smoke") == record
    smoke = load_spec("smoke").to_dict()
    spec = spec_from_dict(
        {**smoke, "recipes": {}, "model": {**smoke["model"], "backbones": ["unet"]},
         "search": {**smoke["search"], "configurations_per_backbone": 2,
                    "scheduler": {"name": "asha", "grace_period": 8, "reduction_factor": 3}}}
    )
    search = ConfigurationSearch(
        spec, resolve_folds("loso", (1, 2, 3)), concurrency=6, snapshot=search_path(tmp_path, "smoke", record.study),
        echo=lambda _: None,
    )
    trials = [search.suggest(f"t{index}") and f"t{index}" for index in range(6)]
    for trial_id, score in zip(trials, (0.6, 0.6, 0.6, 0.1, 0.1, 0.1), strict=True):
        search.on_report(trial_id, {"epoch": 8, "val_dice": score})
    lines = status_lines(tmp_path, "smoke")
    assert "interrupted at" in lines[0] and f"`msx launch --resume {record.study}` continues it" in lines[0]
    assert "configurations: 2 (1 pruned, 1 running); rungs at epochs 8" in lines
    assert any(line.startswith("  unet-c2  pruned at epoch 8, mean validation Dice 0.1000") for line in lines), lines
    assert any(
        line.startswith("  unet-c1  running, passed epoch 8, mean validation Dice 0.6000; 2 fold(s) paused")
        for line in lines
    )
    assert "early stopping: 48 of 144 fold-epochs trained, 96 saved (67%)" in " ".join(lines)


def test_a_failed_trials_error_is_its_traceback_last_line():
    from msx.orchestrator.study.progress import error_line

    trace = (
        "ray::_Inner.train() (pid=123, ip=127.0.0.1)\n"
        "  File \"worker.py\", line 10, in train_loop_per_worker\n"
        "    load_scan(scan)\n"
        "msx.models.data.cohort.CohortError: /data/training02_01_flair_pp.nii.gz contains NaN or infinite voxels\n\n"
    )
    assert error_line(trace) == (
        "msx.models.data.cohort.CohortError: /data/training02_01_flair_pp.nii.gz contains NaN or infinite voxels"
    )
    assert error_line("") == "no error text was saved"
