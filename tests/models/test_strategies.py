import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from msx.models import strategies
from msx.models.registry import UnknownNameError
from msx.models.strategies import STAPLE_MAX_ITERATIONS, STRATEGIES, fuse_all, staple

from .metric_references import random_lesion_pair


def logits_for(p: list) -> torch.Tensor:
    """Inverse of p = 2 * sigmoid(l) - 1, i.e. l = log((1 + p) / (1 - p))."""
    p = torch.tensor(p, dtype=torch.float64)
    return torch.log((1 + p) / (1 - p))


# Two voxels, N = 3 steps, s = 2 samples: P[i][j] = [p at voxel A, p at voxel B].
HAND_P = [
    [[-0.6, 0.9], [-0.2, -0.5]],
    [[0.2, -0.3], [0.4, -0.5]],
    [[0.6, -0.1], [0.8, 0.3]],
]
HAND_LOGITS = logits_for(HAND_P)


def score(name: str, step_logits: torch.Tensor) -> torch.Tensor:
    return STRATEGIES.get(name)(step_logits)


def test_registered_names():
    assert set(STRATEGIES.names()) == {"last", "mean", "mean-var", "uncertainty", "majority", "staple"}


def test_last_averages_samples_of_final_step():
    # A: (0.6 + 0.8) / 2; B: (-0.1 + 0.3) / 2
    torch.testing.assert_close(score("last", HAND_LOGITS), torch.tensor([0.7, 0.1], dtype=torch.float64))


def test_mean_over_steps_and_samples():
    # A: (-0.6 - 0.2 + 0.2 + 0.4 + 0.6 + 0.8) / 6; B: (0.9 - 0.5 - 0.3 - 0.5 - 0.1 + 0.3) / 6
    torch.testing.assert_close(score("mean", HAND_LOGITS), torch.tensor([0.2, -1 / 30], dtype=torch.float64))


def test_mean_minus_unbiased_variance_of_sample_means():
    # A: p_i = -0.4, 0.3, 0.7 -> mean 0.2, var (0.36 + 0.01 + 0.25) / 2 = 0.31
    # B: p_i = 0.2, -0.4, 0.1 -> mean -1/30, var ((7/30)^2 + (11/30)^2 + (4/30)^2) / 2 = 186/1800
    expected = torch.tensor([0.2 - 0.31, -1 / 30 - 186 / 1800], dtype=torch.float64)
    torch.testing.assert_close(score("mean-var", HAND_LOGITS), expected)


def test_mean_var_needs_two_steps():
    with pytest.raises(ValueError, match="2 sampling steps"):
        score("mean-var", HAND_LOGITS[:1])


def test_majority_vote_fraction():
    # A: 4 of 6 votes positive -> 2 * 4/6 - 1; B: 2 of 6 -> 2 * 2/6 - 1
    torch.testing.assert_close(score("majority", HAND_LOGITS), torch.tensor([1 / 3, -1 / 3], dtype=torch.float64))


def test_majority_tie_is_background():
    tie = logits_for([[[0.5, -0.2]], [[-0.5, 0.2]]])  # N = 2, s = 1: one vote each way per voxel
    assert (score("majority", tie) == 0).all()
    assert not fuse_all(tie, ["majority"])["majority"].any()


def uncertainty_by_loops(step_logits: torch.Tensor) -> np.ndarray:
    """The SCIENCE.md formula, one voxel and one step at a time."""
    steps, samples = step_logits.shape[:2]
    flat = step_logits.reshape(steps, samples, -1).tolist()
    fused = []
    for voxel in range(len(flat[0][0])):
        total = 0.0
        for i in range(1, steps + 1):
            logits = [flat[i - 1][j][voxel] for j in range(samples)]
            u = sum(logits) / samples
            confidence = max(1 / (1 + math.exp(-u)), 1e-3)
            uncertainty = -confidence * math.log(confidence)
            w = math.exp(1 / (1 + math.exp(-i / steps)) * (1 - uncertainty))
            total += sum(w * (2 / (1 + math.exp(-logit)) - 1) for logit in logits)
        fused.append(total)
    return np.array(fused).reshape(step_logits.shape[2:])


def test_uncertainty_matches_loop_implementation():
    generator = torch.Generator().manual_seed(0)
    step_logits = 4 * torch.randn(4, 3, 2, 3, 2, generator=generator, dtype=torch.float64)
    step_logits[0, :, 0, 0, 0] = -12.0  # sigmoid far below the 1e-3 floor
    np.testing.assert_allclose(score("uncertainty", step_logits).numpy(), uncertainty_by_loops(step_logits))


def test_uncertainty_floors_sigmoid_at_one_thousandth():
    # N = s = 1, l = -12: sigmoid(-12) = 6e-6 is floored to 1e-3, so U = 1e-3 * ln(1000).
    floored_weight = math.exp(1 / (1 + math.exp(-1)) * (1 - 1e-3 * math.log(1000)))
    unfloored_confidence = 1 / (1 + math.exp(12))
    unfloored_weight = math.exp(1 / (1 + math.exp(-1)) * (1 + unfloored_confidence * math.log(unfloored_confidence)))
    p = 2 / (1 + math.exp(12)) - 1
    fused = score("uncertainty", torch.full((1, 1, 1), -12.0, dtype=torch.float64)).item()
    assert fused == pytest.approx(floored_weight * p, rel=1e-12)
    assert fused != pytest.approx(unfloored_weight * p, rel=1e-4)


def test_staple_unanimous_raters_give_their_mask():
    mask = torch.zeros(3, 4, 2, dtype=torch.bool)
    mask[1:, 2, :] = True
    posterior = staple(mask.expand(5, *mask.shape))
    torch.testing.assert_close(posterior, mask.double())


def test_staple_all_background_and_all_foreground():
    assert (staple(torch.zeros(3, 2, 2)) == 0).all()
    assert (staple(torch.ones(3, 2, 2)) == 1).all()


# Voxels A, B, C, D; raters 1 and 2 mark A, rater 3 marks A and B. Prior g = 4/12 = 1/3.
ASYMMETRIC = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)


def test_staple_first_iterations_by_hand():
    # Start W = (1, 1/3, 0, 0). M-step: p1 = p2 = 3/4, p3 = 1, q1 = q2 = 1, q3 = 3/4.
    # E-step at B: alpha = (1/4)^2, beta = 1 * 1 * (1/4) -> W_B = (1/48) / (1/48 + 8/48) = 1/9;
    # A has beta = 0 -> 1 and C, D have alpha = 0 -> 0.
    torch.testing.assert_close(
        staple(ASYMMETRIC, max_iterations=1), torch.tensor([1, 1 / 9, 0, 0], dtype=torch.float64)
    )
    # Second M-step: p1 = 9/10, q3 = 2 / (26/9) = 9/13 -> W_B = (1/300) / (1/300 + (2/3)(4/13)) = 13/813.
    torch.testing.assert_close(
        staple(ASYMMETRIC, max_iterations=2), torch.tensor([1, 13 / 813, 0, 0], dtype=torch.float64)
    )


def test_staple_asymmetric_converges_to_the_agreeing_raters():
    posterior = staple(ASYMMETRIC)
    assert posterior[0] == 1 and posterior[2] == 0 and posterior[3] == 0
    assert posterior[1] < 1e-6


def staple_by_numpy(masks: np.ndarray, max_iterations: int = 1000) -> np.ndarray:
    """itk::STAPLEImageFilter's loop over voxels, vectorised over voxels with numpy."""
    votes = masks.reshape(masks.shape[0], -1).astype(bool)
    posterior = votes.mean(axis=0)
    prior = posterior.mean()
    last = None
    for iteration in range(max_iterations):
        p = np.array([posterior[d].sum() / posterior.sum() for d in votes])
        q = np.array([(1 - posterior[~d]).sum() / (1 - posterior).sum() for d in votes])
        alpha = np.ones(votes.shape[1])
        beta = np.ones(votes.shape[1])
        for d, sensitivity, specificity in zip(votes, p, q, strict=True):
            alpha *= np.where(d, sensitivity, 1 - sensitivity)
            beta *= np.where(d, 1 - specificity, specificity)
        posterior = prior * alpha / (prior * alpha + (1 - prior) * beta)
        if iteration > 0 and np.all((p - last[0]) ** 2 <= 1e-14) and np.all((q - last[1]) ** 2 <= 1e-14):
            break
        last = (p, q)
    return posterior.reshape(masks.shape[1:])


@pytest.mark.parametrize("raters", [4, 40])  # 40 crosses the 32-rater packing boundary
def test_staple_matches_numpy_em(raters):
    rng = np.random.default_rng(raters)
    truth = rng.random((5, 6, 4)) < 0.3
    sensitivity = rng.uniform(0.6, 0.95, raters)[:, None, None, None]
    false_positive_rate = rng.uniform(0.02, 0.2, raters)[:, None, None, None]
    draws = rng.random((raters, *truth.shape))
    masks = np.where(truth, draws < sensitivity, draws < false_positive_rate)
    np.testing.assert_allclose(staple(torch.from_numpy(masks)).numpy(), staple_by_numpy(masks), rtol=1e-9, atol=1e-12)


def test_staple_strategy_averages_samples_before_binarising():
    # Per step masks after averaging the two samples: voxel 0 positive (0.9 - 0.3), voxel 1 negative.
    step_logits = logits_for([[[0.9, -0.4], [-0.3, 0.2]]] * 3)
    assert fuse_all(step_logits, ["staple"])["staple"].tolist() == [True, False]


def test_staple_score_is_positive_exactly_at_half(monkeypatch):
    posteriors = torch.tensor([0.5, 0.49999999999999994, 0.75, 0.0, 1.0], dtype=torch.float64)
    monkeypatch.setattr(strategies, "staple", lambda masks: posteriors)
    # float16 input: the tie's one-ulp margin must survive.
    lesion = score("staple", torch.zeros(2, 1, 5, dtype=torch.float16)) > 0
    assert lesion.tolist() == [True, False, True, False, True]


def test_fuse_all_gives_boolean_masks_of_every_strategy():
    step_logits = torch.randn(3, 2, 4, 3, 2, generator=torch.Generator().manual_seed(1))
    masks = fuse_all(step_logits, STRATEGIES.names())
    assert list(masks) == list(STRATEGIES.names())
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == (4, 3, 2)
        torch.testing.assert_close(mask, score(name, step_logits) > 0)


def test_fuse_all_checks_names_before_computing():
    not_a_trajectory = torch.zeros(4, 4)  # would fail inside any strategy
    with pytest.raises(UnknownNameError, match="valid names: last, majority, mean, mean-var, staple, uncertainty"):
        fuse_all(not_a_trajectory, ["mean", "median"])


def test_rejects_tensor_without_step_and_sample_axes():
    with pytest.raises(ValueError, match="steps, samples"):
        score("mean", torch.zeros(4, 4))


# --------------------------------------------------------------------------------------------------------------
# STAPLE against SimpleITK's
# msx's compact STAPLE against SimpleITK's STAPLEImageFilter, the implementation it follows.
#
# Both run the same EM in float64 (SimpleITK's output is a 64-bit float image) with the same start, prior,
# stopping rule and iteration cap, so their posteriors differ only by summation order. The stopping rule
# is where that could show: a run that stops one iteration earlier than the other moves the posterior by
# at most one iteration's change, which the stop at rate changes <= 1e-7 keeps around 1e-7; 1e-6 covers
# it. Run with ``pytest -s`` to see the largest difference.
# --------------------------------------------------------------------------------------------------------------


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
    **{
        f"independent-seed{seed}-{raters}raters": (independent_raters, seed, raters) for seed in range(3)
        for raters in (3, 5, 8)
    },
    # 40 raters cross msx's 32-rater vote packing.
    "independent-seed0-40raters": (independent_raters, 0, 40),
    **{
        f"around-one-truth-seed{seed}-{raters}raters": (raters_around_one_truth, seed, raters) for seed in range(3)
        for raters in (3, 6)
    },
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
