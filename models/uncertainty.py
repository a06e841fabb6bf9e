"""Voxel uncertainty measures from the sampler's own ensemble: its chains (and their steps).

A diffusion sampler draws ``samples`` chains of ``steps`` denoising steps for every window; like a strategy
(``strategies``), each measure is a pure function of ``step_logits`` of shape ``(steps, samples, *spatial)``, so it
costs no network call beyond the one sampling pass that gives the masks. The three ensemble measures are those the
Shifts 2.0 multiple-sclerosis benchmark scores (Malinin et al. 2022, after Depeweg et al. 2018), over the chains'
final lesion probabilities p_j = sigmoid(l_j) at the last step, with H the binary entropy in bits:

- ``total``: H(mean_j p_j), the entropy of the ensemble's mean prediction (total uncertainty);
- ``data``: mean_j H(p_j), the chains' mean entropy (expected data, or aleatoric, uncertainty);
- ``knowledge``: their difference, the mutual information between the prediction and the chain (knowledge, or
  epistemic, uncertainty): the chains' disagreement. Zero with one chain.

``steps`` is the entropy of the lesion probability averaged over every step of every chain (msx's
``lesion_maps.uncertainty``, what ``msx predict --maps`` writes): MSSegDiff's view, in which the trajectory's steps are
the ensemble.
"""

from __future__ import annotations

from typing import Callable

import torch

from .lesion_maps import binary_entropy_bits, lesion_probability
from .registry import Registry
from .strategies import check_step_logits

UncertaintyMeasure = Callable[[torch.Tensor], torch.Tensor]

UNCERTAINTY_MEASURES: Registry[UncertaintyMeasure] = Registry("uncertainty measure")


def _final_probabilities(step_logits: torch.Tensor) -> torch.Tensor:
    """(samples, *spatial): each chain's lesion probability at its last step."""
    check_step_logits(step_logits)
    return torch.sigmoid(step_logits[-1].float())


@UNCERTAINTY_MEASURES.register("total")
def total_uncertainty(step_logits: torch.Tensor) -> torch.Tensor:
    return binary_entropy_bits(_final_probabilities(step_logits).mean(dim=0))


@UNCERTAINTY_MEASURES.register("data")
def data_uncertainty(step_logits: torch.Tensor) -> torch.Tensor:
    return binary_entropy_bits(_final_probabilities(step_logits)).mean(dim=0)


@UNCERTAINTY_MEASURES.register("knowledge")
def knowledge_uncertainty(step_logits: torch.Tensor) -> torch.Tensor:
    # Entropy is concave, so total >= data; the clamp only removes rounding below zero.
    return (total_uncertainty(step_logits) - data_uncertainty(step_logits)).clamp_min(0)


@UNCERTAINTY_MEASURES.register("steps")
def step_uncertainty(step_logits: torch.Tensor) -> torch.Tensor:
    return binary_entropy_bits(lesion_probability(step_logits))

