"""Voxel uncertainty measures from the sampler's own ensemble: its chains (and their steps).

A diffusion sampler draws ``samples`` chains of ``steps`` denoising steps for every window. Every measure is a
function of three voxel means over that ensemble (:class:`ChainStatistics`), themselves pure functions of
``step_logits`` of shape ``(steps, samples, *spatial)``: the measures cost no network call beyond the one sampling
pass that gives the masks. The three ensemble measures are those the Shifts 2.0 multiple-sclerosis benchmark scores
(Malinin et al. 2022, after Depeweg et al. 2018), over the chains' final lesion probabilities p_j = sigmoid(l_j) at
the last step, with H the binary entropy in bits:

- ``total``: H(mean_j p_j), the entropy of the ensemble's mean prediction (total uncertainty);
- ``data``: mean_j H(p_j), the chains' mean entropy (expected data, or aleatoric, uncertainty);
- ``knowledge``: their difference, the mutual information between the prediction and the chain (knowledge, or
  epistemic, uncertainty): the chains' disagreement. Zero with one chain.

``steps`` is the entropy of the lesion probability averaged over every step of every chain: MSSegDiff's view, in
which the trajectory's steps are the ensemble.

The statistics are means, so those of several ensembles of as many chains each (a registered model's fold models)
average into the statistics of their union (:func:`pooled_statistics`), and the measures of the pooled ensemble come
out exactly as if one sampler had drawn every chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Generic

import numpy as np
import torch

from .data.transforms import Volume
from .lesion_maps import LesionMaps, binary_entropy_bits, lesion_probability
from .registry import Registry
from .strategies import check_step_logits


@dataclass(frozen=True)
class ChainStatistics(Generic[Volume]):
    """Voxel means over a sampler's ensemble, each of shape ``spatial``, from which every measure follows."""

    step_probability: Volume  # sigmoid(l) over every step of every chain (lesion_maps.lesion_probability)
    final_probability: Volume  # the chains' last-step sigmoid(l)
    final_entropy: Volume  # the binary entropy (bits) of the chains' last-step sigmoid(l)

    def values(self) -> tuple[Volume, ...]:
        """The statistics in STATISTIC_NAMES' order."""
        return tuple(getattr(self, name) for name in STATISTIC_NAMES)


STATISTIC_NAMES = tuple(field.name for field in fields(ChainStatistics))


def chain_statistics(step_logits: torch.Tensor) -> ChainStatistics[torch.Tensor]:
    check_step_logits(step_logits)
    final = torch.sigmoid(step_logits[-1].float())  # (samples, *spatial)
    return ChainStatistics(
        step_probability=lesion_probability(step_logits).float(),
        final_probability=final.mean(dim=0),
        final_entropy=binary_entropy_bits(final).mean(dim=0),
    )


def pooled_statistics(members: Sequence[ChainStatistics[np.ndarray]]) -> ChainStatistics[np.ndarray]:
    """The statistics of the union of ensembles that drew as many chains of as many steps each."""
    if not members:
        raise ValueError("no ensemble to pool")
    return ChainStatistics(
        *(
            np.mean([member.values()[index] for member in members], axis=0, dtype=np.float32)
            for index in range(len(STATISTIC_NAMES))
        )
    )


UncertaintyMeasure = Callable[[ChainStatistics[torch.Tensor]], torch.Tensor]

UNCERTAINTY_MEASURES: Registry[UncertaintyMeasure] = Registry("uncertainty measure")


@UNCERTAINTY_MEASURES.register("total")
def total_uncertainty(statistics: ChainStatistics[torch.Tensor]) -> torch.Tensor:
    return binary_entropy_bits(statistics.final_probability)


@UNCERTAINTY_MEASURES.register("data")
def data_uncertainty(statistics: ChainStatistics[torch.Tensor]) -> torch.Tensor:
    return statistics.final_entropy


@UNCERTAINTY_MEASURES.register("knowledge")
def knowledge_uncertainty(statistics: ChainStatistics[torch.Tensor]) -> torch.Tensor:
    # Entropy is concave, so total >= data; the clamp only removes rounding below zero.
    return (total_uncertainty(statistics) - data_uncertainty(statistics)).clamp_min(0)


@UNCERTAINTY_MEASURES.register("steps")
def step_uncertainty(statistics: ChainStatistics[torch.Tensor]) -> torch.Tensor:
    return binary_entropy_bits(statistics.step_probability)


def uncertainty_maps(
    statistics: ChainStatistics[np.ndarray], measures: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """measure -> its float32 map, for the measures named (default: every registered one)."""
    names = UNCERTAINTY_MEASURES.names() if measures is None else tuple(measures)
    tensors = ChainStatistics(*(torch.from_numpy(np.asarray(value)) for value in statistics.values()))
    return {name: UNCERTAINTY_MEASURES.get(name)(tensors).numpy().astype(np.float32, copy=False) for name in names}


def lesion_maps(statistics: ChainStatistics[np.ndarray]) -> LesionMaps[np.ndarray]:
    """The lesion probability over every step of every chain, and every measure's map (float32)."""
    return LesionMaps(np.asarray(statistics.step_probability, dtype=np.float32), uncertainty_maps(statistics))
