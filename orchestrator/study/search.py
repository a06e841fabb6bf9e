"""Searchers and schedulers behind name-to-factory registries, and the LOSO grid searcher.

A configuration (backbone + searched hyperparameters) is only meaningful scored over all its folds, on
validation patients. `LosoGridSearcher` therefore asks one Optuna study per backbone for a
configuration, expands it into one trial per fold, and tells the study the mean validation score once
every fold has finished. Ray's `Repeater` does the fold expansion but cannot hold a grid dimension, and
`OptunaSearch` refuses grid dimensions outright, hence this small class.
"""

from __future__ import annotations

import math
import pickle
from typing import Any, Callable

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from msx.models.data.folds import Fold

from ..spec import ExperimentSpec, ParameterSpec
from ..trial import BEST_VALIDATION_DICE, EPOCH, TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

OPTIMISED_METRIC = BEST_VALIDATION_DICE
MODE = "max"

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "optuna": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def build_scheduler(spec: ExperimentSpec) -> TrialScheduler:
    scheduler = spec.search.scheduler
    factories: dict[str, Callable[[], TrialScheduler]] = {
        "asha": lambda: AsyncHyperBandScheduler(
            time_attr=EPOCH,
            max_t=spec.training.epochs,
            grace_period=min(scheduler.grace_period, spec.training.epochs),
            reduction_factor=scheduler.reduction_factor,
            # A trial that reaches the last epoch still has its final evaluation to report.
            stop_last_trials=False,
        ),
        "fifo": FIFOScheduler,
    }
    return factories[scheduler.name]()


def optuna_distribution(parameter: ParameterSpec) -> optuna.distributions.BaseDistribution:
    if parameter.distribution == "choice":
        return optuna.distributions.CategoricalDistribution(list(parameter.choices))
    if parameter.distribution == "int":
        return optuna.distributions.IntDistribution(int(parameter.low), int(parameter.high))
    return optuna.distributions.FloatDistribution(
        parameter.low, parameter.high, log=parameter.distribution == "loguniform"
    )


class LosoGridSearcher(Searcher):
    """Backbone grid x searched configurations x leave-one-subject-out folds."""

    def __init__(self, spec: ExperimentSpec, folds: tuple[Fold, ...]) -> None:
        super().__init__(metric=OPTIMISED_METRIC, mode=MODE)
        self._folds = folds
        self._budget = {backbone: spec.search.configurations_per_backbone for backbone in spec.model.backbones}
        self._studies: dict[str, Searcher | None] = {
            backbone: self._study(spec, seed_offset) for seed_offset, backbone in enumerate(spec.model.backbones)
        }
        self._pending: list[TrialConfig] = []
        self._next_backbone = 0
        self._group_of_trial: dict[str, tuple[str, int]] = {}
        self._fold_scores: dict[str, dict[int, float]] = {}
        self._backbone_of_group: dict[str, str] = {}

    @staticmethod
    def _study(spec: ExperimentSpec, seed_offset: int) -> Searcher | None:
        if not spec.search.parameters:
            return None
        space = {p.name: optuna_distribution(p) for p in spec.search.parameters}
        initial = [{p.name: p.initial for p in spec.search.parameters}]
        seed = spec.search.seed + seed_offset
        return OptunaSearch(
            space=space,
            metric=OPTIMISED_METRIC,
            mode=MODE,
            points_to_evaluate=initial if all(p.initial is not None for p in spec.search.parameters) else None,
            sampler=SAMPLERS[spec.search.searcher](seed),
        )

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._pending and not self._open_configuration():
            return Searcher.FINISHED
        trial = self._pending.pop(0)
        self._group_of_trial[trial_id] = (trial.configuration, trial.fold)
        return trial.to_tune()

    def _open_configuration(self) -> bool:
        backbones = [b for b in self._budget if self._budget[b] > 0]
        if not backbones:
            return False
        backbone = backbones[self._next_backbone % len(backbones)]
        self._next_backbone += 1
        self._budget[backbone] -= 1
        group = f"{backbone}-c{len([g for g in self._backbone_of_group.values() if g == backbone]) + 1}"
        study = self._studies[backbone]
        searched = study.suggest(group) if study is not None else {}
        self._backbone_of_group[group] = backbone
        self._fold_scores[group] = {}
        self._pending.extend(TrialConfig(backbone, fold.index, group, searched) for fold in self._folds)
        return True

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._group_of_trial:
            return
        group, fold = self._group_of_trial[trial_id]
        score = (result or {}).get(OPTIMISED_METRIC)
        self._fold_scores[group][fold] = math.nan if score is None else float(score)
        if len(self._fold_scores[group]) == len(self._folds):
            study = self._studies[self._backbone_of_group[group]]
            scores = [s for s in self._fold_scores[group].values() if not math.isnan(s)]
            if study is not None:
                mean = sum(scores) / len(scores) if scores else None
                study.on_trial_complete(group, result=None if mean is None else {OPTIMISED_METRIC: mean}, error=mean is None)

    def save(self, checkpoint_path: str) -> None:
        # Tune checkpoints searcher state into the experiment folder so a restarted driver resumes the search.
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
