"""Where a study stands: trials done / running / failed and the best so far, for the terminal and for
`msx status`.

The view is computed from Tune's own trial list at every step of its loop, so a driver that resumed a
study counts the trials an earlier driver finished. Each printed line is also written as a small JSON
snapshot next to the study's record, which `msx status` reads without connecting to Ray. A running trial's
epoch comes from the study's live-epoch actor (trials/live_epochs.py), asked only when a line is printed:
Tune's last result has the epoch of the trial's last validation only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ray.tune import Callback
from ray.tune.experiment import Trial

from ..trial import BEST_VALIDATION_DICE, EPOCH, TrialConfig
from ..trials.live_epochs import read_live_epochs
from .state import STUDIES_FOLDER

PROGRESS_SUFFIX = ".progress.json"


def progress_path(storage: Path, experiment: str, study: str) -> Path:
    return storage / experiment / STUDIES_FOLDER / f"{study}{PROGRESS_SUFFIX}"


@dataclass(frozen=True)
class Progress:
    total: int
    done: int
    running: tuple[str, ...]
    failed: tuple[str, ...]
    pending: int
    best_score: float | None
    best_trial: str | None
    elapsed_s: float
    updated: float

    def line(self) -> str:
        best = (
            f"best validation Dice {self.best_score:.4f} ({self.best_trial})"
            if self.best_trial
            else "no validation yet"
        )
        return (
            f"[{self.elapsed_s:6.0f} s] trials {self.done}/{self.total} done, {len(self.running)} running, "
            f"{len(self.failed)} failed | {best} | {'; '.join(self.running) or '-'}"
        )


def read_progress(path: Path) -> Progress | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return Progress(**{**raw, "running": tuple(raw["running"]), "failed": tuple(raw["failed"])})


def progress_of(
    trials: list[Trial],
    total: int,
    elapsed_s: float,
    scores: dict[str, float] | None = None,
    live_epochs: dict[str, int] | None = None,
) -> Progress:
    """`scores`: the best validation Dice seen per trial id; a trial's last result carries one only when
    that epoch validated. `live_epochs`: the last epoch each running trial finished, by trial id, where known
    (else its last result's epoch is shown)."""
    best: tuple[float, str] | None = None
    running, failed, done = [], [], 0
    for trial in trials:
        result = trial.last_result or {}
        seen = [s for s in (result.get(BEST_VALIDATION_DICE), (scores or {}).get(trial.trial_id)) if s is not None]
        score = max(seen) if seen else None
        if score is not None and (best is None or score > best[0]):
            best = (float(score), _label(trial))
        if trial.status == Trial.TERMINATED:
            done += 1
        elif trial.status == Trial.ERROR:
            failed.append(_label(trial))
        elif trial.status == Trial.RUNNING:
            epoch = (live_epochs or {}).get(trial.trial_id) or result.get(EPOCH)
            running.append(f"{_label(trial)}: {'epoch ' + str(epoch) if epoch else 'starting'}")
    return Progress(
        total=total,
        done=done,
        running=tuple(running),
        failed=tuple(failed),
        pending=max(0, total - done - len(failed) - len(running)),
        best_score=best[0] if best else None,
        best_trial=best[1] if best else None,
        elapsed_s=elapsed_s,
        updated=time.time(),
    )


class ProgressView(Callback):
    """Prints a line when a trial starts, ends or fails, and at most every `every_s` seconds otherwise.

    `live_epochs`: the name of the study's live-epoch actor (kept by name: Tune saves this object with the study,
    and a resumed driver starts a new actor under the same name)."""

    def __init__(
        self,
        total_trials: int,
        echo: Callable[[str], None] = print,
        snapshot: Path | None = None,
        every_s: float = 15.0,
        live_epochs: str | None = None,
    ) -> None:
        self._total = total_trials
        self._live_epochs = live_epochs
        self._echo = echo
        self._snapshot = snapshot
        self._every_s = every_s
        self._last_print = 0.0
        self._last_counts: tuple[int, int, int] | None = None
        self._scores: dict[str, float] = {}
        # Wall-clock: a driver that resumes the study gets this object back from Tune's saved state.
        self._started = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        score = result.get(BEST_VALIDATION_DICE)
        if score is not None:
            self._scores[trial.trial_id] = max(float(score), self._scores.get(trial.trial_id, float(score)))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = trial.get_error()
        where = trial.error_file or trial.local_path
        self._echo(f"trial {_label(trial)} failed: {error_line(str(error) if error else '')} (full trace: {where})")

    def on_step_end(self, iteration, trials, **info) -> None:
        self._show(trials)

    def on_experiment_end(self, trials, **info) -> None:
        self._show(trials, force=True)

    def _show(self, trials: list[Trial], force: bool = False) -> None:
        progress = progress_of(trials, self._total, time.time() - self._started, self._scores)
        counts = (progress.done, len(progress.running), len(progress.failed))
        now = time.monotonic()
        if not force and counts == self._last_counts and now - self._last_print < self._every_s:
            return
        self._last_print, self._last_counts = now, counts
        if any(trial.status == Trial.RUNNING for trial in trials):
            # A view saved by a study from before live epochs has no actor name.
            live = read_live_epochs(getattr(self, "_live_epochs", None))
            progress = progress_of(trials, self._total, progress.elapsed_s, self._scores, live)
        self._echo(progress.line())
        if self._snapshot is not None:
            self._snapshot.parent.mkdir(parents=True, exist_ok=True)
            partial = self._snapshot.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(asdict(progress)))
            os.replace(partial, self._snapshot)


def error_line(trace: str) -> str:
    """The line of a (Ray-wrapped) traceback that says what went wrong: its last, ``ValueError: ...``."""
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return lines[-1] if lines else "no error text was saved"


def _label(trial: Trial) -> str:
    return TrialConfig.from_tune(trial.config).label
