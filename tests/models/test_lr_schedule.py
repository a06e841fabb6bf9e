"""The reference's per-epoch learning-rate schedule (its LinearWarmupCosineAnnealingLR, stepped once per epoch).

The training fixtures' `schedule.*` arrays hold the reference's own values (test_fidelity.py checks them to 1e-9
relative); these pin the rule's corners."""

from __future__ import annotations

import math

import pytest

from msx.models.lr_schedule import reference_lr_per_epoch


def test_epoch_0_trains_at_0_then_a_tenth_of_the_epochs_warms_up_and_a_cosine_decays():
    rates = reference_lr_per_epoch(500, 1e-4)
    assert len(rates) == 500 and rates[0] == 0.0
    assert rates[1] == pytest.approx(1e-4 / 49, rel=1e-12) and rates[49] == pytest.approx(1e-4, rel=1e-12)
    assert rates[50] == 1e-4  # the warm-up's end: base lr, exactly
    for epoch in (51, 200, 499):  # the recursion follows the closed-form cosine when the warm-up is whole
        closed = 0.5 * 1e-4 * (1 + math.cos(math.pi * (epoch - 50) / 450))
        assert rates[epoch] == pytest.approx(closed, rel=1e-9)
    assert all(later < earlier for earlier, later in zip(rates[50:], rates[51:], strict=False))


def test_a_non_integer_warm_up_overshoots_as_the_reference_does():
    rates = reference_lr_per_epoch(24, 1e-4)  # warm-up 2.4: two steps of base / 1.4
    assert rates[:3] == pytest.approx([0.0, 1e-4 / 1.4, 2e-4 / 1.4], rel=1e-12)
    assert rates[3] == pytest.approx(1.42706054e-4, rel=1e-8) and max(rates) == rates[2]


def test_fewer_than_ten_epochs_never_leave_lr_0():
    assert reference_lr_per_epoch(8, 1e-4) == [0.0] * 8
    assert reference_lr_per_epoch(10, 1e-4)[:2] == [0.0, 1e-4]  # warm-up 1: base lr from epoch 1


def test_explicit_settings_and_bad_ones():
    rates = reference_lr_per_epoch(20, 1.0, warmup_epochs=5, warmup_start_lr=0.2, eta_min=0.1)
    assert rates[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert rates[-1] > 0.1
    for bad in (
        dict(epochs=0, base_lr=1.0),
        dict(epochs=5, base_lr=-1.0),
        dict(epochs=5, base_lr=1.0, warmup_epochs=5),
    ):
        with pytest.raises(ValueError):
            reference_lr_per_epoch(**bad)


@pytest.mark.filterwarnings(
    "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`"
)  # no training here
def test_the_per_epoch_schedule_trains_each_epoch_at_the_reference_rate_and_resumes_from_its_state():
    import torch

    from msx.models.lr_schedule import reference_schedule

    def optimizer():
        return torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-4)

    expected = reference_lr_per_epoch(24, 1e-4)
    first = optimizer()
    schedule = reference_schedule(first, 24, 0.1)
    seen = []
    for epoch in range(1, 25):
        seen.append(first.param_groups[0]["lr"])  # the rate this epoch trains at
        assert schedule.rate_of_epoch(epoch) == seen[-1]
        schedule.step()
        if epoch == 10:
            state = schedule.state_dict()
    assert seen == expected  # exactly: the rates are set, not multiplied into the base rate
    resumed_optimizer = optimizer()
    resumed = reference_schedule(resumed_optimizer, 24, 0.1)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == [expected[10]] and resumed.rate_of_epoch(11) == expected[10]
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == expected[11]
