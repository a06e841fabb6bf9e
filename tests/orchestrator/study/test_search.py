from ray.tune.search import Searcher

from msx.models.data.folds import resolve_folds
from msx.orchestrator.study.configuration_search import ConfigurationSearch
from msx.orchestrator.spec import load_spec, spec_from_dict


def make_spec(configurations=2, parameters=True):
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
    configs = suggest_all(ConfigurationSearch(make_spec(), folds, concurrency=100, echo=lambda _: None))
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
    searcher = ConfigurationSearch(make_spec(configurations=1, parameters=False), resolve_folds("paper", range(1, 6)), 10)
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
