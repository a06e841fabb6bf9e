"""Where a trial's start-up goes: seconds from the trial's process start to each phase of a training worker's start.

The trial's process (Tune's trainable, which builds the TorchTrainer) notes when it was created; its workers count
from there. The worker logs each phase at INFO (Ray dashboard -> the worker's log) and its first report to Tune
carries them (`startup/<phase>_s`), so they reach the trial's MLflow run and the overhead benchmark. On a cluster
the trial and its worker may sit on different nodes: their clocks then add their skew to the worker's phases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from ..trial import STARTUP_PREFIX

if TYPE_CHECKING:  # msx.models imports torch and MONAI, which the trial's process (trainable.py) does without
    from msx.models.fold import TrainingObserver

# In order: the trial's process ran its imports and entered the trainable; the worker group started (Ray Train's
# controller, the worker's process and imports, the process group) and the worker entered its loop; the fold's
# scans are in memory (and a checkpoint to resume from, if any); the network is built; the first training step
# began; the first epoch ended.
PHASES = ("trainable", "worker_loop", "data_loaded", "network_built", "first_step", "first_epoch")

log = logging.getLogger("msx.startup")


class StartupClock:
    """Marks each start-up phase once, in seconds since `started_at` (a Unix time), after those already `marked`
    (by the trial's process); as a TrainingObserver it wraps `observer` and marks the first step and first epoch."""

    def __init__(
        self, started_at: float, observer: TrainingObserver | None = None, marked: dict[str, float] | None = None
    ) -> None:
        self._started_at = started_at
        self._observer = observer
        self.seconds: dict[str, float] = dict(marked or {})

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown start-up phase {phase!r}; phases: {', '.join(PHASES)}")
        if phase not in self.seconds:
            self.seconds[phase] = time.time() - self._started_at
            log.info("start-up: %s %.1f s after the trial's process started", phase, self.seconds[phase])

    def metrics(self) -> dict[str, float]:
        return {f"{STARTUP_PREFIX}{phase}_s": self.seconds[phase] for phase in PHASES if phase in self.seconds}

    @contextmanager
    def training_epoch(self, epoch: int, steps: int, samples: int) -> Iterator[None]:
        self.mark("first_step")
        with self._observer.training_epoch(epoch, steps, samples) if self._observer else nullcontext():
            yield
        self.mark("first_epoch")

    def record_validation(self, dice: float) -> None:
        if self._observer is not None:
            self._observer.record_validation(dice)
