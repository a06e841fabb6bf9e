import math

from msx.orchestrator.results import (
    TrialOutcome,
    best_per_backbone,
    results_table,
    select_best,
    summarise_configurations,
)
from msx.orchestrator.trial import TrialConfig

STRATEGIES = ("mean", "last")


def outcome(configuration, fold, val_mean, test_mean, backbone="unet"):
    metrics = {}
    for split, value in (("val", val_mean), ("test", test_mean)):
        for strategy, offset in (("mean", 0.0), ("last", -0.1)):
            metrics[f"{split}/{strategy}/dsc"] = value + offset
            metrics[f"{split}/{strategy}/lfpr"] = 0.2
    return TrialOutcome(
        TrialConfig(backbone, fold, configuration, {"training.lr": 1e-3}), metrics, f"/ckpt/{configuration}/{fold}"
    )


def test_summary_is_mean_and_population_std_over_folds():
    outcomes = [outcome("a", f, v, 0.5) for f, v in zip((1, 2, 3), (0.6, 0.7, 0.8), strict=True)]
    (summary,) = summarise_configurations(outcomes, STRATEGIES, fold_count=3)
    mean, std = summary.summary[("val", "mean", "dsc")]
    assert math.isclose(mean, 0.7) and math.isclose(std, math.sqrt(((0.1**2) * 2) / 3))
    assert math.isnan(summary.summary[("val", "mean", "assd")][0])  # not reported -> n/a


def test_incomplete_configurations_are_left_out():
    outcomes = [outcome("a", 1, 0.9, 0.9), outcome("b", 1, 0.5, 0.5), outcome("b", 2, 0.5, 0.5)]
    assert [c.configuration for c in summarise_configurations(outcomes, STRATEGIES, fold_count=2)] == ["b"]


def test_selection_uses_validation_never_test():
    # "a" is better on validation, "b" much better on test: validation must win.
    outcomes = [outcome("a", f, 0.8, 0.1) for f in (1, 2)] + [
        outcome("b", f, 0.6, 0.95, backbone="segresnet") for f in (1, 2)
    ]
    configurations = summarise_configurations(outcomes, STRATEGIES, fold_count=2)
    selection = select_best(configurations, STRATEGIES, "dsc")
    assert selection.configuration.configuration == "a"
    assert selection.strategy == "mean"
    assert math.isclose(selection.validation_score, 0.8)
    # Lower is better for LFPR: both equal, so any; but the direction must not crash.
    assert select_best(configurations, STRATEGIES, "lfpr") is not None


def test_table_marks_best_per_column_and_lists_each_backbone_once():
    outcomes = [outcome("a", 1, 0.8, 0.4)] + [outcome("b", 1, 0.6, 0.7, backbone="segresnet")]
    configurations = summarise_configurations(outcomes, STRATEGIES, fold_count=1)
    table = results_table(best_per_backbone(configurations, STRATEGIES, "dsc"), STRATEGIES)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["backbone", "strategy", "DSC", "TPR"]
    assert len(lines) == 2 + 2 * len(STRATEGIES)
    segresnet_mean = next(line for line in lines if line.startswith("segresnet") and " mean " in line)
    assert "0.700 ± 0.000*" in segresnet_mean
    assert "n/a" in segresnet_mean  # metrics not reported stay visible as n/a
