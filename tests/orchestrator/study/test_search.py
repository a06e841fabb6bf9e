import math

from ray.tune.search import Searcher

from msx.models.data.folds import resolve_folds
from msx.orchestrator.study.search import LosoGridSearcher
from msx.orchestrator.spec import load_spec, spec_from_dict


def make_spec(configurations=2, parameters=True):
    search = {"configurations_per_backbone": configurations, "scheduler": {"name": "fifo"}}
    if parameters:
        search["parameters"] = [{"name": "training.lr", "low": 1e-4, "high": 1e-2, "initial": 1e-3}]
    return spec_from_dict({"name": "t", "model": {"backbones": ["unet", "segresnet"]}, "search": search})


def test_every_configuration_is_expanded_over_all_folds_and_backbones():
    folds = resolve_folds("paper", range(1, 6))
    searcher = LosoGridSearcher(make_spec(), folds)
    configs = []
    while True:
        config = searcher.suggest(f"t{len(configs)}")
        if config == Searcher.FINISHED:
            break
        configs.append(config)
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


def test_study_is_told_the_mean_validation_score_once_all_folds_finish():
    folds = resolve_folds("paper", range(1, 6))
    searcher = LosoGridSearcher(make_spec(configurations=1), folds)
    trials = {}
    for index in range(len(folds)):
        trials[f"t{index}"] = searcher.suggest(f"t{index}")
    assert all(c["backbone"] == "unet" for c in trials.values())
    study = searcher._studies["unet"]._ot_study
    scores = [0.2, 0.4, 0.6, 0.8, float("nan")]  # a failed fold is left out of the mean
    for (trial_id, config), score in zip(trials.items(), scores):
        assert not [t for t in study.trials if t.state.name == "COMPLETE"]
        searcher.on_trial_complete(trial_id, {"val_dice": score} if not math.isnan(score) else None)
    (completed,) = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert math.isclose(completed.value, 0.5)


def test_without_searched_parameters_the_grid_still_runs():
    searcher = LosoGridSearcher(make_spec(configurations=1, parameters=False), resolve_folds("paper", range(1, 6)))
    config = searcher.suggest("t0")
    assert set(config) == {"backbone", "fold", "configuration"}


def test_the_hpo_space_suggests_valid_specs_within_its_ranges():
    spec = load_spec("hpo")
    folds = resolve_folds(spec.data.folds, range(1, 6))
    searcher = LosoGridSearcher(spec, folds)
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
