"""Inference strategies: how the per-step x0 predictions of DDIM sampling become one lesion mask.

Every strategy is a pure function of one tensor ``step_logits`` of shape ``(N, s, *spatial)``: the
predicted-x0 logits ``l_ij`` of DDIM steps ``i = 1..N`` (first = noisiest) and samples ``j``, with
``p_ij = x0(l_ij)`` in [-1, 1]: msx's ``2 * sigmoid(l) - 1`` unless the caller's inference protocol maps
logits otherwise (``protocols.py``: the reference clamps them). A strategy returns a signed score of shape
``spatial`` whose positive voxels are lesion, so sampling happens once per scan and all strategies are
evaluated from the same trajectories (docs/SCIENCE.md, "Inference strategies"; docs/FIDELITY.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .diffusion import X0Map, x0_from_logits
from .registry import Registry

Strategy = Callable[[torch.Tensor], torch.Tensor]

STRATEGIES: Registry[Strategy] = Registry("inference strategy")

# SimpleITK's STAPLEImageFilter runs to convergence with no iteration cap; a cap keeps a pathological
# input from hanging a trial. EM over a few raters converges in tens of iterations.
STAPLE_MAX_ITERATIONS = 1000
# ITK stops when every rater's squared change of sensitivity and specificity is <= 1e-14.
STAPLE_TOLERANCE = 1e-7


def check_step_logits(step_logits: torch.Tensor) -> None:
    if step_logits.ndim < 3 or step_logits.shape[0] == 0 or step_logits.shape[1] == 0:
        raise ValueError(
            "step_logits must have shape (steps, samples, *spatial) with at least one step and sample; "
            f"got {tuple(step_logits.shape)}"
        )


def _x0_predictions(step_logits: torch.Tensor, x0: X0Map) -> torch.Tensor:
    check_step_logits(step_logits)
    return x0(step_logits)


@STRATEGIES.register("last")
def last_step(step_logits: torch.Tensor, x0: X0Map = x0_from_logits) -> torch.Tensor:
    """p at the final (least noisy) step, averaged over samples."""
    return _x0_predictions(step_logits, x0)[-1].mean(dim=0)


@STRATEGIES.register("mean")
def mean_over_steps(step_logits: torch.Tensor, x0: X0Map = x0_from_logits) -> torch.Tensor:
    """Mean of p over all steps and samples."""
    return _x0_predictions(step_logits, x0).mean(dim=(0, 1))


@STRATEGIES.register("mean-var")
def mean_minus_variance(step_logits: torch.Tensor, x0: X0Map = x0_from_logits) -> torch.Tensor:
    """mean_i p_i - var_i p_i (unbiased), where p_i is p at step i averaged over samples."""
    per_step = _x0_predictions(step_logits, x0).mean(dim=1)
    if per_step.shape[0] < 2:
        raise ValueError("mean-var needs at least 2 sampling steps for an unbiased variance")
    return per_step.mean(dim=0) - per_step.var(dim=0, correction=1)


@STRATEGIES.register("uncertainty")
def uncertainty_weighted(step_logits: torch.Tensor, x0: X0Map = x0_from_logits) -> torch.Tensor:
    """Step-uncertainty fusion (Diff-UNet): later, more confident steps weigh more.

    u_i = mean_j l_ij; U_i = -sigma * log(sigma) with sigma = max(sigmoid(u_i), 1e-3);
    w_i = exp(sigmoid(i / N) * (1 - U_i)) for i = 1..N; score = sum_i sum_j w_i * p_ij.
    """
    p = _x0_predictions(step_logits, x0)
    steps = step_logits.shape[0]
    confidence = torch.sigmoid(step_logits.mean(dim=1)).clamp_min(1e-3)
    step_uncertainty = -confidence * torch.log(confidence)
    step_position = torch.arange(1, steps + 1, dtype=p.dtype, device=p.device) / steps
    step_position = step_position.reshape(steps, *([1] * (p.ndim - 2)))
    weights = torch.exp(torch.sigmoid(step_position) * (1 - step_uncertainty))
    return (weights.unsqueeze(1) * p).sum(dim=(0, 1))


@STRATEGIES.register("majority")
def majority_vote(step_logits: torch.Tensor, x0: X0Map = x0_from_logits) -> torch.Tensor:
    """2 * (fraction of the N * s votes p_ij > 0) - 1: positive exactly where more than half vote lesion.

    Computed as the mean of +-1 votes so that a tie is exactly 0 (background).
    """
    p = _x0_predictions(step_logits, x0)
    votes = torch.where(p > 0, 1.0, -1.0).to(p.dtype)
    return votes.mean(dim=(0, 1))


@STRATEGIES.register("staple")
def staple_fusion(step_logits: torch.Tensor, x0: X0Map = x0_from_logits) -> torch.Tensor:
    """Binary STAPLE over the N step masks (p_i > 0, samples averaged first).

    Returns the float64 score ``posterior - nextafter(0.5, 0)`` (posterior = STAPLE probability of
    lesion), which is > 0 exactly where the posterior is >= 0.5, the rule of the reference method.
    """
    step_masks = _x0_predictions(step_logits, x0).mean(dim=1) > 0
    # Near 0.5 this subtraction is exact (Sterbenz), so the sign is exactly the >= 0.5 decision. It stays
    # float64: a tie's margin of one ulp (6e-17) would round to 0 in float16.
    return staple(step_masks) - math.nextafter(0.5, 0.0)


def _group_voxels_by_votes(votes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct vote patterns of (raters, voxels) bool votes: (raters, K) patterns, voxel->pattern index, counts.

    Packs up to 32 raters per round into an int64 key next to the running group id (voxel counts are
    far below 2**31), because torch.unique over 1-D keys is ~50x faster than torch.unique(dim=...).
    """
    raters, voxels = votes.shape
    group = torch.zeros(voxels, dtype=torch.int64, device=votes.device)
    for start in range(0, raters, 32):
        chunk = votes[start : start + 32].to(torch.int64)
        bit_values = 2 ** torch.arange(chunk.shape[0], dtype=torch.int64, device=votes.device)
        keys = (group << 32) + (chunk * bit_values.unsqueeze(1)).sum(dim=0)
        group = torch.unique(keys, return_inverse=True)[1]
    counts = torch.bincount(group)
    representative = torch.empty_like(counts).scatter_(0, group, torch.arange(voxels, device=votes.device))
    return votes[:, representative], group, counts


def staple(
    masks: torch.Tensor,
    max_iterations: int = STAPLE_MAX_ITERATIONS,
    tolerance: float = STAPLE_TOLERANCE,
) -> torch.Tensor:
    """Binary STAPLE (Warfield et al. 2004): float64 posterior probability of foreground per voxel.

    ``masks`` has shape (raters, *spatial), nonzero = foreground. Written by hand because SimpleITK
    (264 MB) is the only maintained implementation; it follows itk::STAPLEImageFilter: EM starts from
    the raters' average as the posterior, the global prior is the mean foreground fraction over raters
    (confidence weight 1), each iteration re-estimates every rater's sensitivity and specificity and
    then the posterior, and it stops once no sensitivity or specificity moves by more than ``tolerance``
    (after at least two iterations, as ITK). The posterior depends on a voxel only through its votes,
    so EM runs over the distinct vote patterns weighted by their voxel counts.
    """
    if masks.ndim < 2 or masks.shape[0] == 0:
        raise ValueError(f"masks must have shape (raters, *spatial) with at least one rater; got {tuple(masks.shape)}")
    votes = masks.reshape(masks.shape[0], -1) != 0
    prior = votes.double().mean().item()
    if prior in (0.0, 1.0):
        # Every rater says all background (or all foreground): EM's ratios would be 0/0.
        return votes[0].double().reshape(masks.shape[1:])

    patterns, voxel_pattern, counts = _group_voxels_by_votes(votes)
    decisions = patterns.double()
    counts = counts.double()
    posterior = decisions.mean(dim=0)
    previous = None
    for _ in range(max_iterations):
        foreground_weight = posterior * counts
        background_weight = (1 - posterior) * counts
        sensitivity = decisions @ foreground_weight / foreground_weight.sum()
        specificity = (1 - decisions) @ background_weight / background_weight.sum()
        foreground_likelihood = torch.where(patterns, sensitivity[:, None], 1 - sensitivity[:, None]).prod(dim=0)
        background_likelihood = torch.where(patterns, 1 - specificity[:, None], specificity[:, None]).prod(dim=0)
        posterior = prior * foreground_likelihood / (
            prior * foreground_likelihood + (1 - prior) * background_likelihood
        )
        rates = torch.cat([sensitivity, specificity])
        if previous is not None and (rates - previous).abs().max() <= tolerance:
            break
        previous = rates
    return posterior[voxel_pattern].reshape(masks.shape[1:])


def fuse_all(step_logits: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Boolean lesion mask (score > 0) for each named strategy, all from the same trajectories.

    Every name is checked before any work, so a typo fails fast with the list of valid names.
    """
    strategies = {name: STRATEGIES.get(name) for name in names}
    return {name: strategy(step_logits) > 0 for name, strategy in strategies.items()}
