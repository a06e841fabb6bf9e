"""The search's vocabulary: what it optimises, and its samplers and pruners behind name-to-factory registries.

How configurations are searched and stopped early is `configuration_search.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from ..spec import ExperimentSpec, ParameterSpec
from ..trial import BEST_VALIDATION_DICE

optuna.logging.set_verbosity(optuna.logging.WARNING)

OPTIMISED_METRIC = BEST_VALIDATION_DICE
MODE = "max"

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "optuna": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}

# Keyed by `search.scheduler.name`. "asha" is Optuna's asynchronous successive halving, fed one value per
# configuration and rung (its folds' mean), not one per fold trial.
PRUNERS: dict[str, Callable[[ExperimentSpec], optuna.pruners.BasePruner]] = {
    "asha": lambda spec: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=spec.search.scheduler.grace_period,
        reduction_factor=spec.search.scheduler.reduction_factor,
        min_early_stopping_rate=0,
    ),
    "fifo": lambda spec: optuna.pruners.NopPruner(),
}


def optuna_distribution(parameter: ParameterSpec) -> optuna.distributions.BaseDistribution:
    if parameter.distribution == "choice":
        return optuna.distributions.CategoricalDistribution(list(parameter.choices))
    if parameter.distribution == "int":
        return optuna.distributions.IntDistribution(int(parameter.low), int(parameter.high))
    return optuna.distributions.FloatDistribution(
        parameter.low, parameter.high, log=parameter.distribution == "loguniform"
    )


def rung_epochs(spec: ExperimentSpec) -> tuple[int, ...]:
    """The epochs at which a configuration's folds are judged together, before the last epoch.

    Successive halving's rungs are grace_period x reduction_factor^k epochs; a fold's validation score
    exists only on validation epochs (every `validate_every`), so each rung is taken at the first validation
    epoch at or after it. None with the fifo scheduler.
    """
    scheduler, training = spec.search.scheduler, spec.training
    if scheduler.name != "asha":
        return ()
    rungs, milestone = set(), scheduler.grace_period
    while milestone < training.epochs:
        epoch = -(-milestone // training.validate_every) * training.validate_every
        if epoch < training.epochs:
            rungs.add(epoch)
        milestone *= scheduler.reduction_factor
    return tuple(sorted(rungs))
