"""The uncertainty measures over a sampler's chains, against their definitions computed independently (numpy)."""

import numpy as np
import pytest
import torch

from msx.models.registry import UnknownNameError
from msx.models.uncertainty import (
    UNCERTAINTY_MEASURES,
    chain_statistics,
    lesion_maps,
    pooled_statistics,
    uncertainty_maps as maps_of_statistics,
)
from tests.helpers import as_numpy


def uncertainty_maps(step_logits: torch.Tensor, names) -> dict[str, torch.Tensor]:
    statistics = chain_statistics(step_logits)
    return {name: UNCERTAINTY_MEASURES.get(name)(statistics) for name in names}


def entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-300, 1.0)
    q = np.clip(1.0 - p, 1e-300, 1.0)
    return -(p * np.log2(p) + q * np.log2(q))


def step_logits(steps=3, samples=4, shape=(5, 6, 7), seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 3, size=(steps, samples, *shape))).float()


def test_the_measures_are_the_shifts_definitions_over_the_chains_last_step():
    logits = step_logits()
    final = 1 / (1 + np.exp(-logits[-1].double().numpy()))  # (samples, *spatial)
    total = entropy_bits(final.mean(axis=0))
    data = entropy_bits(final).mean(axis=0)
    every_step = 1 / (1 + np.exp(-logits.double().numpy()))
    maps = {
        name: value.double().numpy() for name, value in uncertainty_maps(logits, UNCERTAINTY_MEASURES.names()).items()
    }
    np.testing.assert_allclose(maps["total"], total, atol=1e-5)
    np.testing.assert_allclose(maps["data"], data, atol=1e-5)
    np.testing.assert_allclose(maps["knowledge"], total - data, atol=1e-5)
    np.testing.assert_allclose(maps["steps"], entropy_bits(every_step.mean(axis=(0, 1))), atol=1e-5)
    for name, value in maps.items():
        assert value.shape == (5, 6, 7) and value.min() >= 0 and value.max() <= 1 + 1e-6, name


def test_one_chain_has_no_knowledge_uncertainty_and_agreeing_chains_none_either():
    one_chain = step_logits(samples=1)
    maps = uncertainty_maps(one_chain, ("total", "data", "knowledge"))
    assert torch.equal(maps["knowledge"], torch.zeros_like(maps["knowledge"]))
    torch.testing.assert_close(maps["total"], maps["data"])
    agreeing = step_logits(samples=1).repeat(1, 3, 1, 1, 1)
    assert float(uncertainty_maps(agreeing, ("knowledge",))["knowledge"].max()) < 1e-5


def test_an_unknown_measure_lists_the_valid_names_and_a_bad_shape_is_named():
    with pytest.raises(
        UnknownNameError, match="unknown uncertainty measure 'entropy'; valid names: data, knowledge, steps, total"
    ):
        uncertainty_maps(step_logits(), ("entropy",))
    with pytest.raises(ValueError, match=r"step_logits must have shape \(steps, samples, \*spatial\)"):
        uncertainty_maps(torch.zeros(0, 2, 3), ("total",))


def test_the_fold_models_chains_pool_into_one_ensemble():
    """Statistics averaged over ensembles of as many chains each give the measures of all their chains together."""
    folds = [step_logits(seed=seed) for seed in range(3)]
    pooled = pooled_statistics([as_numpy(chain_statistics(logits)) for logits in folds])
    together = torch.cat(folds, dim=1)  # every fold's chains side by side: (steps, 3 * samples, *spatial)
    expected = uncertainty_maps(together, UNCERTAINTY_MEASURES.names())
    for name, value in maps_of_statistics(pooled).items():
        np.testing.assert_allclose(value, expected[name].numpy(), atol=1e-5, err_msg=name)
    assert float(maps_of_statistics(pooled, ["knowledge"])["knowledge"].max()) > 0.1  # the folds disagree
    with pytest.raises(ValueError, match="no ensemble to pool"):
        pooled_statistics([])


def test_lesion_maps_hold_the_probability_and_every_measure_as_float32():
    logits = step_logits()
    maps = lesion_maps(as_numpy(chain_statistics(logits)))
    assert sorted(maps.uncertainty) == sorted(UNCERTAINTY_MEASURES.names())
    np.testing.assert_allclose(maps.probability, torch.sigmoid(logits).mean(dim=(0, 1)).numpy(), atol=1e-6)
    for name, value in (("probability", maps.probability), *maps.uncertainty.items()):
        assert value.dtype == np.float32 and value.shape == (5, 6, 7), name
