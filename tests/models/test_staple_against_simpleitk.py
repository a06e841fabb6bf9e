"""msx's compact STAPLE against SimpleITK's STAPLEImageFilter, the implementation it follows.

Both run the same EM in float64 (SimpleITK's output is a 64-bit float image) with the same start, prior,
stopping rule and iteration cap, so their posteriors differ only by summation order. The stopping rule
is where that could show: a run that stops one iteration earlier than the other moves the posterior by
at most one iteration's change, which the stop at rate changes <= 1e-7 keeps around 1e-7; 1e-6 covers
it. Run with ``pytest -s`` to see the largest difference.
"""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from msx.models.strategies import STAPLE_MAX_ITERATIONS, fuse_all, staple

from .metric_references import random_lesion_pair

TOLERANCE = 1e-6


def itk_staple(masks: np.ndarray) -> np.ndarray:
    """SimpleITK's STAPLE posterior of (raters, *spatial) bool masks, with msx's iteration cap."""
    staple_filter = sitk.STAPLEImageFilter()
    staple_filter.SetForegroundValue(1.0)
    staple_filter.SetConfidenceWeight(1.0)
    staple_filter.SetMaximumIterations(STAPLE_MAX_ITERATIONS)
    posterior = staple_filter.Execute([sitk.GetImageFromArray(mask.astype(np.uint8)) for mask in masks])
    assert posterior.GetPixelID() == sitk.sitkFloat64
    return sitk.GetArrayFromImage(posterior)


def independent_raters(seed: int, raters: int, shape=(5, 6, 4)) -> np.ndarray:
    """Raters marking voxels independently with their own foreground rate: EM's slow, hard case."""
    rng = np.random.default_rng(seed)
    return rng.random((raters, *shape)) < rng.uniform(0.1, 0.6, (raters, 1, 1, 1))


def raters_around_one_truth(seed: int, raters: int) -> np.ndarray:
    """Raters who each redraw the boundary of one lesion mask and add a few stray voxels of their own."""
    rng = np.random.default_rng(seed)
    truth = random_lesion_pair("spheres", seed, spacing=(0.5, 1.0, 2.5), shape=(12, 10, 6))[1]
    boundary_band = ndimage.binary_dilation(truth) & ~ndimage.binary_erosion(truth)
    masks = []
    for _ in range(raters):
        redrawn = boundary_band & (rng.random(truth.shape) < rng.uniform(0.1, 0.5))
        stray = rng.random(truth.shape) < rng.uniform(0.0, 0.02)
        masks.append((truth ^ redrawn) | stray)
    return np.stack(masks)


def with_one_empty_rater(seed: int) -> np.ndarray:
    masks = raters_around_one_truth(seed, raters=4)
    masks[1] = False
    return masks


def all_agreeing(seed: int) -> np.ndarray:
    truth = random_lesion_pair("spheres", seed, spacing=(0.5, 1.0, 2.5), shape=(12, 10, 6))[1]
    return np.stack([truth] * 5)


RATER_STACKS = {
    **{f"independent-seed{seed}-{raters}raters": (independent_raters, seed, raters) for seed in range(3) for raters in (3, 5, 8)},
    # 40 raters cross msx's 32-rater vote packing.
    "independent-seed0-40raters": (independent_raters, 0, 40),
    **{f"around-one-truth-seed{seed}-{raters}raters": (raters_around_one_truth, seed, raters) for seed in range(3) for raters in (3, 6)},
    **{f"one-rater-empty-seed{seed}": (with_one_empty_rater, seed) for seed in range(2)},
    "all-agree": (all_agreeing, 0),
    "single-rater": (raters_around_one_truth, 1, 1),
}


def rater_stack(name: str) -> np.ndarray:
    make, *arguments = RATER_STACKS[name]
    return make(*arguments)


@pytest.mark.parametrize("name", RATER_STACKS)
def test_posterior_matches_simpleitk(name, agreement):
    masks = rater_stack(name)
    agreement.check("staple posterior", staple(torch.from_numpy(masks)).numpy(), itk_staple(masks), TOLERANCE)


@pytest.mark.parametrize("name", RATER_STACKS)
def test_staple_strategy_mask_matches_simpleitk(name):
    masks = rater_stack(name)
    reference = itk_staple(masks)
    # A voxel this close to the 0.5 threshold may fall either side within TOLERANCE; none of these stacks has one.
    assert np.abs(reference - 0.5).min() > TOLERANCE
    # One sample per step whose logits' sign is the rater's vote: the strategy's step masks are the raters'.
    step_logits = torch.from_numpy(np.where(masks, 3.0, -3.0))[:, None]
    lesion = fuse_all(step_logits, ["staple"])["staple"].numpy()
    np.testing.assert_array_equal(lesion, reference >= 0.5)


@pytest.mark.parametrize("value", [False, True], ids=["all-background", "all-foreground"])
def test_unanimous_constant_masks_are_defined_where_simpleitk_divides_zero_by_zero(value):
    # Every rater all background (or all foreground): ITK's sensitivity (specificity) is 0/0.
    masks = np.full((3, 4, 3, 2), value)
    assert np.isnan(itk_staple(masks)).all()
    assert (staple(torch.from_numpy(masks)).numpy() == float(value)).all()
