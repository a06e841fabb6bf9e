from __future__ import annotations

import numpy as np
import pytest
import torch

from msx.models.diffusion import (
    DiffusionConfig,
    EncodingDenoiser,
    add_noise,
    ddim_trajectory,
    ddim_update,
    sample_scan,
)
from msx.models.networks import BACKBONES, NetworkConfig, build_network

from .stand_ins import (
    OracleNet,
    RecordingNet,
    TinyConvNet,
    image_with_mask,
    oracle_logits,
)

ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def random_mask(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) < 0.4).float()


def test_ddim_update_by_hand() -> None:
    # x_t on the line from x0: no noise is left to carry, x_prev = sqrt(0.64) * 1.
    assert ddim_update(torch.tensor(0.5), torch.tensor(1.0), 0.25, 0.64).item() == pytest.approx(0.8)
    # x0 = 0: eps = 1 / sqrt(1 - 0.36) = 1.25 and x_prev = sqrt(1 - 0.64) * 1.25.
    assert ddim_update(torch.tensor(1.0), torch.tensor(0.0), 0.36, 0.64).item() == pytest.approx(0.75)


def test_ddim_update_with_the_true_x0_keeps_the_noise_and_lowers_its_level() -> None:
    generator = torch.Generator().manual_seed(0)
    clean = torch.where(torch.rand((1, 1, 4, 4, 4), generator=generator) < 0.5, 1.0, -1.0)
    noise = torch.randn(clean.shape, generator=generator)
    config = DiffusionConfig()
    noisy = add_noise(clean, noise, torch.tensor([700]), config)
    stepped = ddim_update(noisy, clean, ALPHA_BAR[700], ALPHA_BAR[300])
    torch.testing.assert_close(stepped, add_noise(clean, noise, torch.tensor([300]), config), rtol=1e-5, atol=1e-5)


def test_trajectory_feeds_each_step_the_ddim_update_of_the_last() -> None:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand((2, 1, 3, 3, 3), generator=generator)
    net = RecordingNet()

    trajectory = ddim_trajectory(net, image, num_steps=10, num_samples=2, generator=generator)

    assert len(net.calls) == 10
    assert [call[2].tolist() for call in net.calls[:3]] == [[999] * 4, [888] * 4, [777] * 4]
    (_, x_first, _, logits_first), (_, x_second, _, logits_second) = net.calls[:2]
    x0 = 2.0 * sigmoid(logits_first.double().numpy()) - 1.0
    noise = (x_first.double().numpy() - np.sqrt(ALPHA_BAR[999]) * x0) / np.sqrt(1.0 - ALPHA_BAR[999])
    expected = np.sqrt(ALPHA_BAR[888]) * x0 + np.sqrt(1.0 - ALPHA_BAR[888]) * noise
    np.testing.assert_allclose(x_second.numpy(), expected, rtol=1e-4, atol=1e-5)
    # Chains b * s + j belong to image b and sample j.
    torch.testing.assert_close(trajectory[:, 0], logits_first.view(2, 2, 3, 3, 3))
    torch.testing.assert_close(trajectory[:, 1], logits_second.view(2, 2, 3, 3, 3))
    torch.testing.assert_close(net.calls[0][0], image.repeat_interleave(2, dim=0))


def test_trajectory_starts_from_standard_normal_noise() -> None:
    net = RecordingNet()
    ddim_trajectory(net, torch.zeros((1, 1, 16, 16, 16)), num_steps=1, generator=torch.Generator().manual_seed(2))
    start = net.calls[0][1]
    assert abs(start.mean().item()) < 0.1 and start.std().item() == pytest.approx(1.0, abs=0.05)


def test_oracle_trajectory_ends_on_the_true_mask_for_every_image_and_sample() -> None:
    generator = torch.Generator().manual_seed(3)
    mask = random_mask((2, 1, 4, 5, 3), generator)
    image = image_with_mask(mask, generator)

    trajectory = ddim_trajectory(OracleNet(), image, num_steps=4, num_samples=3, generator=generator)

    assert trajectory.shape == (2, 4, 3, 4, 5, 3) and trajectory.dtype == torch.float32
    final_step = trajectory[:, -1]
    assert torch.equal(final_step > 0, mask.expand(2, 3, 4, 5, 3) > 0)
    expected = oracle_logits(image)  # (2, 1, ...): image b's answer in all of its samples and steps
    torch.testing.assert_close(trajectory, expected[:, None].expand_as(trajectory))


def test_trajectory_is_reproducible_with_a_seeded_generator() -> None:
    image = torch.rand((1, 1, 3, 3, 3), generator=torch.Generator().manual_seed(4))

    def run(seed: int) -> torch.Tensor:
        return ddim_trajectory(RecordingNet(), image, 5, 2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))
    samples = run(5)
    assert not torch.allclose(samples[:, :, 0], samples[:, :, 1])  # the samples are independent chains


def test_trajectory_is_detached_inference_output() -> None:
    net = TinyConvNet(image_channels=1)
    trajectory = ddim_trajectory(net, torch.rand((1, 1, 3, 3, 3)), num_steps=2)
    assert not trajectory.requires_grad and trajectory.is_inference()


def test_bf16_autocast_returns_float32_close_to_full_precision() -> None:
    torch.manual_seed(0)
    net = TinyConvNet(image_channels=1)
    image = torch.rand((1, 1, 4, 4, 4), generator=torch.Generator().manual_seed(7))
    full = ddim_trajectory(net, image, 3, generator=torch.Generator().manual_seed(8))
    half = ddim_trajectory(net, image, 3, generator=torch.Generator().manual_seed(8), autocast_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


def test_trajectory_rejects_a_net_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError):
        ddim_trajectory(lambda image, noisy, t: noisy[:, :, 1:], torch.zeros((1, 1, 3, 3, 3)), num_steps=2)


def test_scan_larger_than_the_window_is_stitched_voxel_for_voxel() -> None:
    generator = torch.Generator().manual_seed(9)
    mask = random_mask((1, 1, 21, 18, 16), generator)
    image = image_with_mask(mask, generator)[0]

    steps = sample_scan(
        OracleNet(), image, num_steps=3, num_samples=2, roi_size=(8, 8, 8), overlap=0.25, sw_batch_size=3,
        generator=generator,
    )

    assert steps.shape == (3, 2, 21, 18, 16) and steps.dtype == torch.float32
    expected = oracle_logits(image[None])[0, 0]
    torch.testing.assert_close(steps, expected.expand_as(steps), rtol=1e-6, atol=1e-5)
    assert torch.equal(steps > 0, (mask[0, 0] > 0).expand_as(steps))


def test_one_window_scan_keeps_the_step_and_sample_order_of_the_trajectory() -> None:
    image = torch.rand((1, 6, 5, 4), generator=torch.Generator().manual_seed(10))
    steps = sample_scan(RecordingNet(), image, 4, 3, roi_size=(6, 5, 4), generator=torch.Generator().manual_seed(11))
    trajectory = ddim_trajectory(RecordingNet(), image[None], 4, 3, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(steps, trajectory[0], rtol=0, atol=0)


def test_scan_rejects_a_batched_image() -> None:
    with pytest.raises(ValueError):
        sample_scan(OracleNet(), torch.zeros((1, 2, 8, 8, 8)), 2, 1, roi_size=8)


def test_padding_the_last_window_batch_changes_nothing_but_the_batch_shape() -> None:
    """pad_windows (for a compiled network: one shape per call) gives the same trajectories from the same seed."""
    image = torch.rand((1, 13, 11, 9), generator=torch.Generator().manual_seed(12))
    shapes = []

    class ShapeRecordingNet(TinyConvNet):
        def forward(self, image, noisy, t):
            shapes.append(image.shape[0])
            return super().forward(image, noisy, t)

    torch.manual_seed(0)
    net = ShapeRecordingNet(image_channels=1).eval()
    outputs = {}
    for pad in (False, True):
        shapes.clear()
        outputs[pad] = sample_scan(
            net, image, 2, 2, roi_size=(8, 8, 8), overlap=0.25, sw_batch_size=3,
            generator=torch.Generator().manual_seed(13), pad_windows=pad,
        )
        if pad:
            assert set(shapes) == {3 * 2}  # every call: 3 windows x 2 samples
        else:
            assert len(set(shapes)) == 2  # 8 windows: two full batches and a short one
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)


def test_a_batch_of_scans_is_stitched_as_each_scan_alone() -> None:
    """Windows of several scans of one shape batched together give each scan's own result (per-row network)."""
    from msx.models.diffusion import sample_scan_fused

    images = torch.rand((2, 2, 13, 11, 9), generator=torch.Generator().manual_seed(14))
    together = sample_scan_fused(OracleNet(), images, 2, 1, (8, 8, 8), fuse=lambda t: t.flatten(1, 2), sw_batch_size=3)
    for row in range(2):
        alone = sample_scan_fused(
            OracleNet(), images[row], 2, 1, (8, 8, 8), fuse=lambda t: t.flatten(1, 2), sw_batch_size=3
        )
        torch.testing.assert_close(together[row], alone, rtol=1e-6, atol=1e-6)


# Sampling encodes each window once: the same trajectories as running the whole network at every step.
# backbone -> (width, window size): the smallest each family takes (see test_backbones.py).
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
