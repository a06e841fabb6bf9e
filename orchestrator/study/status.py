"""`msx status`: a study's record and its last progress snapshot, read from the storage folder alone.

No Ray connection is needed, so it answers for a study whose driver died as well as for a running one
(on a cluster: run it where the shared storage is mounted, e.g. `ray exec CLUSTER.yaml 'msx status'`).
"""

from __future__ import annotations

import time
from pathlib import Path

from .progress import progress_path, read_progress
from .search_record import read_summary, search_path
from .state import INTERRUPTED, RUNNING, find_study


def status_lines(storage: Path, name: str | None, now: float | None = None) -> list[str]:
    state = find_study(storage, name)
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started))
    if state.status != RUNNING:
        ended = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.ended)) if state.ended else "?"
        condition = f"{state.status} at {ended}"
        if state.status == INTERRUPTED:
            condition += f"; `msx launch --resume {state.study}` continues it"
    elif state.driver_alive():
        condition = f"running (driver pid {state.driver_pid} on {state.driver_host})"
    else:
        condition = (
            f"interrupted: its driver (pid {state.driver_pid} on {state.driver_host}) is gone; "
            f"`msx launch --resume {state.study}` continues it"
        )
    lines = [f"study {state.study} (experiment {state.experiment}), started {started}: {condition}"]
    progress = read_progress(progress_path(storage, state.experiment, state.study))
    if progress is None:
        lines.append("no trial has been scheduled yet")
    else:
        best = f"{progress.best_score:.4f} ({progress.best_trial})" if progress.best_trial else "none yet"
        lines.append(
            f"trials: {progress.done}/{progress.total} done, {len(progress.running)} running, "
            f"{len(progress.failed)} failed, {progress.pending} pending"
        )
        lines.append(f"best validation Dice so far: {best}")
        lines += [f"  running  {trial}" for trial in progress.running]
        lines += [f"  failed   {trial}" for trial in progress.failed]
        lines.append(f"last update {now - progress.updated:.0f} s ago")
    search = read_summary(search_path(storage, state.experiment, state.study))
    if search is not None:
        lines += search.lines()
    lines.append(f"MLflow: launch run {state.parent_run_id} in {state.tracking_uri}")
    lines.append(f"files: {state.tune_path(storage)}")
    return lines
