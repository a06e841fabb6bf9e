from __future__ import annotations

import math

import numpy as np
import torch

from msx.models.lesion_maps import binary_entropy_bits, lesion_probability
from msx.models.strategies import fuse_all
from msx.models.uncertainty import chain_statistics, lesion_maps
from tests.helpers import as_numpy

LOG3 = math.log(3.0)  # sigmoid(log 3) = 3/4


def entropy_bits(q: float) -> float:
    return -sum(x * math.log2(x) for x in (q, 1 - q) if x > 0)


def test_maps_of_hand_made_logits():
    # (steps 2, samples 2, spatial 1 x 1 x 5); sigmoid of each voxel's four logits:
    # v0 all 1/2; v1 all 3/4; v2 half 3/4, half 1/4; v3 certain lesion; v4 certain background.
    voxels = [
        [0.0, 0.0, 0.0, 0.0],
        [LOG3, LOG3, LOG3, LOG3],
        [LOG3, -LOG3, -LOG3, LOG3],
        [40.0, 40.0, 40.0, 40.0],
        [-40.0, -40.0, -40.0, -40.0],
    ]
    step_logits = torch.tensor(voxels, dtype=torch.float32).T.reshape(2, 2, 1, 1, 5)

    maps = lesion_maps(as_numpy(chain_statistics(step_logits)))

    expected_probability = [0.5, 0.75, 0.5, 1.0, 0.0]
    expected_uncertainty = [1.0, entropy_bits(0.75), 1.0, 0.0, 0.0]
    steps = maps.uncertainty["steps"]  # the entropy of the probability over every step and chain
    assert maps.probability.shape == steps.shape == (1, 1, 5)
    np.testing.assert_allclose(maps.probability.flatten(), expected_probability, rtol=0, atol=1e-6)
    np.testing.assert_allclose(steps.flatten(), expected_uncertainty, rtol=0, atol=1e-6)
    assert steps.flatten()[0] == 1.0  # the maximum is exactly one bit


def test_entropy_is_symmetric_and_within_one_bit():
    q = torch.linspace(0, 1, 10001, dtype=torch.float32)
    entropy = binary_entropy_bits(q)
    assert entropy.dtype == torch.float32
    assert entropy.min().item() == 0.0 and entropy.max().item() == 1.0
    assert entropy[0].item() == entropy[-1].item() == 0.0
    torch.testing.assert_close(entropy, entropy.flip(0), rtol=0, atol=1e-6)


def test_the_mean_mask_is_probability_above_one_half_wherever_the_probability_is_not_exactly_one_half():
    step_logits = torch.randn((3, 2, 6, 5, 4), generator=torch.Generator().manual_seed(0)) * 3
    step_logits[:, :, 0, 0, 0] = 0.0  # a tie: probability exactly 0.5, mask background
    step_logits[:, :, 0, 0, 1] = 1e-30  # a lesion decision too slight for float32 to show in the probability

    probability = lesion_probability(step_logits)
    mean_mask = fuse_all(step_logits, ["mean"])["mean"]

    assert not mean_mask[0, 0, 0] and mean_mask[0, 0, 1] and (probability[0, 0, :2] == 0.5).all()
    decided = probability != 0.5
    assert torch.equal(mean_mask[decided], probability[decided] > 0.5)
    assert (probability[mean_mask] >= 0.5).all() and (probability[~mean_mask] <= 0.5).all()
    assert 0 < int(mean_mask.sum()) < mean_mask.numel()
    # The probability is the mean of sigmoid over steps and samples, whichever way it is computed.
    torch.testing.assert_close(probability, torch.sigmoid(step_logits).mean(dim=(0, 1)), rtol=0, atol=1e-6)
