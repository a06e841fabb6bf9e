"""Sampling encodes each window once: the same trajectories as running the whole network at every step."""

import pytest
import torch

from msx.models.diffusion import EncodingDenoiser, ddim_trajectory
from msx.models.networks import BACKBONES, NetworkConfig, build_network

# backbone -> (width, window size): the smallest each family takes (see test_more_backbones.py).
CASES = {
    "unet": (0.125, (32, 32, 32)),
    "basic-unet": (0.125, (32, 32, 32)),
    "segresnet": (0.125, (32, 32, 32)),
    "attention-unet": (0.125, (32, 32, 32)),
    "multiencoder": (0.125, (32, 32, 32)),
    "unetr": (0.05, (32, 32, 32)),
    "swinunetr": (0.25, (64, 32, 32)),
}


class WholeNetworkEveryStep:
    """Hides `encode`/`denoise`, so sampling calls the network's forward (encoder included) at every step."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, image: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.net(image, noisy, timesteps)


def test_every_registered_backbone_is_covered():
    assert set(CASES) == set(BACKBONES.names())


# The sampling path is the same code for every family; the unit tier checks the three cheapest, and the families
# whose smallest windows take half a minute or more on two CPU cores are left to the full suite.
FAST = {"attention-unet", "basic-unet", "unet"}


@pytest.mark.parametrize(
    "backbone", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in sorted(CASES)]
)
def test_reused_encoder_features_give_the_same_trajectory(backbone):
    width, size = CASES[backbone]
    torch.manual_seed(0)
    net = build_network(NetworkConfig(backbone=backbone, image_channels=2, width=width, patch_size=size)).eval()
    assert isinstance(net, EncodingDenoiser)
    assert not isinstance(WholeNetworkEveryStep(net), EncodingDenoiser)
    image = torch.randn((2, 2, *size), generator=torch.Generator().manual_seed(1))

    def trajectory(denoiser) -> torch.Tensor:
        generator = torch.Generator().manual_seed(2)
        return ddim_trajectory(denoiser, image, num_steps=3, num_samples=2, generator=generator)

    reused, rerun = trajectory(net), trajectory(WholeNetworkEveryStep(net))
    assert reused.shape == (2, 3, 2, *size)
    # Not bit-equal: the encoder runs at batch 2 instead of 4, and convolution kernels may sum in another order.
    torch.testing.assert_close(reused, rerun, rtol=1e-4, atol=1e-4)


def test_denoise_rejects_features_of_another_batch():
    net = build_network(NetworkConfig(backbone="unet", image_channels=1, width=0.125)).eval()
    image = torch.randn((2, 1, 32, 32, 32))
    features = net.encode(image[:1])
    with pytest.raises(ValueError, match="one row per image"):
        net.denoise(image, torch.zeros((2, 1, 32, 32, 32)), torch.zeros(2, dtype=torch.long), features)
