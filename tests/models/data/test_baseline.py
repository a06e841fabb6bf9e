import numpy as np
import pytest

from msx.models.data.baseline import flair_threshold_baseline


def _scan(rng: np.random.Generator, lesion_level: float, shape=(12, 12, 12)) -> tuple[np.ndarray, np.ndarray]:
    """A cube of brain (value about 1) with a lesion block at ``lesion_level`` and an empty border."""
    flair = np.zeros(shape, dtype=np.float32)
    flair[1:-1, 1:-1, 1:-1] = rng.normal(1.0, 0.05, size=[s - 2 for s in shape])
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:6, 3:6, 3:6] = 1
    flair[mask.astype(bool)] = lesion_level
    return flair, mask


def test_separable_lesions_are_found_exactly_by_one_threshold():
    rng = np.random.default_rng(0)
    scans = [_scan(rng, 3.0), _scan(rng, 4.0)]
    baseline = flair_threshold_baseline(scans)
    assert baseline.dices == (1.0, 1.0) and baseline.mean_dice == 1.0
    # The threshold lies between the brain's z-scores and the lesions' in both scans.
    for flair, mask in scans:
        brain = flair[flair != 0]
        z = (flair - brain.mean()) / brain.std()
        assert z[(flair != 0) & (mask == 0)].max() < baseline.threshold <= z[mask == 1].min()


def test_a_lesion_as_bright_as_a_confounder_costs_dice():
    rng = np.random.default_rng(1)
    flair, mask = _scan(rng, 3.0)
    flair[7:10, 7:10, 7:10] = 3.0  # a look-alike of the same size and brightness, not in the mask
    baseline = flair_threshold_baseline([(flair, mask)])
    assert baseline.mean_dice == pytest.approx(2 * 27 / (27 + 54))
    assert baseline.best_per_scan == baseline.dices  # one scan: the global threshold is its own best


def test_lesions_outside_the_brain_count_as_missed():
    rng = np.random.default_rng(2)
    flair, mask = _scan(rng, 3.0)
    mask[0, 0, 0] = 1  # in the background, where no threshold on the brain can reach
    assert flair_threshold_baseline([(flair, mask)]).mean_dice == pytest.approx(2 * 27 / (27 + 28))


def test_bad_input_is_named():
    rng = np.random.default_rng(3)
    flair, mask = _scan(rng, 3.0)
    with pytest.raises(ValueError, match="shape"):
        flair_threshold_baseline([(flair, mask[:-1])])
    with pytest.raises(ValueError, match="no non-zero"):
        flair_threshold_baseline([(np.zeros_like(flair), mask)])
    with pytest.raises(ValueError, match="at least one scan"):
        flair_threshold_baseline([])
