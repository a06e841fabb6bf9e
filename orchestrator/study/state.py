"""What a study is and where it stands, kept next to its files so a new driver can take it over.

`<storage>/<experiment>/studies/<study>.study.json` holds everything `msx launch --resume` and `msx status` need
without the spec file or the data folder the study was started from: the resolved spec, the cohort root, the
data fingerprint, the tracking URI and the MLflow launch run. It is rewritten (atomically) when the study
starts, when a driver takes it over and when it ends. JSON, never pickle: `msx status` reads it and must not
execute anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STUDIES_FOLDER = "studies"
STATE_SUFFIX = ".study.json"
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
# Stopped by Ctrl-C or SIGTERM: its trials at their last checkpoints, nothing registered; `--resume` continues it.
INTERRUPTED = "interrupted"
# A study that may be taken over: interrupted, or running with its driver gone.
RESUMABLE = (RUNNING, INTERRUPTED)


@dataclass(frozen=True)
class StudyState:
    experiment: str
    study: str
    spec: dict[str, Any]
    data_root: str
    data_fingerprint: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    started: float
    status: str = RUNNING
    driver_host: str = ""
    driver_pid: int = 0
    ended: float | None = None

    def tune_path(self, storage: Path) -> Path:
        return storage / self.experiment / "tune" / self.study

    def driver_alive(self) -> bool:
        """Whether the driver that last held the study still runs (only knowable on its own host)."""
        if self.status != RUNNING or not self.driver_pid or self.driver_host != socket.gethostname():
            return False
        try:
            os.kill(self.driver_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.driver_pid != os.getpid()

    def held_by_this_process(self) -> StudyState:
        return dataclasses.replace(
            self, status=RUNNING, driver_host=socket.gethostname(), driver_pid=os.getpid(), ended=None
        )

    def ended_as(self, status: str) -> StudyState:
        return dataclasses.replace(self, status=status, ended=time.time())


def state_path(storage: Path, experiment: str, study: str) -> Path:
    return storage / experiment / STUDIES_FOLDER / f"{study}{STATE_SUFFIX}"


def write_state(storage: Path, state: StudyState) -> None:
    path = state_path(storage, state.experiment, state.study)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(dataclasses.asdict(state), indent=1))
    os.replace(partial, path)


def read_state(path: Path) -> StudyState:
    try:
        raw = json.loads(path.read_text())
        return StudyState(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path}: not a readable msx study record ({error})") from None


def studies_of(storage: Path, experiment: str) -> list[StudyState]:
    """An experiment's studies, oldest first."""
    folder = storage / experiment / STUDIES_FOLDER
    states = [read_state(path) for path in folder.glob(f"*{STATE_SUFFIX}")] if folder.is_dir() else []
    return sorted(states, key=lambda state: state.started)


def all_studies(storage: Path) -> list[StudyState]:
    """Every study under the storage folder, oldest first."""
    if not storage.is_dir():
        return []
    states = [state for folder in storage.iterdir() if folder.is_dir() for state in studies_of(storage, folder.name)]
    return sorted(states, key=lambda state: state.started)


def find_study(storage: Path, name: str | None) -> StudyState:
    """A study by its own name (`smoke-20261127-101500`), the latest of an experiment (`smoke`), or the latest
    study of all (None)."""
    if name is None:
        studies = all_studies(storage)
        if not studies:
            raise ValueError(f"{storage}: no studies here yet (msx launch starts one; --storage names another folder)")
        return studies[-1]
    by_experiment = studies_of(storage, name)
    if by_experiment:
        return by_experiment[-1]
    matches = [state for state in all_studies(storage) if state.study == name]
    if not matches:
        known = sorted({state.experiment for state in all_studies(storage)})
        hint = f"experiments here: {', '.join(known)}" if known else "no studies here yet"
        raise ValueError(f"no study or experiment named {name!r} under {storage} ({hint})")
    return matches[-1]


def unfinished_study(storage: Path, experiment: str) -> StudyState | None:
    """The experiment's latest study if it never ended (interrupted, its driver died, or it still runs)."""
    studies = studies_of(storage, experiment)
    return studies[-1] if studies and studies[-1].status in RESUMABLE else None
