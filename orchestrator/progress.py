"""A compact progress view for the terminal: trials done / running / failed and the best so far."""

from __future__ import annotations

import time
from typing import Callable

from ray.tune import Callback


class ProgressView(Callback):
    def __init__(self, total_trials: int, echo: Callable[[str], None] = print, every_s: float = 15.0) -> None:
        self._total = total_trials
        self._echo = echo
        self._every_s = every_s
        self._last_print = 0.0
        self._epochs: dict[str, str] = {}
        self._done = self._failed = 0
        self._best: tuple[float, str] | None = None
        self._started = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._epochs[trial.trial_id] = f"{_label(trial)}: starting"
        self._maybe_print(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch = result.get("epoch")
        self._epochs[trial.trial_id] = f"{_label(trial)}: epoch {epoch}"
        score = result.get("val_dice")
        if score is not None and (self._best is None or score > self._best[0]):
            self._best = (float(score), _label(trial))
        self._maybe_print()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._done += 1
        self._epochs.pop(trial.trial_id, None)
        self._maybe_print(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._failed += 1
        self._epochs.pop(trial.trial_id, None)
        self._echo(f"trial {_label(trial)} failed; its error is in {trial.local_path}")
        self._maybe_print(force=True)

    def _maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self._every_s:
            return
        self._last_print = now
        best = f"best validation Dice {self._best[0]:.4f} ({self._best[1]})" if self._best else "no validation yet"
        running = "; ".join(self._epochs.values()) or "-"
        self._echo(
            f"[{now - self._started:6.0f} s] trials {self._done}/{self._total} done, {len(self._epochs)} running, "
            f"{self._failed} failed | {best} | {running}"
        )


def _label(trial) -> str:
    return f"{trial.config.get('configuration')} fold {trial.config.get('fold')}"
