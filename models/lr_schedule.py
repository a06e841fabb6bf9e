"""The reference's learning-rate schedule, per epoch, as a pure function.

The MSSegDiff reference trains with ``LinearWarmupCosineAnnealingLR`` (Lightning Bolts' scheduler, copied into
its trainer) with ``warmup_epochs = max_epochs / 10``, ``warmup_start_lr = 0`` and ``eta_min = 0``, stepped once
per epoch. The scheduler is built before the first epoch, so epoch 0 trains at ``warmup_start_lr`` (0): the first
epoch leaves the weights where they are, except for what weight decay and batch-norm statistics do. Each later
epoch's rate is computed from the previous one (the scheduler's recursive ``get_lr``, not its closed form), which is
what makes a non-integer warm-up overshoot: with 24 epochs (warm-up 2.4) epochs 1 and 2 add ``base_lr / 1.4`` each
and epoch 2 trains at 1.43 * ``base_lr``; with fewer than 10 epochs (warm-up below 1) the rate stays 0 throughout.

msx's training (`fold.run_fold`) steps MONAI's ``WarmupCosineSchedule`` once per batch by default
(``training.schedule: per-step``), with no epoch at rate 0 (docs/FIDELITY.md); ``training.schedule: per-epoch``
trains with `reference_lr_per_epoch` through `PerEpochSchedule`. The fidelity fixtures' ``schedule.*`` arrays hold
the reference's rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# How `fold.run_fold` schedules the learning rate (`TrainingConfig.schedule`): "per-step", MONAI's
# WarmupCosineSchedule stepped after every batch (msx's); "per-epoch", the reference's rates stepped after every epoch.
SCHEDULES = ("per-step", "per-epoch")

# The reference's warm-up: a tenth of the epochs (a float: 24 epochs warm up for 2.4).
REFERENCE_WARMUP_FRACTION = 0.1


def reference_lr_per_epoch(
    epochs: int,
    base_lr: float,
    warmup_epochs: float | None = None,
    warmup_start_lr: float = 0.0,
    eta_min: float = 0.0,
) -> list[float]:
    """The learning rate in force during each of ``epochs`` epochs (index 0 = the first epoch) under the
    reference's ``LinearWarmupCosineAnnealingLR(warmup_epochs, max_epochs=epochs, warmup_start_lr, eta_min)``,
    stepped once after every epoch. ``warmup_epochs`` defaults to the reference's ``epochs / 10``.

    The recursion is the scheduler's own, in Python floats, so the values agree with it to rounding.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    warmup = REFERENCE_WARMUP_FRACTION * epochs if warmup_epochs is None else float(warmup_epochs)
    if not 0 <= warmup < epochs:
        raise ValueError(f"warmup_epochs must be in [0, {epochs}), got {warmup}")
    cosine_epochs = epochs - warmup
    rates = [warmup_start_lr]
    for epoch in range(1, epochs):
        previous = rates[-1]
        if epoch < warmup:
            rate = previous + (base_lr - warmup_start_lr) / (warmup - 1)
        elif epoch == warmup:
            rate = base_lr
        elif (epoch - 1 - epochs) % (2 * cosine_epochs) == 0:
            rate = previous + (base_lr - eta_min) * (1 - math.cos(math.pi / cosine_epochs)) / 2
        else:
            rate = (1 + math.cos(math.pi * (epoch - warmup) / cosine_epochs)) / (
                1 + math.cos(math.pi * (epoch - warmup - 1) / cosine_epochs)
            ) * (previous - eta_min) + eta_min
        rates.append(rate)
    return rates


class PerEpochSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A learning-rate scheduler that sets the rate of every parameter group to ``rates[e]`` during epoch ``e``
    (0-based; the last rate holds after the list ends), stepped once after each epoch. ``rates`` are set as they
    are, not multiplied into the base rate, so training runs at exactly `reference_lr_per_epoch`'s values. Its
    state dict (the epochs stepped and the rates) resumes it."""

    def __init__(self, optimizer: torch.optim.Optimizer, rates: Sequence[float]) -> None:
        if not rates:
            raise ValueError("a per-epoch schedule needs at least one rate")
        self.rates = [float(rate) for rate in rates]
        super().__init__(optimizer)

    def rate_of_epoch(self, epoch: int) -> float:
        """The rate epoch ``epoch`` trains at, counting the epochs from 1 as `fold.run_fold` does."""
        return self.rates[min(max(epoch - 1, 0), len(self.rates) - 1)]

    def get_lr(self) -> list[float]:
        rate = self.rates[min(self.last_epoch, len(self.rates) - 1)]
        return [rate for _ in self.optimizer.param_groups]


def reference_schedule(optimizer: torch.optim.Optimizer, epochs: int, warmup_fraction: float) -> PerEpochSchedule:
    """The reference's schedule over ``epochs`` epochs from the optimizer's rate (its first group's ``lr``), warm-up
    over ``warmup_fraction`` of the epochs (the reference's: `REFERENCE_WARMUP_FRACTION`), from rate 0."""
    base_lr = optimizer.param_groups[0]["lr"]
    return PerEpochSchedule(optimizer, reference_lr_per_epoch(epochs, base_lr, warmup_fraction * epochs))
