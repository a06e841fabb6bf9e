"""A real Tune run: the LOSO grid searcher and ASHA on a local Ray, with a cheap trainable."""

import pytest
from ray import tune

from msx.models.data.folds import resolve_folds
from msx.orchestrator.search import MODE, OPTIMISED_METRIC, LosoGridSearcher, build_scheduler
from msx.orchestrator.spec import spec_from_dict

EPOCHS = 4
# A "strong" and a "weak" backbone: ASHA must stop the weak one's trials at its first rung.
QUALITY = {"unet": 0.8, "segresnet": 0.2}


def fake_training(config):
    for epoch in range(1, EPOCHS + 1):
        tune.report({"epoch": epoch, OPTIMISED_METRIC: QUALITY[config["backbone"]] + 0.01 * epoch * config["training.lr"]})


@pytest.mark.timeout(300)
def test_grid_of_folds_with_optuna_and_asha(local_ray, tmp_path):
    spec = spec_from_dict(
        {
            "name": "tune-test",
            "model": {"backbones": ["unet", "segresnet"]},
            "training": {"epochs": EPOCHS},
            "search": {
                "configurations_per_backbone": 1,
                "parameters": [{"name": "training.lr", "low": 0.5, "high": 2.0}],
                "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            },
        }
    )
    folds = resolve_folds("paper", range(1, 6))
    tuner = tune.Tuner(
        tune.with_resources(fake_training, {"cpu": 1}),
        tune_config=tune.TuneConfig(
            metric=OPTIMISED_METRIC,
            mode=MODE,
            search_alg=LosoGridSearcher(spec, folds),
            scheduler=build_scheduler(spec),
            num_samples=2 * len(folds),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(name="grid", storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors
    epochs_reached = {(r.config["backbone"], r.config["fold"]): r.metrics["epoch"] for r in grid}
    assert sorted(epochs_reached) == sorted((b, f.index) for b in QUALITY for f in folds)
    assert all(epochs_reached[("unet", f.index)] == EPOCHS for f in folds)
    stopped = [f.index for f in folds if epochs_reached[("segresnet", f.index)] < EPOCHS]
    assert len(stopped) >= 4, epochs_reached  # early stopping acted on the weak configuration
    # Every fold of one configuration shares its searched values.
    assert len({r.config["training.lr"] for r in grid if r.config["backbone"] == "unet"}) == 1
    assert (tmp_path / "grid").is_dir()
