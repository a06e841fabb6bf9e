"""Voxel-wise lesion probability and uncertainty maps from the same sampled trajectories as the masks.

Like a strategy (``strategies``), each map is a pure function of ``step_logits`` of shape
``(N, s, *spatial)``, so the maps cost no sampling beyond the one pass that gives the masks; the uncertainty
measures are ``uncertainty``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic

import torch

from .data.transforms import Volume
from .strategies import mean_over_steps


@dataclass(frozen=True)
class LesionMaps(Generic[Volume]):
    """Lesion probability and each uncertainty measure's map (bits), all in [0, 1], on one grid."""

    probability: Volume
    uncertainty: Mapping[str, Volume]  # measure (uncertainty.UNCERTAINTY_MEASURES) -> its map


def lesion_probability(step_logits: torch.Tensor) -> torch.Tensor:
    """Mean of sigmoid(l_ij) over all steps i and samples j: shape ``spatial``.

    Computed as (1 + m) / 2 from the score m of the "mean" strategy (mean of p = 2 * sigmoid(l) - 1), the
    same value: rounding is monotone, so wherever the probability is not exactly 0.5 the "mean" mask is
    exactly ``probability > 0.5``, and the map and that mask never contradict each other.
    """
    return (1 + mean_over_steps(step_logits)) / 2


def binary_entropy_bits(probability: torch.Tensor) -> torch.Tensor:
    """H(q) = -q log2 q - (1 - q) log2 (1 - q), in [0, 1]: 1 at q = 0.5, 0 at q = 0 and q = 1.

    The entropy of the voxel's lesion-or-not outcome under the averaged prediction: it grows with the
    total doubt, whether each step is unsure or confident steps (or samples, or fold models) disagree,
    and it is symmetric in lesion and background. Bits put its maximum at exactly 1. (Diff-UNet's
    -sigmoid * log(sigmoid), used by the "uncertainty" strategy as a step weight, is neither: it
    peaks at 1/e and calls a confident "background" as certain as a confident "lesion".)
    """
    # float64 so that rounding cannot lift the maximum above 1; entr(0) = 0 handles q = 0 and 1.
    q = probability.double()
    entropy = (torch.special.entr(q) + torch.special.entr(1 - q)) / math.log(2)
    return entropy.to(probability.dtype)

