"""Early stopping by configuration, driven as Tune drives it (suggest, reports, completions), without Ray.

The Tune study in test_configuration_study.py checks the same rules with real trials; here each rule is
one short sequence of events.
"""

import math
import time

import pytest
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from msx.models.data.folds import resolve_folds
from msx.orchestrator.spec import load_spec, spec_from_dict
from msx.orchestrator.study import configuration_search, interruption
from msx.orchestrator.study.configuration_search import (
    ConfigurationScheduler,
    ConfigurationSearch,
)
from msx.orchestrator.study.search import rung_epochs
from msx.orchestrator.study.search_record import read_summary

CONTINUE, PAUSE, STOP = TrialScheduler.CONTINUE, TrialScheduler.PAUSE, TrialScheduler.STOP
FOLDS = resolve_folds("loso", (1, 2, 3))


def make_spec(configurations=3, epochs=6, **search):
    return spec_from_dict(
        {
            "name": "t",
            "model": {"backbones": ["unet"]},
            "training": {"epochs": epochs, "validate_every": 1},
            "search": {
                "configurations_per_backbone": configurations,
                "parameters": [{"name": "training.lr", "low": 1e-4, "high": 1e-2, "initial": 1e-3}],
                "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
                **search,
            },
        }
    )


class Driver:
    """Tune's side of the conversation: trial ids, reports and completions."""

    def __init__(self, search: ConfigurationSearch) -> None:
        self.search = search
        self.configs: dict[str, dict] = {}

    def suggest(self):
        trial_id = f"t{len(self.configs)}"
        config = self.search.suggest(trial_id)
        if isinstance(config, dict):
            self.configs[trial_id] = config
            return trial_id
        return config

    def trial(self, configuration: str, fold: int) -> str:
        return next(t for t, c in self.configs.items() if (c["configuration"], c["fold"]) == (configuration, fold))

    def report(self, trial_id: str, epoch: int, score: float) -> str:
        return self.search.on_report(trial_id, {"epoch": epoch, "val_dice": score})

    def finish(self, trial_id: str, score: float) -> None:
        self.search.on_trial_complete(trial_id, {"epoch": 6, "val_dice": score, "final": 1})


def test_rungs_are_validation_epochs_before_the_last():
    assert rung_epochs(load_spec("hpo")) == (30, 90, 270)
    assert rung_epochs(make_spec()) == (2, 4)
    # A rung is taken at the first validation at or after it.
    assert rung_epochs(make_spec(epochs=20).with_overrides({"training.validate_every": 3})) == (3, 6, 9, 18)
    assert rung_epochs(make_spec(scheduler={"name": "fifo"})) == ()
    assert rung_epochs(load_spec("smoke")) == ()  # its grace period is its last epoch


def test_folds_wait_at_the_rung_with_their_workers_freed_then_the_configuration_is_judged_whole(tmp_path):
    search = ConfigurationSearch(make_spec(), FOLDS, concurrency=2, snapshot=tmp_path / "s.json", echo=lambda _: None)
    tune = Driver(search)
    first, second = tune.suggest(), tune.suggest()
    assert tune.suggest() is None  # two trials hold the two slots
    assert [tune.configs[t]["fold"] for t in (first, second)] == [1, 2]
    assert tune.configs[first]["training.lr"] == 1e-3  # the spec's initial point first
    assert tune.report(first, 1, 0.1) == CONTINUE
    assert tune.report(first, 2, 0.5) == PAUSE  # at the rung before its configuration's other folds
    third = tune.suggest()  # the paused fold's slot goes to the configuration's last fold
    assert tune.configs[third] == {**tune.configs[first], "fold": 3}
    assert tune.report(second, 2, 0.4) == PAUSE
    assert search.ready_trials() == []
    assert tune.report(third, 2, 0.6) == CONTINUE  # the last fold there: the first configuration goes on
    assert search.ready_trials() == [first, second]
    assert tune.suggest() is None  # paused folds of a promoted configuration come before new ones
    summary = read_summary(tmp_path / "s.json")
    (configuration,) = summary.configurations
    assert configuration.rung_means == {2: pytest.approx(0.5)} and configuration.status == "running"
    assert configuration.folds_waiting == 2


def test_a_weaker_configuration_is_pruned_whole_and_optuna_records_pruned_and_complete():
    search = ConfigurationSearch(make_spec(configurations=2), FOLDS, concurrency=3, echo=lambda _: None)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    for trial_id, score in zip(c1, (0.5, 0.6, 0.7), strict=True):
        tune.report(trial_id, 2, score)
    search.resumed(c1[0]), search.resumed(c1[1])
    # c1's folds train on; c2 opens when a slot frees (one c1 fold finished).
    for trial_id in c1:
        assert tune.report(trial_id, 3, 0.7) == CONTINUE
        assert tune.report(trial_id, 4, 0.7) in (PAUSE, CONTINUE)
    for trial_id in c1[:2]:
        search.resumed(trial_id)
    for trial_id, score in zip(c1, (0.8, 0.9, 1.0), strict=True):
        tune.finish(trial_id, score)
    c2 = [tune.suggest() for _ in FOLDS]
    assert {tune.configs[t]["configuration"] for t in c2} == {"unet-c2"}
    assert tune.report(c2[0], 2, 0.1) == PAUSE
    assert tune.report(c2[1], 2, 0.1) == PAUSE
    assert tune.report(c2[2], 2, 0.1) == STOP  # mean 0.1 against 0.6 at the rung: pruned, all folds
    assert search.ended_trials() == set(c2)  # the paused ones are stopped by the scheduler
    assert tune.report(c2[0], 3, 0.1) == STOP  # a late report of a pruned configuration stops it too
    study = search.studies["unet"]
    states = {t.number: (t.state, t.value) for t in study.trials}
    assert states[0] == (TrialState.COMPLETE, pytest.approx(0.9))  # the mean of the folds' final scores
    assert states[1][0] == TrialState.PRUNED
    assert study.trials[1].intermediate_values == {2: pytest.approx(0.1)}
    assert search.summary().finished


def test_save_and_restore_keep_the_decisions_and_the_waiting_folds(tmp_path):
    search = ConfigurationSearch(make_spec(configurations=2), FOLDS, concurrency=4, echo=lambda _: None)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    tune.report(c1[0], 2, 0.5)
    search.save(str(tmp_path / "searcher.pkl"))
    restored = ConfigurationSearch(make_spec(configurations=2), FOLDS, concurrency=4, echo=lambda _: None)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.restored and restored.suggest("x") is None  # until the scheduler re-pauses the waiting folds
    restored.restored = False
    assert restored.phase_of(c1[0]) == "waiting" and restored.phase_of(c1[1]) == "queued"
    assert restored.on_report(c1[1], {"epoch": 2, "val_dice": 0.5}) == PAUSE
    assert restored.on_report(c1[2], {"epoch": 2, "val_dice": 0.5}) == CONTINUE
    assert restored.studies["unet"].trials[0].intermediate_values == {2: 0.5}


def test_a_failed_fold_ends_its_configuration():
    search = ConfigurationSearch(make_spec(configurations=2), FOLDS, concurrency=3, echo=lambda _: None)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    tune.report(c1[0], 2, 0.5)
    search.on_trial_complete(c1[1], error=True)
    assert search.ended_trials() == {c1[0], c1[2]}
    assert search.studies["unet"].trials[0].state == TrialState.FAIL
    assert tune.suggest() is not None  # the next configuration opens


def test_the_last_configuration_that_can_finish_is_not_pruned():
    search = ConfigurationSearch(make_spec(configurations=2), FOLDS, concurrency=3, echo=lambda _: None)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    for trial_id in c1:
        tune.report(trial_id, 2, 0.9)
    search.on_trial_complete(c1[0], error=True)  # c1 fails after passing its rung
    c2 = [tune.suggest() for _ in FOLDS]
    decisions = [tune.report(trial_id, 2, 0.1) for trial_id in c2]
    assert decisions == [PAUSE, PAUSE, CONTINUE]  # Optuna's pruner says stop; nothing else could finish
    assert search.summary().configurations[1].protected


def test_the_time_budget_stops_the_search_but_one_configuration_finishes():
    search = ConfigurationSearch(
        make_spec(configurations=3, time_budget_s=3600), FOLDS, concurrency=6, echo=lambda _: None
    )
    tune = Driver(search)
    trials = [tune.suggest() for _ in range(6)]
    c1, c2 = trials[:3], trials[3:]
    for trial_id in c1:
        tune.report(trial_id, 2, 0.5)
    tune.report(c2[0], 2, 0.9)
    search._elapsed_before_s = 3600  # the budget is spent
    search.check_budget()
    assert search.summary().cut_short
    assert search.ended_trials() == set(c2)  # c1 passed a rung, c2 did not: c1 is kept
    assert tune.suggest() is Searcher.FINISHED or tune.suggest() is None
    for trial_id in c1:
        assert tune.report(trial_id, 4, 0.6) == CONTINUE  # no more waiting at rungs
        tune.finish(trial_id, 0.6)
    assert tune.suggest() == Searcher.FINISHED
    summary = search.summary()
    assert summary.finished and [c.status for c in summary.configurations] == ["complete", "cut short"]
    assert any("cut short" in line for line in summary.lines())


def test_the_summary_counts_the_epochs_saved_against_the_full_grid():
    search = ConfigurationSearch(make_spec(configurations=2), FOLDS, concurrency=6, echo=lambda _: None)
    tune = Driver(search)
    trials = [tune.suggest() for _ in range(6)]
    for trial_id in trials[:3]:
        tune.report(trial_id, 2, 0.8)
    for trial_id in trials[3:]:
        tune.report(trial_id, 2, 0.1)
    for trial_id in trials[:3]:
        search.resumed(trial_id) if search.phase_of(trial_id) == "ready" else None
        tune.finish(trial_id, 0.8)
    summary = search.summary()
    assert summary.epochs_full_grid == 2 * 3 * 6
    assert summary.epochs_trained == 3 * 6 + 3 * 2
    assert "early stopping: 24 of 36 fold-epochs trained, 12 saved (33%)" in "\n".join(summary.lines())
    assert math.isclose(summary.configurations[0].final_score, 0.8)
    assert summary.configurations[1].describe() == "pruned at epoch 2, mean validation Dice 0.1000"
    assert summary.configurations[1].decided_at <= time.time()


def test_a_resumed_fold_replays_its_rung_report_and_is_judged_at_that_rung_once():
    search = ConfigurationSearch(make_spec(), FOLDS, concurrency=3, echo=lambda _: None)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    assert [tune.report(t, 2, s) for t, s in zip(c1, (0.5, 0.6, 0.7), strict=True)] == [PAUSE, PAUSE, CONTINUE]
    search.resumed(c1[0])
    # The resumed fold's run starts from its epoch-2 checkpoint and reports that epoch again first.
    assert search.on_report(c1[0], {"epoch": 2, "val_dice": 0.5, "replayed": 1}) == CONTINUE
    assert search.summary().configurations[0].rung_means == {2: pytest.approx(0.6)}
    # A fold whose rung report never arrived (the study was interrupted while it was on its way) is judged on the
    # replay, at the rung: it pauses there until the others get there.
    fresh = ConfigurationSearch(make_spec(), FOLDS, concurrency=3, echo=lambda _: None)
    again = Driver(fresh)
    c1 = [again.suggest() for _ in FOLDS]
    assert fresh.on_report(c1[0], {"epoch": 2, "val_dice": 0.5, "replayed": 1}) == PAUSE
    assert fresh.phase_of(c1[0]) == "waiting"


def test_folds_waiting_for_a_fold_that_ended_without_its_rung_score_are_a_stall_named_in_full():
    search = ConfigurationSearch(make_spec(), FOLDS, concurrency=3, echo=lambda _: None)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    for trial_id in c1:
        tune.report(trial_id, 2, 0.5)
    for trial_id in c1[1:]:
        search.resumed(trial_id) if search.phase_of(trial_id) == "ready" else None
    search.resumed(c1[0])
    assert tune.report(c1[1], 4, 0.6) == PAUSE and tune.report(c1[2], 4, 0.6) == PAUSE
    assert search.stall() is None  # fold 1 is still on its way to epoch 4
    # Fold 1 ends without a score at epoch 4 (what a fold that trained past its rung unreported looked like).
    search.on_trial_complete(c1[0], {"epoch": 6, "val_dice": 0.7, "final": 1})
    assert search.stall() == (
        "unet-c1: fold(s) 2, 3 wait at the epoch-4 rung for fold(s) 1 (done at epoch 6), "
        "which ended without a score there"
    )
    assert search.waiting_folds() == ["unet-c1 fold 2", "unet-c1 fold 3"]


class Controller:
    """The part of Tune's controller the scheduler uses: its trials, its searcher, stopping a trial."""

    def __init__(self, search: ConfigurationSearch, statuses: dict[str, str]) -> None:
        self.search_alg = search
        self.trials = [Trial("msx", config={}, trial_id=trial_id, stub=True) for trial_id in statuses]
        for trial in self.trials:
            trial.set_status(statuses[trial.trial_id])

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        trial.set_status(Trial.TERMINATED)


def test_a_stalled_search_ends_the_study_resumable_naming_its_configuration_and_folds():
    lines = []
    search = ConfigurationSearch(make_spec(configurations=1), FOLDS, concurrency=3, echo=lines.append)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    for trial_id in c1:
        tune.report(trial_id, 2, 0.5)
    for trial_id in c1:
        search.resumed(trial_id) if search.phase_of(trial_id) == "ready" else None
    tune.report(c1[1], 4, 0.6), tune.report(c1[2], 4, 0.6)
    search.on_trial_complete(c1[0], {"epoch": 6, "val_dice": 0.7, "final": 1})
    controller = Controller(search, {c1[0]: Trial.TERMINATED, c1[1]: Trial.PAUSED, c1[2]: Trial.PAUSED})
    interruption.reset()
    try:
        assert ConfigurationScheduler().choose_trial_to_run(controller) is None
        assert interruption.INTERRUPTED.is_set()
        assert interruption.stop_reason().startswith("stalled: unet-c1: fold(s) 2, 3 wait at the epoch-4 rung")
        assert lines[-1].startswith("STALLED: unet-c1: fold(s) 2, 3 wait at the epoch-4 rung for fold(s) 1 (done")
    finally:
        interruption.reset()


def test_paused_folds_with_nothing_to_run_are_a_stall_only_after_a_grace_period(monkeypatch):
    search = ConfigurationSearch(make_spec(configurations=1), FOLDS, concurrency=3, echo=lambda _: None)
    tune = Driver(search)
    c1 = [tune.suggest() for _ in FOLDS]
    tune.report(c1[0], 2, 0.5)
    # Fold 1 waits; folds 2 and 3 are gone from Tune although the search still counts them (what no code path
    # should ever leave, and the scheduler must not wait on for ever).
    controller = Controller(search, {c1[0]: Trial.PAUSED, c1[1]: Trial.TERMINATED, c1[2]: Trial.TERMINATED})
    search._configurations["unet-c1"].folds[2].phase = "queued"
    search._configurations["unet-c1"].folds[3].phase = "queued"
    scheduler = ConfigurationScheduler()
    clock = [1000.0]
    monkeypatch.setattr(configuration_search.time, "monotonic", lambda: clock[0])
    interruption.reset()
    try:
        scheduler.choose_trial_to_run(controller)
        clock[0] += configuration_search.STALL_GRACE_S - 1
        scheduler.choose_trial_to_run(controller)
        assert not interruption.INTERRUPTED.is_set()  # trials may be between an end and the next start
        clock[0] += 2
        scheduler.choose_trial_to_run(controller)
        assert interruption.stop_reason() == "stalled: paused folds (unet-c1 fold 1) and nothing to run"
    finally:
        interruption.reset()


def test_each_backbone_is_judged_at_its_own_recipes_rungs_and_counted_to_its_own_last_epoch():
    raw = make_spec(configurations=1).to_dict()
    raw["model"]["backbones"] = ["unet", "segresnet"]
    raw["recipes"] = {"segresnet": {"training": {"epochs": 12}}}
    spec = spec_from_dict(raw)
    search = ConfigurationSearch(spec, FOLDS, concurrency=6, echo=lambda _: None)
    tune = Driver(search)
    trials = [tune.suggest() for _ in range(6)]
    unet = [t for t in trials if tune.configs[t]["backbone"] == "unet"]
    segresnet = [t for t in trials if tune.configs[t]["backbone"] == "segresnet"]
    # unet's rungs are 2 and 4 (6 epochs); segresnet's 2, 4 and 8 (12 epochs): its folds wait at epoch 8.
    for trial_id in segresnet[:2]:
        assert tune.report(trial_id, 2, 0.5) == PAUSE
    assert tune.report(segresnet[2], 2, 0.5) == CONTINUE
    for trial_id in segresnet:
        search.resumed(trial_id) if search.phase_of(trial_id) == "ready" else None
    for trial_id in segresnet[:2]:
        assert tune.report(trial_id, 4, 0.5) == PAUSE
    assert tune.report(segresnet[2], 4, 0.5) == CONTINUE
    for trial_id in segresnet:
        search.resumed(trial_id) if search.phase_of(trial_id) == "ready" else None
    assert tune.report(segresnet[0], 8, 0.5) == PAUSE
    for rung in (2, 4):
        for trial_id in unet:
            tune.report(trial_id, rung, 0.5)
        for trial_id in unet:
            search.resumed(trial_id) if search.phase_of(trial_id) == "ready" else None
    assert tune.report(unet[0], 6, 0.5) == CONTINUE  # past its last rung, 4
    summary = search.summary()
    assert summary.epochs == {"unet": 6, "segresnet": 12}
    assert summary.rungs == {"unet": (2, 4), "segresnet": (2, 4, 8)}
    assert summary.epochs_full_grid == 3 * 6 + 3 * 12
    lines = "\n".join(summary.lines())
    assert "rungs at epochs 2, 4 (unet); 2, 4, 8 (segresnet)" in lines
    assert "to epoch 6 (unet), 12 (segresnet)" in lines


def suggestion_spec(configurations=2, parameters=True):
    search = {"configurations_per_backbone": configurations, "scheduler": {"name": "fifo"}}
    if parameters:
        search["parameters"] = [{"name": "training.lr", "low": 1e-4, "high": 1e-2, "initial": 1e-3}]
    return spec_from_dict({"name": "t", "model": {"backbones": ["unet", "segresnet"]}, "search": search})


def suggest_all(searcher: ConfigurationSearch) -> list[dict]:
    configs = []
    while True:
        config = searcher.suggest(f"t{len(configs)}")
        if config == Searcher.FINISHED:
            return configs
        configs.append(config)


def test_every_configuration_is_expanded_over_all_folds_and_backbones():
    folds = resolve_folds("paper", range(1, 6))
    configs = suggest_all(ConfigurationSearch(suggestion_spec(), folds, concurrency=100, echo=lambda _: None))
    assert len(configs) == 2 * 2 * len(folds)
    by_configuration = {}
    for config in configs:
        by_configuration.setdefault(config["configuration"], []).append(config)
    assert len(by_configuration) == 4
    for group in by_configuration.values():
        assert sorted(c["fold"] for c in group) == [f.index for f in folds]
        assert len({c["backbone"] for c in group}) == 1
        assert len({c["training.lr"] for c in group}) == 1  # one configuration, all folds
    assert {c["backbone"] for c in configs} == {"unet", "segresnet"}
    # The initial point is evaluated first for each backbone's study.
    assert configs[0]["training.lr"] == 1e-3


def test_without_searched_parameters_the_grid_still_runs():
    searcher = ConfigurationSearch(
        suggestion_spec(configurations=1, parameters=False), resolve_folds("paper", range(1, 6)), 10
    )
    config = searcher.suggest("t0")
    assert set(config) == {"backbone", "fold", "configuration"}


def test_the_hpo_space_suggests_valid_specs_within_its_ranges():
    spec = load_spec("hpo")
    folds = resolve_folds(spec.data.folds, range(1, 6))
    searcher = ConfigurationSearch(spec, folds, concurrency=100, echo=lambda _: None)
    parameters = {p.name: p for p in spec.search.parameters}
    configs = [searcher.suggest(f"t{index}") for index in range(3 * len(folds))]
    # Each configuration's folds come together; the backbone's first configuration is the spec's initial point.
    assert configs[0]["training.lr"] == parameters["training.lr"].initial
    for config in configs:
        searched = {name: config[name] for name in parameters}
        for name, value in searched.items():
            parameter = parameters[name]
            if parameter.distribution == "choice":
                assert value in parameter.choices
            else:
                assert parameter.low <= value <= parameter.high
        trial_spec = spec.with_overrides(searched)
        assert trial_spec.inference.ddim_steps in (5, 10, 20) and isinstance(trial_spec.inference.ddim_steps, int)
        assert 0.0 <= trial_spec.training.lesion_patch_fraction <= 0.67
