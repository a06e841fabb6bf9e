"""The training workers' own figures, exported as Ray metrics beside Ray's.

Ray's metrics agent serves them to Prometheus (and so to the Ray dashboard's Metrics view) on every node's
metrics export port, with Ray's `ray_` prefix: `msx_epoch` is scraped as `ray_msx_epoch`. Every series
carries the trial's identity (`TAG_KEYS`), so one trial's or one worker's series can be picked out; the
`train_run` tag is the Ray Train run's name, which holds the Tune trial id (`train-<trial id>`, see trial.py).

Figures are recorded once per epoch, after the epoch's loss has been read: recording adds no device
synchronisation to the training steps.

GPU memory is the peak that PyTorch's caching allocator handed out during the epoch's training steps
(`torch.cuda.max_memory_allocated`, the peak reset at each epoch's start): the figure that says whether a
larger batch or patch would fit. PyTorch keeps no such count on the CPU, so there the series is absent,
not 0: a 0 would read as a measurement.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from ray.util.metrics import Counter, Gauge

from ..trial import TrialConfig

TAG_KEYS = ("backbone", "configuration", "fold", "train_run", "rank")
# The name Prometheus sees: Ray's metrics agent puts its namespace before every application metric.
PROMETHEUS_PREFIX = "ray_"


def trial_tags(trial: TrialConfig, train_run: str, rank: int) -> dict[str, str]:
    """Tag values from the worker's trial and its Ray Train context."""
    return {
        "backbone": trial.backbone,
        "configuration": trial.configuration,
        "fold": str(trial.fold),
        "train_run": train_run,
        "rank": str(rank),
    }


class WorkerMetrics:
    """One training worker's series: throughput, training time, GPU memory, epoch and validation Dice."""

    def __init__(self, tags: dict[str, str], device: torch.device):
        self._device = device
        self._started = False

        def gauge(name: str, description: str) -> Gauge:
            return Gauge(name, description, TAG_KEYS).set_default_tags(tags)

        def counter(name: str, description: str) -> Counter:
            return Counter(name, description, TAG_KEYS).set_default_tags(tags)

        self._epoch = gauge("msx_epoch", "Training epoch the worker is in (1-based); the last one once training ends.")
        self._steps_per_second = gauge("msx_train_steps_per_second", "Training steps per second over the last epoch.")
        self._samples_per_second = gauge(
            "msx_train_samples_per_second", "Training samples (patches) per second over the last epoch."
        )
        self._gpu_memory = gauge(
            "msx_gpu_memory_peak_bytes", "Peak GPU memory allocated by PyTorch during the last epoch's training steps."
        )
        self._validation_dice = gauge("msx_validation_dice", "Validation Dice of the latest validation.")
        self._training_start = gauge(
            "msx_training_start_time_seconds", "Unix time at which the worker began its first training epoch."
        )
        self._steps = counter("msx_train_steps", "Training steps taken by the worker.")
        # Against wall time, the share of the trial spent training rather than validating, reporting or starting.
        self._training_seconds = counter("msx_train_seconds", "Seconds the worker spent in training epochs.")
        self._reports = counter("msx_reports", "Reports the worker made to Tune.")
        self._report_seconds = counter("msx_report_seconds", "Seconds the worker spent blocked in its reports to Tune.")

    @contextmanager
    def training_epoch(self, epoch: int, steps: int, samples: int) -> Iterator[None]:
        """Time the block as one epoch of `steps` steps over `samples` samples.

        The block must end only once the device has finished the epoch (the worker reads the epoch's loss
        inside it), or the rates would count queued work as done.
        """
        if not self._started:
            self._training_start.set(time.time())
            self._started = True
        self._epoch.set(epoch)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self._steps_per_second.set(steps / seconds)
        self._samples_per_second.set(samples / seconds)
        self._steps.inc(steps)
        self._training_seconds.inc(seconds)
        if self._device.type == "cuda":
            self._gpu_memory.set(torch.cuda.max_memory_allocated(self._device))

    def record_validation(self, dice: float) -> None:
        self._validation_dice.set(dice)

    def record_report(self, seconds: float) -> None:
        self._reports.inc()
        self._report_seconds.inc(seconds)
