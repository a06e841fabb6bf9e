"""The reference's learning-rate schedule, per epoch, as a pure function.

The MSSegDiff reference trains with ``LinearWarmupCosineAnnealingLR`` (Lightning Bolts' scheduler, copied into
its trainer) with ``warmup_epochs = max_epochs / 10``, ``warmup_start_lr = 0`` and ``eta_min = 0``, stepped once
per epoch. The scheduler is built before the first epoch, so epoch 0 trains at ``warmup_start_lr`` (0): the first
epoch leaves the weights where they are, except for what weight decay and batch-norm statistics do. Each later
epoch's rate is computed from the previous one (the scheduler's recursive ``get_lr``, not its closed form), which is
what makes a non-integer warm-up overshoot: with 24 epochs (warm-up 2.4) epochs 1 and 2 add ``base_lr / 1.4`` each
and epoch 2 trains at 1.43 * ``base_lr``; with fewer than 10 epochs (warm-up below 1) the rate stays 0 throughout.

msx's training (`fold.run_fold`) steps MONAI's ``WarmupCosineSchedule`` once per batch instead, with no epoch at
rate 0 (docs/FIDELITY.md). `reference_lr_per_epoch` is what the reference trains with; the fidelity fixtures'
``schedule.*`` arrays hold it.
"""

from __future__ import annotations

import math

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
